"""Retention in a real app: generated files past `server.outputs_max_age_h` are deleted
by the background pass after a job ends, never a file of a job still running; finished
jobs are forgotten by age and by count wherever they stand in the order.

Real jobs on the tiny image pipeline (CPU). A file's age is set with os.utime and a
finished job's end time is moved back: given numbers, as hours cannot pass in a test.
"""

from __future__ import annotations

import os
import time

import pytest

import services.generation.jobs as jobs_module
from app.main import create_app
from services.generation.jobs import Job
from services.generation.params import GenerationParams
from tests.helpers import until

pytestmark = pytest.mark.anyio
PARAMS = GenerationParams("x", steps=1, width=32, height=32)


@pytest.fixture
def retention_app(make_settings, tiny_pipelines):
    def build(**server):
        settings = make_settings(
            server=server,
            generation={"image": {"pipeline": str(tiny_pipelines["image"]), "required_ram_mb": 64}},
        )
        return create_app(settings)

    return build


def age(path: os.PathLike, hours: float) -> None:
    then = time.time() - hours * 3600
    os.utime(path, (then, then))


async def test_old_outputs_go_after_a_job_ends_but_never_a_running_job_s(
    retention_app, step_gate
) -> None:
    app = retention_app(outputs_max_age_h=1)
    async with app.router.lifespan_context(app):
        await app.state.ready.wait()
        jobs, folder = app.state.jobs, app.state.settings.server.outputs_dir
        step_gate.release()
        first = await jobs.submit("image", PARAMS)
        await until(first.done.is_set, what="the first job done")
        [old] = [folder / o.name for o in first.outputs]
        age(old, 2)  # written two hours ago
        step_gate._open.clear()  # hold the next run at its first step
        running = await jobs.submit("image", PARAMS)
        await until(lambda: step_gate.held == 1, what="the second run held")
        # A file the running job may have written (after it started), made old-looking
        # but still newer than the job's start: a pass now must keep it.
        mine = folder / f"image_{'ab' * 16}_0.png"
        mine.write_bytes(b"png")
        result = await jobs.prune()
        assert result.removed == (old.name,) and not old.exists() and mine.exists()
        assert first.id in jobs.jobs  # its record stays: it finished minutes ago
        # After the running job ends, the background pass runs by itself.
        os.utime(mine, (running.started_at - 7200, running.started_at - 7200))
        step_gate.release()
        await until(running.done.is_set, what="the second job done")
        await until(lambda: not mine.exists(), what="the pass after the job deleted it")
        assert all((folder / o.name).exists() for o in running.outputs)  # new: kept


async def test_jobs_are_forgotten_by_age_and_count_past_an_unfinished_one(
    retention_app, monkeypatch
) -> None:
    monkeypatch.setattr(jobs_module, "MAX_JOBS_KEPT", 3)
    app = retention_app(outputs_max_age_h=24)
    async with app.router.lifespan_context(app):
        await app.state.ready.wait()
        jobs = app.state.jobs
        # In submission order: an unfinished job first, then finished ones; one of them
        # finished two days ago. The records are given; the pruning is the service's.
        waiting = Job("waiting", "image", PARAMS)
        done = [Job(f"done{i}", "image", PARAMS, status="succeeded") for i in range(4)]
        for job in done:
            job.finished_at = time.time()
            job.done.set()
        done[2].finished_at = time.time() - 48 * 3600
        for job in (waiting, *done):
            jobs.jobs[job.id] = job
        assert jobs.prune_jobs() == 2
        # done2 by age; done0 (the oldest finished) by count; the unfinished one stays.
        assert list(jobs.jobs) == ["waiting", "done1", "done3"]
