"""Unloading LLM workers: one tier, a device's heavy slot, or every worker (on a device).

Part of the ModelManager (``manager.py``), which owns the tiers, the locks and the
workers; kept here so each file holds one idea. Ending a worker's process is what gives
the driver its memory back; the ledger entries go with it.

An unload first *drains* the model: from then on it gets no new leases (requests wait
for the reload or fall back), and the worker is ended once the leases out are back, or
after ``DRAIN_TIMEOUT_S``. Then it waits until the driver shows the memory back: NVML's
per-process figure where NVML lists our pids, else the device's used figure falling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import anyio

from services.llm.records import LoadedModel, TierState, UnloadResult
from services.llm.settle import gpu_index
from services.memory.ledger import CPU, MemoryLedger
from services.memory.placement import (
    DeviceDrop,
    Placement,
    flush_gpu_memory,
    wait_gpu_memory_released,
)
from services.memory.probe import MemorySnapshot
from services.settings import Settings

log = logging.getLogger("edison.models")

DRAIN_TIMEOUT_S = 30.0  # longest an eviction waits for requests in flight on the model


class Unloads:
    """The ModelManager's unloading. A mixin: the manager sets the attributes below and
    has ``_tier``, ``_publish``, ``heavy_slot`` and ``heavy_slots``."""

    settings: Settings
    placement: Placement
    ledger: MemoryLedger
    probe: object
    tiers: dict[str, TierState]
    _lock: asyncio.Lock
    clock: Callable[[], float]

    async def unload(self, key: str, *, reason: str = "request") -> UnloadResult:
        tier = self._tier(key)
        async with self._lock:
            return await self._unload_locked(tier, reason)

    async def unload_heavy_slot(
        self, *, reason: str = "request", device: str | None = None
    ) -> UnloadResult:
        """Unload the heavy model (on ``device`` only, when given)."""
        async with self._lock:
            slot = self.heavy_slots().get(device) if device else self.heavy_slot
            if slot is None:
                return UnloadResult()
            tier = self.tiers[slot]
            if tier.model is not None and device is not None:
                age = self.clock() - tier.model.loaded_at
                if age < self.settings.models.min_residency_s:
                    log.info(
                        "Evicting %s from %s %.1f s after its load, within min_residency_s: "
                        "%s outranks residency",
                        slot,
                        device,
                        age,
                        reason,
                    )
            return await self._unload_locked(tier, reason, device=device)

    async def unload_all(
        self, *, reason: str = "request", device: str | None = None
    ) -> UnloadResult:
        """End every worker (those placed on ``device`` only, when given), then flush (gc,
        torch.cuda.empty_cache where CUDA)."""
        async with self._lock:
            before = await self._free_mb(device)
            unloaded: list[str] = []
            held, settling = 0.0, False
            # Drain every model at once: requests to any of them stop coming together.
            await self._drain(
                [
                    t.model
                    for t in self.tiers.values()
                    if t.model is not None
                    and t.alias_of is None
                    and (device is None or t.model.on(device))
                ]
            )
            for tier in self.tiers.values():
                if device is not None and (tier.model is None or not tier.model.on(device)):
                    continue
                if tier.model is not None and tier.alias_of is None:
                    out = await self._unload_locked(tier, reason, measure=False)
                    unloaded += out.unloaded
                    held += out.held_mb
                    settling = settling or out.settling
            await anyio.to_thread.run_sync(flush_gpu_memory)
            freed = max(0.0, await self._free_mb(device) - before) if unloaded else 0.0
            return UnloadResult(unloaded, round(freed, 1), round(held, 1), settling)

    async def _unload_locked(
        self, tier: TierState, reason: str, *, measure: bool = True, device: str | None = None
    ) -> UnloadResult:
        model = tier.model
        if model is None:
            return UnloadResult()
        if tier.alias_of is not None:
            tier.model, tier.alias_of, tier.status = None, None, "unloaded"
            return UnloadResult([tier.name])
        device = device or model.device
        await self._drain([model])
        view = await self.placement.view(device=device)
        before = view.budget.driver_free_mb
        sharing = [t for t in self.tiers.values() if t.model is model]
        for t in sharing:
            t.status = "unloading"
        try:
            await model.worker.stop(self.settings.models.unload_timeout_s)
        finally:
            for t in sharing:
                t.model, t.alias_of, t.status = None, None, "unloaded"
        names = [t.name for t in sharing]
        tier.unloads += 1
        for t in sharing:
            self._publish("model.unloaded", t)
        settling = False
        if model.device != CPU and model.n_gpu_layers:
            settling = not await self._released(model, view.snapshot)
        held = sum(r.mb for r in model.reservations)
        for r in model.all_reservations:
            self.ledger.release(r)
        freed = max(0.0, await self._free_mb(device) - before) if measure else 0.0
        log.info(
            "Model unloaded: tier=%s reason=%s held=%.0fMB freed=%.0fMB",
            tier.name,
            reason,
            held,
            freed,
        )
        return UnloadResult(names, round(freed, 1), round(held, 1), settling)

    async def _drain(self, models: list[LoadedModel]) -> None:
        """Stop handing ``models`` out, then wait for their leases to come back (up to
        DRAIN_TIMEOUT_S together). New requests for them wait for the reload under the
        load lock, or fall back along their chain."""
        for m in models:
            m.draining = True
            for t in self.tiers.values():
                if t.model is m:
                    t.status = "draining"
        busy = [m for m in models if m.active]
        if not busy:
            return
        log.info(
            "Draining %s: %d request(s) in flight",
            ", ".join(m.key for m in busy),
            sum(m.active for m in busy),
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                for m in busy:
                    await m.idle.wait()
        for m in busy:
            if m.active:
                log.warning(
                    "Model %s still had %d request(s) in flight after %g s: ending it anyway",
                    m.key,
                    m.active,
                    DRAIN_TIMEOUT_S,
                )

    async def _released(self, model: LoadedModel, before: MemorySnapshot) -> bool:
        """Wait until the driver shows ``model``'s memory back, by the evidence its load
        settled from: NVML no longer listing its pid, or (in a container, where NVML never
        listed it) the device's used figure falling from ``before``. False when unconfirmed:
        no such evidence (its load kept the estimate), or not seen in time."""
        mem = self.settings.memory
        if model.settled_from == "nvml_process":
            drop = None
        elif model.settled_from == "device_delta":
            gpu = before.gpu(gpu_index(model.device))
            if gpu is None:
                return False
            drop = DeviceDrop(gpu.index, gpu.used_mb, model.reservation.mb)
        else:
            return False
        released = await wait_gpu_memory_released(
            self.probe, model.pid, mem.recovery_wait_s, mem.recovery_poll_s, drop=drop
        )
        return released is True

    async def _free_mb(self, device: str | None = None) -> float:
        """Driver-reported free memory on ``device`` (default: the first; RAM available on
        the CPU)."""
        return (await self.placement.view(device=device)).budget.driver_free_mb
