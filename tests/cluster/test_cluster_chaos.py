"""Node death and a frozen node, with real processes: kill -9 and SIGSTOP/SIGCONT of the node
running a job; the job is re-run on the other node and completes exactly once."""

from __future__ import annotations

import os
import signal

from tests.cluster.conftest import Cluster
from tests.cluster.test_cluster_jobs import job, post, wait_status
from tests.helpers import wait_until


def wait_rerun(node, job_id: str, on: str):  # noqa: ANN001, ANN201
    """The job running again, on ``on`` (until then it still shows its first node)."""
    return wait_until(
        lambda: (j := job(node, job_id))["status"] == "running" and j["node"] == on and j,
        timeout=90,
        interval=0.1,
        what=f"job {job_id} re-run on {on}",
    )


def test_kill_9_of_the_running_node_reruns_the_job_on_the_other(cluster: Cluster) -> None:
    cluster.hold.touch()
    a = cluster.start("a")
    b = cluster.start("b")
    job_id = post(a, "survivor")
    first = wait_status(a, job_id, "running")
    victim = cluster.nodes[first["node"]]
    other = b if victim is a else a
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    rerun = wait_rerun(other, job_id, other.name)
    assert rerun["attempts"] == 2
    assert [r["node"] for r in rerun["runs"]] == [victim.name, other.name]
    cluster.hold.unlink()
    done = wait_status(other, job_id, "succeeded")
    assert done["attempts"] == 2 and done["node"] == other.name
    # One completion: the dead node never finished it.
    assert [c.split(".")[0] for c in cluster.completions()] == [other.name]


def test_a_frozen_node_past_the_timeout_never_completes_the_job_a_second_time(
    cluster: Cluster,
) -> None:
    cluster.hold.touch()
    a = cluster.start("a")
    b = cluster.start("b")
    job_id = post(a, "frozen")
    first = wait_status(a, job_id, "running")
    frozen = cluster.nodes[first["node"]]
    other = b if frozen is a else a
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        rerun = wait_rerun(other, job_id, other.name)
        assert rerun["attempts"] == 2
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    # Its first refused write stops it: the held run sees the cancel and never completes.
    wait_until(
        lambda: "no longer this node's" in frozen.log.read_text(),
        timeout=60,
        what="the frozen node noticed its write was refused",
    )
    cluster.hold.unlink()
    done = wait_status(other, job_id, "succeeded")
    assert done["node"] == other.name and done["attempts"] == 2
    assert [c.split(".")[0] for c in cluster.completions()] == [other.name]
    assert job(frozen, job_id)["status"] == "succeeded"
