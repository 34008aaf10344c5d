"""A full line refuses before anyone is told a job was queued: a burst of async
(`Prefer: respond-async`) requests on a real app with the tiny image pipeline, on the CPU.

The first run is held at its first step (the step_gate fixture), so the line fills for
sure; everything else (the gate, the lines, the HTTP answers) is real.
"""

from __future__ import annotations

import anyio
import httpx
import pytest

from app.main import create_app
from tests.helpers import until

pytestmark = pytest.mark.anyio
BODY = {"prompt": "x", "width": 32, "height": 32, "steps": 2}
ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def queue_settings(make_settings, tiny_pipelines):
    def build(max_waiting: int):
        return make_settings(
            generation={
                "image": {
                    "pipeline": str(tiny_pipelines["image"]),
                    "required_ram_mb": 64,
                    "default_steps": 2,
                }
            },
            queue={"max_waiting": max_waiting, "max_wait_s": 120},
        )

    return build


async def test_a_burst_past_a_full_line_gets_503_and_never_a_202(queue_settings, step_gate) -> None:
    app = create_app(queue_settings(max_waiting=2))
    async with app.router.lifespan_context(app):
        await app.state.ready.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            # One job runs (held at its first step): the line of its device is empty.
            first = await c.post("/generate-image", json=BODY, headers=ASYNC)
            assert first.status_code == 202, first.text
            await until(lambda: step_gate.held == 1, what="the first run held")
            answers: list[httpx.Response] = []

            async def one() -> None:
                answers.append(await c.post("/generate-image", json=BODY, headers=ASYNC))

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(one)
            accepted = [r for r in answers if r.status_code == 202]
            refused = [r for r in answers if r.status_code == 503]
            # Two places in line: two 202s; the other six are refused in their answer.
            assert len(accepted) == 2 and len(refused) == 6, [r.status_code for r in answers]
            for r in refused:
                body = r.json()["error"]
                assert body["code"] == "queue_full" and body["max_waiting"] == 2
                assert int(r.headers["retry-after"]) >= 1
            # Every 202 is a job that holds its place; no refused request became a job.
            jobs = app.state.jobs.jobs
            assert set(jobs) == {first.json()["job_id"]} | {r.json()["job_id"] for r in accepted}
            assert [r.json()["position"] for r in accepted] == [1, 2]
            assert app.state.gate.queue_length == 2
            step_gate.release()
            await until(lambda: all(j.done.is_set() for j in jobs.values()), what="jobs done")
        # The 202s all ran: none failed later with queue_full.
        assert {j.status for j in jobs.values()} == {"succeeded"}
        assert app.state.gate.outcomes.get("queue_full") == 6
        assert app.state.gate.queue_length == 0 and app.state.gate.describe().state == "idle"


async def test_a_job_cancelled_before_its_task_ran_gives_its_place_back(
    queue_settings, step_gate
) -> None:
    """A place is taken when the job is submitted; a job cancelled before its task ever
    ran (so no clean-up of its own ran) must leave the line all the same."""
    app = create_app(queue_settings(max_waiting=1))
    async with app.router.lifespan_context(app):
        await app.state.ready.wait()
        jobs = app.state.jobs
        from services.generation.params import GenerationParams

        params = GenerationParams("x", steps=2, width=32, height=32)
        running = await jobs.submit("image", params)
        await until(lambda: step_gate.held == 1, what="the first run held")
        waiting = await jobs.submit("image", params)
        assert app.state.gate.queue_length == 1
        jobs.cancel(waiting.id)  # before its task took a step
        await until(waiting.done.is_set, what="the cancelled job done")
        assert waiting.status == "cancelled" and app.state.gate.queue_length == 0
        # Its place is free again: the next one is queued, not refused.
        after = await jobs.submit("image", params)
        assert after.position == 1
        step_gate.release()
        await until(lambda: running.done.is_set() and after.done.is_set(), what="jobs done")
        assert (running.status, after.status) == ("succeeded", "succeeded")
        assert app.state.gate.describe().state == "idle"
