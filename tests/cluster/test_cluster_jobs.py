"""Generation jobs across real nodes: any node accepts, a node pulls only when its own line
is free, one view and cancel from every node, outputs from every node.

Real processes: a PostgreSQL started by the tests and `edison serve` nodes on loopback
(tests/cluster/node.py adds the cross-process step hold and the run markers)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.cluster.conftest import Cluster, Node
from tests.helpers import wait_until

ASYNC = {"Prefer": "respond-async"}
IMAGE = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 1}


def post(node: Node, prompt: str = "a lighthouse", kind: str = "image", **body: Any) -> str:
    payload = {**IMAGE, "prompt": prompt} if kind == "image" else {"prompt": prompt}
    r = httpx.post(
        f"{node.url}/generate-{kind}", json={**payload, **body}, headers=ASYNC, timeout=30
    )
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def job(node: Node, job_id: str) -> dict[str, Any]:
    r = node.get(f"/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(node: Node, job_id: str, *statuses: str, timeout: float = 90) -> dict[str, Any]:
    return wait_until(
        lambda: (j := job(node, job_id))["status"] in statuses and j,
        timeout=timeout,
        interval=0.1,
        what=f"job {job_id} {statuses}",
    )


def other(c: Cluster, name: str) -> Node:
    return next(n for n in c.nodes.values() if n.name != name)


def test_a_job_posted_to_a_busy_node_runs_on_the_other(shared: Cluster) -> None:
    shared.hold.touch()
    first = post(shared.nodes["a"], "first")
    busy = shared.nodes[wait_status(shared.nodes["a"], first, "running")["node"]]
    free = other(shared, busy.name)
    second = post(busy, "second")  # its only line is busy: the other node pulls it
    running = wait_status(busy, second, "running")
    assert running["node"] == free.name and running["submitted_by"] == busy.name
    assert running["attempts"] == 1
    assert job(busy, first)["status"] == "running"  # still held on its node
    shared.hold.unlink()
    done = [wait_status(n, j, "succeeded") for n, j in ((free, first), (busy, second))]
    assert [d["node"] for d in done] == [busy.name, free.name]
    assert all(d["attempts"] == 1 and d["progress"]["done"] == 2 for d in done)
    # Outputs from every node: each proxies the file the other wrote.
    for d, asker in ((done[0], free), (done[1], busy)):
        r = asker.get(d["outputs"][0]["url"])
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG"), r.text[:200]
    assert len(shared.completions()) == 2
    info = busy.get("/system/cluster").json()
    assert {n["name"] for n in info["nodes"] if n["alive"]} == {"a", "b"}
    assert all(n["devices"] and "image" in n["kinds"] for n in info["nodes"])


def test_cancel_queued_and_running_from_another_node(shared: Cluster) -> None:
    a, b = shared.nodes["a"], shared.nodes["b"]
    shared.hold.touch()
    running = [post(a, "running one"), post(a, "running two")]  # both lines busy
    views = [wait_status(a, j, "running") for j in running]
    assert {v["node"] for v in views} == {"a", "b"}
    queued = post(a, "queued one")
    assert job(b, queued)["status"] == "queued"
    # Cancelled from the node that did not take it.
    r = httpx.delete(f"{b.url}/jobs/{queued}", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    held = views[0]
    asker = other(shared, held["node"])
    r = httpx.delete(f"{asker.url}/jobs/{running[0]}", timeout=30)
    assert r.status_code == 200, r.text
    gone = wait_status(asker, running[0], "cancelled")  # its node stops it at its next step
    assert gone["node"] == held["node"] and gone["error"]["code"] == "cancelled"
    shared.hold.unlink()
    assert wait_status(a, running[1], "succeeded")["attempts"] == 1
    wait_until(shared.idle, timeout=60, what="the queue empty")
    # The queued one never started anywhere; the cancelled running one never completed.
    prompts = sorted(p.read_text() for p in shared.runs.glob("*.start"))
    assert prompts == ["running one", "running two"]
    assert [p.read_text() for p in shared.runs.glob("*.done")] == ["running two"]
    assert job(a, queued)["status"] == "cancelled"
