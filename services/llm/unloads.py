"""Unloading LLM workers: one tier, a device's heavy slot, or every worker (on a device).

Part of the ModelManager (``manager.py``), which owns the tiers, the load lock and the
workers; kept here so each file holds one idea. Ending a worker's process is what gives
the driver its memory back; the ledger entries go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import anyio

from services.llm.records import TierState, UnloadResult
from services.memory.ledger import CPU, MemoryLedger
from services.memory.placement import Placement, flush_gpu_memory, wait_gpu_memory_released
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
        before = await self._free_mb(device) if measure else 0.0
        if model.active:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    await model.idle.wait()
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
            released = await wait_gpu_memory_released(
                self.probe,
                model.pid,
                self.settings.memory.recovery_wait_s,
                self.settings.memory.recovery_poll_s,
            )
            settling = released is not True  # unconfirmed: the driver's figure may lag
        held = sum(r.mb for r in model.reservations)
        for r in model.reservations:
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

    async def _free_mb(self, device: str | None = None) -> float:
        """Driver-reported free memory on ``device`` (default: the first; RAM available on
        the CPU)."""
        return (await self.placement.view(device=device)).budget.driver_free_mb
