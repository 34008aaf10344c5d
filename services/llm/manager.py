"""ModelManager: the one owner of every loaded LLM and every load.

Each model runs in its own worker process (``worker.py``: llama-server, or
``llama_cpp.server``); unloading ends the process, after which the driver really has the
memory back. Tiers: ``fast`` stays resident; ``medium``, ``deep``, ``reasoning`` and
``vision`` share the heavy slot (one at a time). A load walks the ladder of GPU layers x
context sizes (``loader.py``) from the rung that placement says fits, and every load
reserves its estimate in the memory ledger before it starts.

A request holds its model through a :class:`Lease`, released on every path (a stream's
client that disconnects before the first chunk included). A model being unloaded is
*draining*: it gets no new leases (requests wait for the reload, or fall back), and the
unload waits for the leases out (up to ``DRAIN_TIMEOUT_S``) before it ends the worker.

The gate, the chat endpoints, the swarm and /system/memory all go through this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from services.errors import (
    InsufficientMemory,
    ModelLoadFailed,
    ModelUnavailable,
    ResidencyHold,
    UnknownTier,
)
from services.events import EventBus
from services.llm.loader import LadderLoader
from services.llm.records import (
    FALLBACKS,
    EagerLoad,
    Lease,
    LoadedModel,
    Resolution,
    TierState,
    TierView,
)
from services.llm.settle import remeasure
from services.llm.slots import Candidates, heavy_slots, load_candidates
from services.llm.unloads import Unloads
from services.llm.worker import LlamaWorker
from services.memory.devices import UnloadCost
from services.memory.ledger import CPU
from services.memory.placement import Placement
from services.memory.probe import MemorySnapshot
from services.settings import HEAVY_TIERS, TIER_NAMES, BackendChoice, Settings

log = logging.getLogger("edison.models")


class ModelManager(Unloads):
    """One per app. Async API; blocking work (probes, GGUF reads) goes to threads."""

    def __init__(
        self,
        settings: Settings,
        placement: Placement,
        *,
        python: str = sys.executable,
        worker_env: dict[str, str] | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.settings = settings
        self.events = events
        self.placement = placement
        self.probe = placement.probe
        self.ledger = placement.ledger
        self.loader = LadderLoader(
            settings, placement, self._on_worker_exit, python=python, worker_env=worker_env
        )
        self.tiers: dict[str, TierState] = {
            name: TierState(name, cfg, name in HEAVY_TIERS)
            for name, cfg in settings.models.tiers().items()
        }
        # Why two locks: loads go one at a time (as Ollama's do), which keeps the
        # heavy-slot rule and each load's memory check true (_load_lock, held for a whole
        # ladder walk). Unloads and a load's decisions (which worker exists, evictions,
        # committing the loaded model) take _lock, which is never held across a walk:
        # an unload the gate needs never waits for worker starts. Both are asyncio
        # locks; requests to loaded models and /system/memory wait on neither.
        self._load_lock = asyncio.Lock()
        self._lock = asyncio.Lock()
        self._closing = False
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # The residency rule's clock and wait (tests give their own).
        self.clock: Callable[[], float] = time.time
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        choice = self.backend_choice()
        log.log(
            logging.WARNING if choice.fallback else logging.INFO,
            "LLM backend: %s (%s)",
            choice.backend,
            choice.because,
        )

    # ---- views ---------------------------------------------------------------------
    @property
    def heavy_slot(self) -> str | None:
        """The heavy tier loaded (the first, when several devices each hold one)."""
        for t in self.tiers.values():
            if t.heavy and t.model is not None and t.alias_of is None:
                return t.name
        return None

    def heavy_slots(self) -> dict[str, str]:
        """Each device's heavy slot: device -> the heavy tier loaded there."""
        return heavy_slots(self.tiers.values())

    def models_on(self, device: str) -> list[LoadedModel]:
        """The running workers placed on ``device``."""
        return [m for m in self.loaded_models() if m.on(device)]

    def unload_cost(self, device: str) -> UnloadCost:
        """What unloading the workers holding memory on ``device`` would cost (the gate's
        and placement's view of them)."""
        held = [
            (m.key, sum(r.mb for r in m.reservations if r.device == device), m.ready_ms)
            for m in self.models_on(device)
        ]
        held = [(key, mb, ms) for key, mb, ms in held if mb > 0]
        light = any(key not in HEAVY_TIERS for key, _, _ in held)  # the fast tier
        reload_s = sum(ms for _, _, ms in held) / 1000
        return UnloadCost(light, len(held), sum(mb for _, mb, _ in held), reload_s)

    def restore_soon(self, tiers: Iterable[str]) -> None:
        """Bring back in the background the tiers among ``tiers`` that stay resident (the
        light tier); a heavy tier comes back when a request asks for it."""
        for key in tiers:
            tier = self.tiers.get(key)
            if tier is not None and not tier.heavy:
                self.ensure_loaded_soon(key)

    def loaded_models(self) -> list[LoadedModel]:
        """Every running worker's model (a tier served by another's worker counts once)."""
        return [t.model for t in self.tiers.values() if t.model and not t.alias_of]

    def describe(self) -> list[TierView]:
        return [t.view() for t in self.tiers.values()]

    def tier_view(self, key: str) -> TierView:
        return self._tier(key).view()

    def backend_choice(self) -> BackendChoice:
        """The worker backend of tiers without their own, and why (``auto`` resolved)."""
        return self.settings.models.backend_choice()

    def leases(self) -> int:
        """Requests holding a model now (every running worker's together)."""
        return sum(m.active for m in self.loaded_models())

    def loads_total(self) -> int:
        return sum(t.loads for t in self.tiers.values())

    def _publish(self, type_: str, tier: TierState) -> None:
        if self.events is not None:
            self.events.publish(type_, tier.view())

    def _tier(self, key: str) -> TierState:
        if key not in self.tiers:
            raise UnknownTier(
                f"Unknown tier {key!r}; configured tiers: {', '.join(self.tiers) or 'none'}",
                tier=key,
                tiers=list(self.tiers),
            )
        return self.tiers[key]

    # ---- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_idle(), name="edison-idle-reaper")

    async def shutdown(self) -> None:
        self._closing = True  # a walk still under way ends its worker when it is done
        if self._reaper:
            self._reaper.cancel()
        for task in list(self._background):
            task.cancel()
        await self.unload_all(reason="shutdown")

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run coro in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def load_llm_models(self) -> list[EagerLoad]:
        """The eager loader: fast -> medium -> deep -> reasoning -> vision, as far as
        ``preload``, memory and the heavy slot allow. Returns what happened per tier."""
        outcome: dict[str, str] = {}
        for name in TIER_NAMES:
            tier = self.tiers.get(name)
            if tier is None:
                continue
            if not tier.cfg.preload:
                outcome[name] = "on demand"
                continue
            if tier.heavy and not await self._free_heavy_device(tier):
                outcome[name] = f"skipped: heavy slot holds {self.heavy_slot}"
                continue
            try:
                await self.load(name, reason="startup")
                outcome[name] = "loaded"
            except Exception as exc:  # noqa: BLE001 - one tier failing must not stop the others
                outcome[name] = f"failed: {exc}"
        log.info("Eager load: %s", ", ".join(f"{k}={v}" for k, v in outcome.items()))
        return [EagerLoad(tier, what) for tier, what in outcome.items()]

    # ---- loading -------------------------------------------------------------------
    async def load(self, key: str, *, reason: str = "request") -> LoadedModel:
        """Load a tier (evicting a heavy slot's occupant if needed) and return its model."""
        model, _ = await self._load(self._tier(key), reason, chat=False)
        return model

    async def _load(self, tier: TierState, reason: str, *, chat: bool) -> tuple[LoadedModel, float]:
        """Load ``tier``; return its model and the seconds waited for a heavy model's
        residency (``chat``: the residency rule applies, see ``_load_locked``)."""
        model = tier.model
        if self._serving_now(tier):
            assert model is not None
            return model, 0.0  # the common case never waits behind another tier's load
        waited = 0.0
        while True:
            async with self._load_lock:
                try:
                    return await self._load_locked(tier, reason, chat=chat), waited
                except ResidencyHold as hold:
                    limit = self.settings.models.max_residency_wait_s
                    if waited + hold.wait_s > limit + 1e-9:
                        raise
                    wait, why = hold.wait_s, hold.message
            log.info("Load of %s waits %.1f s: %s", tier.name, wait, why)
            await self.sleep(wait)
            waited += wait

    async def _free_heavy_device(self, tier: TierState) -> bool:
        """True when some device ``tier`` may use has an empty heavy slot."""
        snap = await self.placement.snapshot()
        slots = self.heavy_slots()
        return any(
            slots.get(d) in (None, tier.name) for d in self.placement.allowed(snap, tier.cfg.device)
        )

    async def _candidates(
        self, tier: TierState, *, chat: bool
    ) -> tuple[Candidates, MemorySnapshot]:
        """The devices ``tier`` may load on now (see ``slots.load_candidates``), and the
        snapshot that was decided on."""
        snap = await self.placement.snapshot()
        where = load_candidates(
            tier,
            self.tiers,
            self.placement.allowed(snap, tier.cfg.device),
            now=self.clock(),
            min_residency_s=self.settings.models.min_residency_s,
            residency=chat and len(self.placement.devices(snap)) > 1,
        )
        return where, snap

    def _serving_now(self, tier: TierState) -> bool:
        """True when ``tier`` has a live worker that takes new requests (not draining)."""
        m = tier.model
        return m is not None and tier.status == "loaded" and m.worker.alive and not m.draining

    async def _load_locked(self, tier: TierState, reason: str, *, chat: bool) -> LoadedModel:
        """Under _load_lock: decide and evict under _lock, walk the ladder without it,
        commit under it again."""
        async with self._lock:  # an unload under way (a drain) finishes first
            if tier.model is not None and tier.model.worker.alive and not tier.model.draining:
                return tier.model
            twin = self._twin(tier)
            if twin is not None:
                tier.model, tier.alias_of, tier.status = twin.model, twin.name, "loaded"
                log.info(
                    "Model %s served by the %s worker (same file, context, layers)",
                    tier.name,
                    twin.name,
                )
                return twin.model  # type: ignore[return-value]
            plan, snap = await self._plan(tier, chat=chat)
            for occupant in plan.evicts:
                await self._unload_locked(
                    self.tiers[occupant], f"heavy slot on {plan.device} wanted by {tier.name}"
                )
            tier.status = "loading"
            self._publish("model.loading", tier)
        try:
            # An eviction changed memory since the snapshot: then the load probes anew.
            model = await self.loader.load(tier, plan, None if plan.evicts else snap)
        except Exception as exc:
            tier.status = "failed"
            tier.last_error = getattr(exc, "message", None) or str(exc)
            self._publish("model.failed", tier)
            raise
        async with self._lock:
            if self._closing:
                await model.worker.stop(self.settings.models.unload_timeout_s)
                for r in model.all_reservations:
                    self.ledger.release(r)
                tier.status = "unloaded"
                raise ModelUnavailable(f"{tier.name} loaded while Edison was shutting down")
            tier.model, tier.status = model, "loaded"
            tier.loads += 1
            self._publish("model.loaded", tier)
        log.info(
            "Model loaded: tier=%s reason=%s rung=%d layers=%d ctx=%d device=%s "
            "estimate=%.0fMB measured=%s rss=%s ready=%.0fms",
            tier.name,
            reason,
            model.rung,
            model.n_gpu_layers,
            model.n_ctx,
            model.device,
            model.vram_estimate_mb if model.device != CPU else model.ram_estimate_mb,
            "n/a" if model.vram_measured_mb is None else f"{model.vram_measured_mb:.0f}MB",
            "n/a" if model.rss_mb is None else f"{model.rss_mb:.0f}MB",
            model.ready_ms,
        )
        return model

    async def _plan(self, tier: TierState, *, chat: bool) -> tuple[Any, MemorySnapshot]:
        """Where ``tier`` loads (``loader.plan``) and the snapshot decided on; records a
        failure to plan as the tier's last error."""
        before = tier.last_error, tier.attempts
        tier.last_error, tier.attempts = None, []
        try:
            where, snap = await self._candidates(tier, chat=chat)
            must_fit = where.hold is not None
            plan = await self.loader.plan(tier, where.devices, snap, must_fit=must_fit)
            if where.hold is not None and not plan.fits:
                # Another device is free but holds only a CPU rung: wait for the young
                # model's residency (or fall back) rather than load slowly beside it.
                raise where.hold
        except ResidencyHold:
            tier.last_error, tier.attempts = before  # nothing was tried
            raise
        except Exception as exc:
            tier.last_error = getattr(exc, "message", None) or str(exc)
            raise
        return plan, snap

    def _serving(self, tier: TierState) -> tuple[str, int, str | int]:
        """What else must match for one worker to serve two tiers: backend, slots, device."""
        cfg = tier.cfg
        models = self.settings.models
        return (models.backend_of(cfg), models.parallel_of(cfg), cfg.device)

    def _twin(self, tier: TierState) -> TierState | None:
        for other in self.tiers.values():
            if (
                other is not tier
                and other.model is not None
                and other.alias_of is None
                and other.model.worker.alive
                and Path(other.cfg.path).resolve() == Path(tier.cfg.path).resolve()
                and (other.cfg.n_ctx, other.cfg.n_gpu_layers)
                == (tier.cfg.n_ctx, tier.cfg.n_gpu_layers)
                and self._serving(other) == self._serving(tier)
            ):
                return other
        return None

    def _on_worker_exit(self, worker: LlamaWorker, code: int) -> None:
        """A worker died on its own (crash, OOM kill, kill -9): mark its tiers unloaded."""
        for tier in self.tiers.values():
            if tier.model is not None and tier.model.worker is worker:
                if tier.alias_of is None:
                    for r in tier.model.all_reservations:
                        self.ledger.release(r)
                tier.model, tier.alias_of, tier.status = None, None, "unloaded"
                tier.last_error = f"worker exited with code {code}: {worker.stderr_tail(3)[-300:]}"
                log.warning(
                    "Model %s worker (pid %s) died with code %d", tier.name, worker.pid, code
                )
                self._publish("model.unloaded", tier)

    # ---- using ---------------------------------------------------------------------
    async def resolve(self, key: str, *, fallback: bool = True) -> Resolution:
        """Load ``key`` (or the first tier of its fallback chain that loads) and return it."""
        if key not in TIER_NAMES:
            self._tier(key)  # raises UnknownTier listing the configured tiers
        chain = [key, *FALLBACKS[key]] if fallback else [key]
        reasons: list[str] = []
        for name in chain:
            if name not in self.tiers:
                reasons.append(f"{name}: not configured")
                continue
            try:
                model, waited = await self._load(self.tiers[name], "request", chat=True)
            except (ModelLoadFailed, InsufficientMemory, ResidencyHold) as exc:
                reasons.append(f"{name}: {exc.message}")
                continue
            why = "; ".join(reasons) if name != key else None
            return Resolution(key, name, model, why, round(waited, 3) if waited else None)
        if key not in self.tiers and not fallback:
            self._tier(key)
        raise ModelUnavailable(
            f"No tier could serve {key!r}: " + "; ".join(reasons), tier=key, tried=chain
        )

    async def acquire(self, key: str, *, fallback: bool = True) -> Lease:
        """Resolve a tier and lease its model: it is not evicted until the lease is
        released (an eviction waits up to DRAIN_TIMEOUT_S for leases out). The caller
        must release it on every path; ``release`` is idempotent and never waits."""
        for _ in range(3):  # a worker may die (or start draining) between load and lease
            res = await self.resolve(key, fallback=fallback)
            model = res.model
            # No await between these checks and the lease: an unload that starts draining
            # after them sees this request in flight.
            if model.worker.alive and self.tiers[res.tier].model is model and not model.draining:
                break
        else:
            raise ModelUnavailable(f"The {res.tier} worker kept going away right after loading")
        model.active += 1
        model.idle.clear()
        return Lease(res, model)

    @contextlib.asynccontextmanager
    async def use(self, key: str, *, fallback: bool = True) -> AsyncIterator[Resolution]:
        """:meth:`acquire` as a block: the lease ends with it."""
        lease = await self.acquire(key, fallback=fallback)
        try:
            yield lease.resolution
        finally:
            lease.release()

    async def settle_projector(self, model: LoadedModel) -> None:
        """After a worker's first image: measure it again now that llama-cpp-python has
        loaded its projector, and book that instead of the projector's estimate (kept when
        the load's evidence cannot be read again: see ``settle.remeasure``)."""
        if not model.projector_pending_mb:
            return
        model.projector_pending_mb = 0.0
        on_gpu = model.device != CPU and model.n_gpu_layers != 0
        mb = await remeasure(self.placement, model.pid, model.settled_from, on_gpu=on_gpu)  # type: ignore[arg-type]
        booked = model.reservation if on_gpu or model.device == CPU else model.ram_reservation
        if mb is None or booked is None or not model.worker.alive:
            return
        self.ledger.settle(booked, mb)
        log.info("Model %s settled at %.0f MB once its projector loaded", model.key, mb)

    def ensure_loaded_soon(self, key: str) -> None:
        """Bring a tier back in the background (used after heavy tasks)."""
        tier = self.tiers.get(key)
        if tier is None or tier.model is not None or tier.status == "loading":
            return

        async def reload() -> None:
            try:
                await self.load(key, reason="reload after heavy task")
            except Exception as exc:  # noqa: BLE001 - logged; the next request retries
                log.warning("Background reload of %s failed: %s", key, exc)

        self.spawn(reload(), f"edison-reload-{key}")

    async def _reap_idle(self) -> None:
        """Unload heavy models idle longer than their keep_alive (never fast by default)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for tier in self.tiers.values():
                m = tier.model
                keep = tier.cfg.keep_alive_s
                if keep is None:
                    keep = self.settings.models.heavy_keep_alive_s if tier.heavy else 0
                if m is None or tier.alias_of or m.active or keep <= 0:
                    continue
                if now - m.last_used_at >= keep:
                    with contextlib.suppress(Exception):
                        await self.unload(tier.name, reason=f"idle {keep:g} s")
