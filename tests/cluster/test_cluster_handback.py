"""A job one node can never hold goes to a node that can (handed back, the attempt and the
refusal's figures recorded); a job no node can hold fails visibly, naming every node's
figures.

"Small" here is real arithmetic on real nodes: node b's configured need for a music run
(``required_ram_mb``, 1 TiB) is beyond what its RAM could ever give, so its own gate
refuses the job (as a node with a smaller card would); a's need is 64 MB. Neither can
hold a video job (both configure 1 TiB)."""

from __future__ import annotations

import re

import httpx

from tests.cluster.conftest import NEVER_MB, Cluster, Node
from tests.cluster.test_cluster_jobs import job, post, wait_status
from tests.helpers import wait_until


def figures(message: str) -> tuple[int, int]:
    """(MB required, the most MB the node could ever give) as a refusal names them."""
    required = re.search(r"(\d+) MB required", message)
    most = re.search(r"at most (\d+) MB", message)
    assert required and most, message
    return int(required.group(1)), int(most.group(1))


def metric(node: Node, sample: str) -> float:
    """One sample of the node's /metrics (0 when absent)."""
    for line in node.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_job_too_big_for_one_node_goes_to_the_other(shared: Cluster) -> None:
    a, b = shared.nodes["a"], shared.nodes["b"]
    music = 'queue="edison.music"'
    attempts_before = metric(b, f"edison_cluster_job_attempts{{{music}}}")
    shared.hold.touch()
    # a runs the first music job (held): b refuses music, whichever node fetched it first.
    first = post(b, "first tune", kind="music", duration_s=1)
    wait_until(
        lambda: (j := job(b, first))["status"] == "running" and j["node"] == "a",
        timeout=90,
        interval=0.1,
        what="the first tune running on a",
    )  # (b shows as its node for a moment when it took the job first, before refusing)
    # a's line is busy, so only b pulls the second one: it refuses and hands it back.
    second = post(a, "second tune", kind="music", duration_s=1)
    refused = wait_until(
        lambda: (j := job(a, second))["refusals"] and j,
        timeout=60,
        interval=0.1,
        what="b's refusal recorded",
    )
    assert refused["status"] == "queued" and refused["error"] is None
    [refusal] = refused["refusals"]
    assert refusal["node"] == "b"
    required, most = figures(refusal["message"])
    assert required == NEVER_MB and most < required  # b's figures: its need, its most
    # b keeps fetching it while a is busy: each time it passes it on, adding no attempt
    # and no second refusal.
    wait_until(
        lambda: f"cluster job {second}: passed" in b.log.read_text(),
        timeout=60,
        what="b passed the job on again",
    )
    # /metrics on any node: the music queue, one running and one waiting.
    wait_until(
        lambda: [metric(b, f'edison_cluster_queue_depth{{{music},state="{s}"}}') for s in
                 ("queued", "running")] == [1, 1],
        timeout=30,
        what="the queue depths in /metrics",
    )  # fmt: skip
    shared.hold.unlink()
    done = wait_status(b, second, "succeeded")
    assert done["node"] == "a" and [r["node"] for r in done["runs"]] == ["b", "a"]
    assert done["attempts"] == 2  # b's take that it handed back, then a's run
    assert [r["node"] for r in done["refusals"]] == ["b"]
    r = b.get(done["outputs"][0]["url"])  # a's file, through b
    assert r.status_code == 200 and r.content.startswith(b"RIFF"), r.text[:200]
    # The attempts in /metrics: both jobs' (the first took 1, or 2 when b fetched it first).
    attempts = job(b, first)["attempts"] + done["attempts"]
    assert metric(a, f"edison_cluster_job_attempts{{{music}}}") - attempts_before == attempts
    assert metric(a, f"edison_cluster_jobs_retried{{{music}}}") >= 1
    assert metric(a, "edison_cluster_database_up") == 1
    # b never ran a music job: every run marker of a tune is a's.
    tunes = [p.name for p in shared.runs.glob("*.start") if "tune" in p.read_text()]
    assert sorted(n.split(".")[0] for n in tunes) == ["a", "a"]


def test_a_job_no_node_can_hold_fails_naming_every_nodes_figures(shared: Cluster) -> None:
    a, b = shared.nodes["a"], shared.nodes["b"]
    job_id = post(a, "a long film", kind="video", num_frames=2, width=32, height=32)
    failed = wait_status(b, job_id, "failed", "succeeded")
    assert failed["status"] == "failed", failed
    error = failed["error"]
    assert error["code"] == "insufficient_memory_everywhere"
    assert "No node of the cluster can hold this video job" in error["message"]
    # Both nodes' refusals, each naming its figures.
    assert sorted(r["node"] for r in failed["refusals"]) == ["a", "b"]
    for refusal in failed["refusals"]:
        assert f"{refusal['node']}: {refusal['message']}" in error["message"]
        required, most = figures(refusal["message"])
        assert required > NEVER_MB * 0.99 and most < required
    assert failed["attempts"] == 2 and sorted(r["node"] for r in failed["runs"]) == ["a", "b"]
    assert job(a, job_id)["error"] == error  # the same from every node
    assert not list(shared.runs.glob("*.start"))  # it never ran anywhere
    # A client that waits for the answer gets it too: 503, naming the figures.
    r = httpx.post(
        f"{b.url}/generate-video",
        json={"prompt": "another film", "num_frames": 2, "width": 32, "height": 32},
        timeout=120,
    )
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "insufficient_memory_everywhere"
    assert len(re.findall(r"\d+ MB required", r.json()["error"]["message"])) == 2
