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


def post(node: Node, prompt: str = "a lighthouse") -> str:
    r = httpx.post(
        node.url + "/generate-image", json={**IMAGE, "prompt": prompt}, headers=ASYNC, timeout=30
    )
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def job(node: Node, job_id: str) -> dict[str, Any]:
    r = node.get(f"/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(node: Node, job_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(
        lambda: (j := job(node, job_id))["status"] in statuses and j,
        timeout=timeout,
        interval=0.05,
        what=f"job {job_id} {statuses}",
    )


def test_a_job_posted_to_a_busy_node_runs_on_the_other(cluster: Cluster) -> None:
    cluster.hold.touch()
    a = cluster.start("a")
    first = post(a, "first")
    assert wait_status(a, first, "running")["node"] == "a"
    b = cluster.start("b")
    second = post(a, "second")  # a's only line is busy: b pulls it
    running = wait_status(b, second, "running")
    assert running["node"] == "b" and running["submitted_by"] == "a"
    assert running["attempts"] == 1
    cluster.hold.unlink()
    done = [wait_status(n, j, "succeeded") for n, j in ((b, first), (a, second))]
    assert [d["node"] for d in done] == ["a", "b"]
    assert all(d["attempts"] == 1 and d["progress"]["done"] == 2 for d in done)
    # Outputs from every node: b proxies a's file, a proxies b's.
    for d, other in ((done[0], b), (done[1], a)):
        url = d["outputs"][0]["url"]
        r = other.get(url)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG"), r.text[:200]
    assert len(cluster.completions()) == 2
    info = a.get("/system/cluster").json()
    assert {n["name"] for n in info["nodes"] if n["alive"]} == {"a", "b"}
    assert all(n["devices"] and n["kinds"] == ["image"] for n in info["nodes"])


def test_cancel_queued_and_running_from_another_node(cluster: Cluster) -> None:
    cluster.hold.touch()
    a = cluster.start("a")
    front = cluster.start("front", generation={"image": {"pipeline": None}})  # runs nothing
    running = post(front, "running one")
    queued = post(front, "queued one")
    assert wait_status(front, running, "running")["node"] == "a"
    assert job(a, queued)["status"] == "queued"
    r = httpx.delete(f"{front.url}/jobs/{queued}", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    r = httpx.delete(f"{front.url}/jobs/{running}", timeout=30)
    assert r.status_code == 200, r.text
    gone = wait_status(a, running, "cancelled")  # a stops it at its next step
    assert gone["node"] == "a" and gone["error"]["code"] == "cancelled"
    cluster.hold.unlink()
    # The queued one never started anywhere; the running one never completed.
    assert [p for p in cluster.starts()] == [cluster.starts()[0]]
    assert cluster.completions() == []
    assert job(a, queued)["status"] == "cancelled"
