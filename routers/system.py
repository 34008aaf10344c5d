"""GET /system/memory and /metrics: the snapshot, the ledger and what holds memory."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import GateDep, JobsDep, MetricsDep, ModelsDep, PipelinesDep, PlacementDep
from app.report import memory_report
from app.schemas import ERROR_DESCRIPTIONS, SystemMemory, system_memory_view

router = APIRouter(tags=["system"])


@router.get(
    "/system/memory",
    response_model=SystemMemory,
    summary="RAM, VRAM per GPU, loaded models and pipelines, heavy slot and gate state",
)
async def system_memory(
    placement: PlacementDep,
    models: ModelsDep,
    gate: GateDep,
    pipelines: PipelinesDep,
    jobs: JobsDep,
) -> SystemMemory:
    report = await memory_report(placement, models, gate, pipelines, jobs)
    return system_memory_view(report)


@router.get(
    "/metrics",
    summary="Prometheus metrics: memory per device, models, gate decisions, queue, task durations",
    response_class=PlainTextResponse,
    # Errors are JSON whatever the route's own media type is.
    responses={
        401: {
            "description": ERROR_DESCRIPTIONS[401],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
    },
)
async def metrics(
    placement: PlacementDep, models: ModelsDep, gate: GateDep, metrics: MetricsDep
) -> PlainTextResponse:
    snap = await placement.snapshot()
    body = metrics.render(snap, placement.ledger, models, gate, placement.views_of(snap))
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)
