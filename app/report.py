"""What ``GET /system/memory`` (and the ``memory.snapshot`` event) shows: one snapshot,
the figures decisions are taken on, and every consumer of memory (models, pipelines,
tasks, other reservations). It gathers from every service, so it lives with the app,
not in the memory package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.generation.jobs import JobState
from services.generation.pipelines import PipelineInfo
from services.llm.records import LoadedModel
from services.memory.gate import GateState, LaneState
from services.memory.learning import WorkerOverheadView
from services.memory.ledger import DeviceBudget, Reservation
from services.memory.placement import Placement
from services.memory.snapshot import GpuMemory, ProbeReport
from services.settings import BackendChoice

if TYPE_CHECKING:
    from services.generation.jobs import JobService
    from services.generation.registry import PipelineRegistry
    from services.llm.manager import ModelManager
    from services.memory.gate import MemoryGate


@dataclass(frozen=True)
class DeviceReport:
    """One device Edison places work on: its budget, its line and its heavy slot."""

    budget: DeviceBudget
    worker_overhead: WorkerOverheadView
    lane: LaneState


@dataclass(frozen=True)
class MemoryReport:
    ram_total_mb: float
    ram_available_mb: float
    ram_used_mb: float
    gpus: tuple[GpuMemory, ...]
    vram_source: str
    timestamp: float
    probe_ms: float
    probe: ProbeReport  # what each step of the ladder said; a backed-off step says why
    device: DeviceBudget  # the figures the gate, the loader and the swarm decide on
    worker_overhead: WorkerOverheadView  # what an LLM worker costs here beyond its estimate
    reservations: list[Reservation]
    loaded_models: list[LoadedModel]
    heavy_slot: str | None
    gate: GateState
    pipelines: list[PipelineInfo]
    jobs: list[JobState]  # generation jobs not done: running first, then by place in line
    devices: list[DeviceReport]  # every device placed on (the first is ``device``)
    llm_backend: BackendChoice  # the LLM workers' backend (models.backend resolved)


async def memory_report(
    placement: Placement,
    models: ModelManager,
    gate: MemoryGate,
    pipelines: PipelineRegistry,
    jobs: JobService,
) -> MemoryReport:
    """Memory now, probed in a thread, with what holds it."""
    view = await placement.view()
    snap = view.snapshot
    return MemoryReport(
        ram_total_mb=snap.ram_total_mb,
        ram_available_mb=snap.ram_available_mb,
        ram_used_mb=snap.ram_used_mb,
        gpus=snap.gpus,
        vram_source=snap.vram_source,
        timestamp=snap.timestamp,
        probe_ms=snap.probe_ms,
        probe=placement.probe.report,
        device=view.budget,
        worker_overhead=placement.worker_overhead(view.device),
        reservations=placement.ledger.entries(),
        loaded_models=models.loaded_models(),
        heavy_slot=models.heavy_slot,
        gate=gate.describe(),
        pipelines=pipelines.describe(),
        jobs=[j.snapshot() for j in jobs.active()],
        devices=[
            DeviceReport(v.budget, placement.worker_overhead(v.device), gate.lane_state(v.device))
            for v in placement.views_of(snap)
        ],
        llm_backend=models.backend_choice(),
    )
