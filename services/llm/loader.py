"""Loading one tier: walk the ladder of GPU layers x context sizes from the rung that fits.

Placement (``services/memory/placement.py``) picks the start rung from the GGUF-header
estimate and what is usable now; this module starts a worker at that rung, and when it
failed for want of memory (``failures.py``) at the next one, until one is ready; any
other failure fails the tier at once, with its reason. Every attempt reserves its need in
the ledger first (its VRAM, and on a GPU host its RAM too) and settles it to the best
evidence once the worker is up (``settle.py``). The ModelManager calls
:meth:`LadderLoader.load` under its load lock, not under the lock unloads take.

What a load needs beyond the GGUF estimate: the worker's overhead (learned), a vision
projector (:func:`projector_need_mb`), and llama-server's prompt cache in RAM
(``models.llama_server_cache_ram_mb``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio

from services.errors import ModelLoadFailed
from services.llm.failures import LoadFailure
from services.llm.planner import (
    DeviceCandidate,
    LoadPlan,
    LoadPlanning,
    projector_need_mb,
)
from services.llm.records import LoadAttempt, LoadedModel, TierState
from services.llm.settle import Settlement, before_load, measure_load
from services.llm.worker import LlamaWorker, WorkerSpec, WorkerStartFailed
from services.memory.devices import SplitPlan
from services.memory.gguf_estimate import (
    Estimate,
    GGUFInfo,
    estimate,
)
from services.memory.ledger import CPU, Reservation
from services.memory.placement import (
    Placement,
    estimate_on,
    load_need_mb,
    load_ram_need_mb,
    overhead_key,
    start_rung,
)
from services.memory.probe import MemorySnapshot
from services.settings import Settings

log = logging.getLogger("edison.models")

OnExit = Callable[[LlamaWorker, int], None]


__all__ = ["DeviceCandidate", "LadderLoader", "LoadPlan", "projector_need_mb"]


class LadderLoader(LoadPlanning):
    """Starts workers for tiers; one per ModelManager. Planning: ``planner.py``."""

    def __init__(
        self,
        settings: Settings,
        placement: Placement,
        on_exit: OnExit,
        *,
        python: str = sys.executable,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.placement = placement
        self.ledger = placement.ledger
        self.on_exit = on_exit
        self.python = python
        self.worker_env = worker_env

    async def load(
        self, tier: TierState, plan: LoadPlan | None = None, snap: MemorySnapshot | None = None
    ) -> LoadedModel:
        """Load ``tier`` as ``plan`` says (default: on the first device), at the first rung
        that fits, walking down on failures for want of memory. ``snap``: a snapshot still
        current (nothing unloaded since), so the start rung needs no new probe.

        Appends each attempt to ``tier.attempts``; raises InvalidModelFile (a file that
        cannot be loaded at any rung), InsufficientMemory (nothing fits in RAM on a
        CPU-only host) or ModelLoadFailed (every rung failed for want of memory, or one
        failed for another reason: that one's reason).
        """
        info = plan.info if plan and plan.info else await self._info(tier)  # read once
        projector = await self._projector_mb(tier)
        device = plan.device if plan else None
        if snap is not None:
            view = self.placement.view_of(snap, device=device)
        else:
            view = await self.placement.view(device=device)
        device = view.device
        rungs = self._rungs(tier, info, device)
        overhead = self.placement.worker_overhead_mb(device, self._backend(tier))
        extra = projector + self._cache_on(tier, device)
        if plan is not None and plan.split is not None:
            model = await self._try_split(tier, info, rungs, plan, overhead, projector)
            if model is not None:
                return model
            if not tier.attempts[-1].walks:
                raise self._failed(tier)
            view = await self.placement.view(device=device)
        start = start_rung(
            info,
            rungs,
            view.budget.usable_mb,
            device,
            overhead_mb=overhead + extra,
            what=tier.name,
            **self._slots(tier),
        )
        if start.index:
            log.info(
                "Load of %s starts at rung %d (layers=%d, ctx=%d): %.0f MB usable on %s",
                tier.name,
                start.index,
                *rungs[start.index],
                start.usable_mb,
                device,
            )
        for i in range(start.index, len(rungs)):
            n_layers, n_ctx = rungs[i]
            est = estimate(info, n_layers, n_ctx, **self._slots(tier))
            need = load_need_mb(est, device, overhead + extra)
            because = plan.because if plan is not None else "the only device"
            model = await self._try_rung(
                tier, i, n_layers, n_ctx, est, need, device, because=because, projector=projector
            )
            if model is not None:
                return model
            if not tier.attempts[-1].walks:
                break  # not for want of memory: every smaller rung would fail the same way
        raise self._failed(tier)

    @staticmethod
    def _failed(tier: TierState) -> ModelLoadFailed:
        last = tier.attempts[-1]
        tried = "; ".join(
            f"rung {a.rung} (layers={a.n_gpu_layers}, ctx={a.n_ctx}): {a.reason}"
            for a in tier.attempts
        )
        if last.walks:
            head = "every rung failed for want of memory"
        else:
            head = f"{last.failure} failure, smaller rungs not tried"
        return ModelLoadFailed(
            f"Could not load {tier.name}: {head}. {tried}",
            tier=tier.name,
            failure=last.failure,
            attempts=[a.__dict__ for a in tier.attempts],
        )

    async def _try_split(
        self,
        tier: TierState,
        info: GGUFInfo,
        rungs: list[tuple[int, int]],
        plan: LoadPlan,
        overhead: float,
        projector: float,
    ) -> LoadedModel | None:
        split = plan.split
        assert split is not None
        n_layers, n_ctx = rungs[plan.split_rung]
        est = estimate(info, n_layers, n_ctx, **self._slots(tier))
        return await self._try_rung(
            tier,
            plan.split_rung,
            n_layers,
            n_ctx,
            est,
            split.need_mb[0],
            plan.device,
            split,
            plan.because,
            projector=projector,
        )

    def _spec(
        self, tier: TierState, n_layers: int, n_ctx: int, device: str, split: SplitPlan | None
    ) -> WorkerSpec:
        cfg = tier.cfg
        models = self.settings.models
        devices = split.devices if split is not None else (device,)
        on_gpu = device != CPU and n_layers != 0
        return WorkerSpec(
            key=tier.name,
            model_path=Path(cfg.path),
            n_gpu_layers=n_layers if device != CPU else 0,
            n_ctx=n_ctx,
            n_threads=models.n_threads,
            chat_format=cfg.chat_format,
            clip_path=getattr(cfg, "clip_path", None),
            devices=tuple(int(d.split(":")[1]) for d in devices) if on_gpu else None,
            tensor_split=split.shares if split is not None else None,
            backend=models.backend_of(cfg),  # type: ignore[arg-type]
            parallel=models.parallel_of(cfg),
            binary=models.llama_server_binary,
            cache_ram_mb=self._cache_ram_mb(tier),
        )

    def _fail_attempt(
        self,
        tier: TierState,
        rung: int,
        n_layers: int,
        n_ctx: int,
        need_mb: float,
        failure: LoadFailure,
        ms: float,
    ) -> None:
        tier.attempts.append(
            LoadAttempt(rung, n_layers, n_ctx, need_mb, False, failure.reason, ms, failure.kind)
        )
        log.warning(
            "Load attempt failed: tier=%s rung=%d layers=%d ctx=%d (%s): %s",
            tier.name,
            rung,
            n_layers,
            n_ctx,
            failure.kind,
            failure.reason,
        )

    async def _ram_short(self, ram_need: float) -> str | None:
        """Why RAM cannot hold ``ram_need`` MB now (None: it can). The RAM side of a load
        on a GPU host: a CPU rung holds the whole model there."""
        budget = (await self.placement.view(device=CPU)).budget
        if ram_need <= budget.usable_mb:
            return None
        return f"not enough RAM: needs {ram_need:.0f} MB, {budget.usable_mb:.0f} MB usable"

    async def _try_rung(
        self,
        tier: TierState,
        rung: int,
        n_layers: int,
        n_ctx: int,
        est: Estimate,
        need_mb: float,
        device: str,
        split: SplitPlan | None = None,
        because: str = "the only device",
        *,
        projector: float = 0.0,
    ) -> LoadedModel | None:
        cfg = tier.cfg
        devices = split.devices if split is not None else (device,)
        on_gpu = device != CPU and n_layers != 0
        spec = self._spec(tier, n_layers, n_ctx, device, split)
        # On a GPU host the RAM side is booked too: all of it on a CPU rung.
        cache = float(spec.cache_ram_mb or 0)
        ram_need = load_ram_need_mb(est, device, extra_mb=cache + (0.0 if on_gpu else projector))
        if ram_need:
            short = await self._ram_short(ram_need)
            if short is not None:
                failure = LoadFailure("memory", short)
                self._fail_attempt(tier, rung, n_layers, n_ctx, need_mb, failure, 0.0)
                return None
        log.info(
            "Load of %s placed on %s because %s",
            tier.name,
            "+".join(devices),
            because,
        )
        res = self.ledger.reserve(device, need_mb, f"model:{tier.name}", "model")
        others = [
            self.ledger.reserve(d, mb, f"model:{tier.name}", "model")
            for d, mb in zip(devices[1:], split.need_mb[1:] if split else (), strict=False)
        ]
        ram_res = (
            self.ledger.reserve(CPU, ram_need, f"model:{tier.name}", "model") if ram_need else None
        )
        ours = (res, *others)
        held = (*ours, ram_res)
        worker = LlamaWorker(spec, python=self.python, on_exit=self.on_exit, env=self.worker_env)
        t0 = time.perf_counter()
        try:
            before = await before_load(self.placement, devices if on_gpu else (), ours)
            await worker.start(self.settings.models.load_timeout_s)
        except WorkerStartFailed as exc:
            for r in held:
                self.ledger.release(r)
            failure = exc.failure
            if exc.timed_out:
                t = self.settings.models.load_timeout_s
                failure = LoadFailure(failure.kind, f"not ready within {t:g} s")
            ms = (time.perf_counter() - t0) * 1000
            self._fail_attempt(tier, rung, n_layers, n_ctx, need_mb, failure, ms)
            return None
        except BaseException:
            for r in held:
                self.ledger.release(r)
            await worker.stop(self.settings.models.unload_timeout_s)
            raise
        ms = (time.perf_counter() - t0) * 1000
        assert worker.pid is not None
        shares = split.shares if split is not None else None
        got = await measure_load(
            self.placement, worker.pid, devices, ours, before, shares=shares, on_gpu=on_gpu
        )
        # llama-cpp-python loads a projector at the first image, after this measure: its
        # estimate stays booked until then (ModelManager.settle_projector).
        pending = projector if projector and spec.backend == "llama-cpp-python" else 0.0
        await self._settle(tier, est, spec, device, got, res, ours, ram_res, pending, projector)
        tier.attempts.append(LoadAttempt(rung, n_layers, n_ctx, need_mb, True, "ready", ms))
        now = time.time()
        model = LoadedModel(
            key=tier.name,
            path=str(cfg.path),
            n_gpu_layers=spec.n_gpu_layers,
            n_ctx=n_ctx,
            vram_estimate_mb=round(need_mb if device != CPU else 0.0, 1),
            vram_measured_mb=None if got.gpu_measured_mb is None else round(got.gpu_measured_mb, 1),
            rss_mb=got.rss_mb,
            pid=worker.pid,
            port=worker.port,
            rung=rung,
            loaded_at=now,
            last_used_at=now,
            heavy=tier.heavy,
            device=device,
            ram_estimate_mb=round(need_mb if device == CPU else ram_need, 1),
            ready_ms=round(worker.ready_ms, 1),
            worker=worker,
            reservation=res,
            split_reservations=tuple(others),
            devices=devices if on_gpu else (device,),
            backend=spec.backend,
            parallel=spec.parallel,
            slot_ctx=worker.slot_ctx,
            settled_from=got.source,
            projector_mb=round(projector, 1),
            ram_reservation=ram_res,
            projector_pending_mb=pending,
        )
        model.idle.set()
        return model

    async def _settle(
        self,
        tier: TierState,
        est: Estimate,
        spec: WorkerSpec,
        device: str,
        got: Settlement,
        res: Reservation,
        ours: Sequence[Reservation],
        ram_res: Reservation | None,
        pending: float,
        projector: float,
    ) -> None:
        """Book what the load measured (``settle.py``), and learn the worker's overhead
        from it: what it took beyond its estimate, the projector left out. What has not
        been allocated yet stays booked on top: a projector still to load (``pending``)
        and llama-server's prompt cache, which grows in RAM up to its cap."""
        if got.source == "rss":
            assert got.rss_mb is not None
            booked = res if device == CPU else ram_res
            if booked is not None:
                cache = float(spec.cache_ram_mb or 0)
                self.ledger.settle(booked, got.rss_mb + pending + cache)
            measured = got.rss_mb if device == CPU else None
        elif got.source in ("nvml_process", "device_delta"):
            for r, mb in zip(ours, got.mb, strict=True):
                self.ledger.settle(r, mb + (pending if r is res else 0.0))
            measured = got.gpu_measured_mb if len(ours) == 1 else None
        else:
            measured = None
        if measured is not None and (device == CPU or spec.n_gpu_layers):
            learned = self.placement.learned
            key = overhead_key(device, self._backend(tier))
            loaded_projector = projector - pending
            if learned.record_worker_load(
                key, estimate_on(est, device), measured - loaded_projector
            ):
                await anyio.to_thread.run_sync(learned.save)
