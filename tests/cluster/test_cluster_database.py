"""The cluster database lost while nodes run jobs, then back: /ready says so, new generation
requests get 503 with Retry-After, running jobs finish and keep their results on their node
until the database returns; then every job is there, once. Real PostgreSQL stopped and
started again under two real nodes."""

from __future__ import annotations

import httpx

from tests.cluster.conftest import Cluster, Node
from tests.cluster.test_cluster_jobs import IMAGE, job, post, wait_status
from tests.helpers import wait_until


def ready_code(node: Node) -> int:
    return node.get("/ready").status_code


def test_the_database_down_then_back_loses_nothing(shared: Cluster) -> None:
    a, b = shared.nodes["a"], shared.nodes["b"]
    shared.hold.touch()
    running = [post(a, "kept one"), post(a, "kept two")]
    assert {wait_status(a, j, "running")["node"] for j in running} == {"a", "b"}
    queued = post(b, "waits out the outage")  # both lines are busy
    assert job(a, queued)["status"] == "queued"

    shared.pg.stop("fast")
    shared.pg.wait_stopped()
    try:
        for node in (a, b):
            wait_until(lambda n=node: ready_code(n) == 503, timeout=60, what="/ready says so")
            r = node.get("/ready")
            assert r.json()["error"]["code"] == "cluster_database_unavailable"
            assert "cluster.database_url" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) >= 1
            r = httpx.post(f"{node.url}/generate-image", json=IMAGE, timeout=30)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "cluster_database_unavailable"
            assert int(r.headers["retry-after"]) >= 1
        # The running jobs go on: both complete while the database is still down, and their
        # results wait on their nodes (no node can show them yet).
        shared.hold.unlink()
        wait_until(lambda: len(shared.completions()) == 2, timeout=90, what="both runs completed")
        assert node.get(f"/jobs/{running[0]}").status_code == 503
        assert ready_code(a) == 503 and ready_code(b) == 503
    finally:
        shared.pg.start()

    for node in (a, b):
        wait_until(lambda n=node: ready_code(n) == 200, timeout=90, what="ready again")
    done = [wait_status(b, j, "succeeded") for j in (*running, queued)]
    # Nothing lost, nothing run twice: each job ran once, on one node, with its outputs.
    assert all(d["attempts"] == 1 and len(d["runs"]) == 1 for d in done), done
    assert len(shared.completions()) == 3
    for d in done:
        asker = b if d["node"] == "a" else a
        r = asker.get(d["outputs"][0]["url"])
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG"), r.text[:200]
    # New requests are taken again.
    assert wait_status(a, post(a, "after the outage"), "succeeded")["attempts"] == 1
