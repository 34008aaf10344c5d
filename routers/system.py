"""GET /system/memory: the snapshot, the ledger and what is loaded, in one answer."""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import LedgerDep, ProbeDep, SettingsDep
from app.schemas import SystemMemory
from services.memory_ledger import device_name

router = APIRouter(tags=["system"])


@router.get(
    "/system/memory",
    response_model=SystemMemory,
    summary="RAM, VRAM per GPU, loaded models, heavy slot and gate state",
)
async def system_memory(
    request: Request, probe: ProbeDep, ledger: LedgerDep, settings: SettingsDep
) -> dict:
    # Why a thread: NVML or nvidia-smi may block; the event loop must keep serving.
    snap = await to_thread.run_sync(probe.snapshot)
    device = device_name(snap, settings.memory.device)
    state = request.app.state
    models = getattr(state, "models", None)
    gate = getattr(state, "gate", None)
    return {
        **snap.to_dict(),
        "device": ledger.budget(snap, device).to_dict(),
        "reservations": [r.to_dict() for r in ledger.entries()],
        "loaded_models": models.loaded_info() if models else [],
        "heavy_slot": models.heavy_slot if models else None,
        "gate": gate.describe() if gate else {"state": "idle", "queue_length": 0},
        "pipelines": state.pipelines.describe() if hasattr(state, "pipelines") else [],
    }


@router.get(
    "/metrics",
    summary="Prometheus metrics: memory per device, models, gate decisions, queue, task durations",
    response_class=PlainTextResponse,
)
async def metrics(request: Request, probe: ProbeDep, ledger: LedgerDep) -> PlainTextResponse:
    snap = await to_thread.run_sync(probe.snapshot)
    state = request.app.state
    body = state.metrics.render(snap, ledger, state.models, state.gate)
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)
