"""Node death and a frozen node, with real processes: kill -9 and SIGSTOP/SIGCONT of the node
running a job; the job is re-run on the other node and completes exactly once.

The nodes here are this module's own (they are killed), on a database of their own; the
frozen-node test reuses the kill test's survivor and starts one more."""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import Cluster, Node, make_cluster
from tests.cluster.test_cluster_jobs import job, post, wait_status
from tests.helpers import wait_until

pytestmark = pytest.mark.slow  # kill -9 and SIGSTOP past the heartbeat timeout


@pytest.fixture(scope="module")
def group(
    postgres: Any, tiny_pipelines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    c = make_cluster(postgres, tiny_pipelines, tmp_path_factory.mktemp("chaos"), "chaos")
    try:
        yield c
    finally:
        c.stop_all()


_names = (f"c{i}" for i in itertools.count(1))


def two_live(c: Cluster) -> tuple[Node, Node]:
    """Two live nodes (starting as many as are missing), idle, with no hold and no markers."""
    c.hold.unlink(missing_ok=True)
    missing = 2 - len(c.live())
    if missing > 0:
        c.start_many({next(_names): {} for _ in range(missing)})
    wait_until(c.idle, timeout=120, interval=0.2, what="the queue empty")
    for marker in c.runs.glob("*"):
        marker.unlink()
    first, second = c.live()[:2]
    return first, second


def wait_rerun(node: Node, job_id: str, on: str) -> dict[str, Any]:
    """The job running again, on ``on`` (until then it still shows its first node)."""
    return wait_until(
        lambda: (j := job(node, job_id))["status"] == "running" and j["node"] == on and j,
        timeout=90,
        interval=0.1,
        what=f"job {job_id} re-run on {on}",
    )


def test_kill_9_of_the_running_node_reruns_the_job_on_the_other(group: Cluster) -> None:
    a, b = two_live(group)
    group.hold.touch()
    job_id = post(a, "survivor")
    first = wait_status(a, job_id, "running")
    victim = group.nodes[first["node"]]
    other = b if victim is a else a
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    rerun = wait_rerun(other, job_id, other.name)
    assert rerun["attempts"] == 2
    assert [r["node"] for r in rerun["runs"]] == [victim.name, other.name]
    group.hold.unlink()
    done = wait_status(other, job_id, "succeeded")
    assert done["attempts"] == 2 and done["node"] == other.name
    # One completion: the dead node never finished it.
    assert [c.split(".")[0] for c in group.completions()] == [other.name]


def test_a_frozen_node_past_the_timeout_never_completes_the_job_a_second_time(
    group: Cluster,
) -> None:
    a, b = two_live(group)
    group.hold.touch()
    job_id = post(a, "frozen")
    first = wait_status(a, job_id, "running")
    frozen = group.nodes[first["node"]]
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
    group.hold.unlink()
    done = wait_status(other, job_id, "succeeded")
    assert done["node"] == other.name and done["attempts"] == 2
    assert [c.split(".")[0] for c in group.completions()] == [other.name]
    assert job(frozen, job_id)["status"] == "succeeded"
