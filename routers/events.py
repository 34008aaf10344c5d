"""GET /events: what happens in Edison as server-sent events; GET /ui: the operator page."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse

from app.deps import EventsDep
from app.report import MemoryReport
from app.schemas import GateDecisionInfo, job_view, system_memory_view
from routers.models import TierInfo
from services.events import Event
from services.generation.jobs import JobState
from services.llm.records import TierView
from services.memory.gate import GateDecision

router = APIRouter(tags=["operators"])
page = APIRouter(tags=["operators"])
STATIC = Path(__file__).resolve().parent.parent / "app" / "static"
PING_S = 15.0  # a comment line this often: proxies keep the stream open, dead peers show


def payload(event: Event) -> dict[str, Any]:
    """An event's payload in the shape the rest of the API answers with."""
    p = event.payload
    if isinstance(p, TierView):
        return TierInfo.model_validate(p, from_attributes=True).model_dump(mode="json")
    if isinstance(p, GateDecision):
        return GateDecisionInfo.model_validate(p, from_attributes=True).model_dump(mode="json")
    if isinstance(p, JobState):
        return job_view(p).model_dump(mode="json")
    if isinstance(p, MemoryReport):
        return system_memory_view(p).model_dump(mode="json")
    raise TypeError(f"no answer shape for {type(p).__name__}" if is_dataclass(p) else str(p))


def sse(event: Event) -> bytes:
    body = {"seq": event.seq, "type": event.type, "at": event.at, "data": payload(event)}
    return f"id: {event.seq}\nevent: {event.type}\ndata: {json.dumps(body)}\n\n".encode()


@router.get(
    "/events",
    summary="Server-sent events: model loads and unloads, gate decisions, jobs, memory",
    description="`model.loading|loaded|failed|unloaded` (a tier, as in `GET /models`), "
    "`gate.decision`, `job.queued|started|progress|finished` (a job, as in `GET /jobs/{id}`), "
    "`memory.snapshot` (as `GET /system/memory`, at most every 500 ms while something "
    "changes). Each `data:` is `{seq, type, at, data}`. A client that falls more than 256 "
    "events behind loses the oldest undelivered ones and gets a `dropped` event saying how "
    "many: fetch `/system/memory` again then.",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def events(request: Request, bus: EventsDep) -> StreamingResponse:
    async def stream() -> AsyncIterator[bytes]:
        with bus.subscription() as sub:
            yield b": edison events\n\n"
            dropped = 0
            while True:
                if bus.closed:
                    return
                try:
                    event = await asyncio.wait_for(sub.queue.get(), PING_S)
                except TimeoutError:
                    yield b": ping\n\n"
                    continue
                if event is None:  # the server is shutting down
                    return
                if sub.dropped != dropped:
                    dropped = sub.dropped
                    yield f"event: dropped\ndata: {json.dumps({'dropped': dropped})}\n\n".encode()
                yield sse(event)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@page.get(
    "/ui",
    summary="The operator page: memory, models, gate and jobs, live",
    description="An HTML page (not JSON) that follows `GET /events`; it asks for the API "
    "key itself and keeps it in the browser's session storage.",
    response_class=HTMLResponse,
)
async def ui() -> FileResponse:
    return FileResponse(STATIC / "ui.html", media_type="text/html")
