"""Events carry the state of their moment: a subscriber that reads them late (here: only
after the job is done) still sees each event as it was when published. A real app, the
tiny image pipeline on the CPU, the real event bus and its SSE encoding."""

from __future__ import annotations

import json

import pytest

from app.main import create_app
from routers.events import sse
from services.generation.params import GenerationParams
from tests.helpers import until

pytestmark = pytest.mark.anyio


async def test_a_subscriber_that_falls_behind_sees_each_job_event_as_it_was(
    make_settings, tiny_pipelines
) -> None:
    settings = make_settings(
        generation={"image": {"pipeline": str(tiny_pipelines["image"]), "required_ram_mb": 64}}
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.ready.wait()
        bus = app.state.events
        with bus.subscription() as sub:
            job = await app.state.jobs.submit(
                "image", GenerationParams("x", steps=3, width=32, height=32)
            )
            await until(job.done.is_set, what="the job finished")
            assert job.status == "succeeded"
            # Only now does the subscriber read what was published meanwhile.
            events = []
            while not sub.queue.empty():
                event = sub.queue.get_nowait()
                if event is not None and event.type.startswith("job."):
                    events.append(json.loads(sse(event).decode().split("data: ", 1)[1]))
    seen = [(e["type"], e["data"]["status"], e["data"]["progress"]["done"]) for e in events]
    assert seen == [
        ("job.queued", "queued", 0),
        ("job.started", "running", 0),
        ("job.progress", "running", 1),
        ("job.progress", "running", 2),
        ("job.progress", "running", 3),
        ("job.finished", "succeeded", 3),
    ]
    queued, finished = events[0]["data"], events[-1]["data"]
    assert queued["outputs"] == [] and queued["finished_at"] is None and queued["gate"] is None
    assert queued["timings_ms"]["total"] is None and queued["position"] is not None
    assert len(finished["outputs"]) == 1 and finished["timings_ms"]["total"] is not None
