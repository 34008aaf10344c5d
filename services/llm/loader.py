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

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from services.errors import ModelLoadFailed
from services.llm.failures import LoadFailure
from services.llm.records import LoadAttempt, LoadedModel, TierState
from services.llm.settle import Settlement, before_load, measure_load
from services.llm.worker import LlamaWorker, WorkerSpec, WorkerStartFailed
from services.memory import gguf_estimate
from services.memory.devices import LoadOption, SplitPlan, choose_load_device, split_plan
from services.memory.gguf_estimate import (
    MB,
    Estimate,
    GGUFInfo,
    InvalidModelFile,
    estimate,
    projector_dim,
    read_gguf_info,
)
from services.memory.ledger import CPU, Reservation
from services.memory.placement import (
    Placement,
    estimate_on,
    load_need_mb,
    load_ram_need_mb,
    load_rungs,
    overhead_key,
    start_rung,
)
from services.memory.probe import MemorySnapshot
from services.settings import Settings

log = logging.getLogger("edison.models")

OnExit = Callable[[LlamaWorker, int], None]


def projector_need_mb(path: Path) -> float:
    """What a vision projector (mmproj GGUF) needs where it loads, in MB.

    HOOK for ``gguf_estimate.projector_mb`` (its weights and its image encoder's compute
    buffer, sized per family): used when that function exists, else the file's size,
    which is its weights. Blocking (reads the file): run it in a thread.
    """
    sized = getattr(gguf_estimate, "projector_mb", None)
    if callable(sized):
        return float(sized(path))
    return Path(path).stat().st_size / MB


@dataclass(frozen=True)
class DeviceCandidate:
    """A device a load may go to; ``evicts`` is the heavy tier that must leave it first,
    giving back ``extra_mb``."""

    device: str
    extra_mb: float = 0.0
    evicts: str | None = None


@dataclass(frozen=True)
class LoadPlan:
    """Where a load goes, and why (logged as ``placed on ... because ...``)."""

    device: str  # where the ledger books it; the first card of a split
    because: str
    evicts: tuple[str, ...] = ()  # heavy tiers to unload first
    split: SplitPlan | None = None
    split_rung: int = 0
    fits: bool = True  # False: only a CPU rung is left on the device (unknown: True)
    info: GGUFInfo | None = field(default=None, repr=False)  # the header, when plan read it


class LadderLoader:
    """Starts workers for tiers; one per ModelManager."""

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

    async def _info(self, tier: TierState) -> GGUFInfo:
        """The model's GGUF header, and its projector checked against it (a projector
        whose embeddings have another width fails every image chat, llama.cpp only says so
        at the first image): InvalidModelFile, recorded as an attempt, before any worker."""
        try:
            info = await anyio.to_thread.run_sync(read_gguf_info, Path(tier.cfg.path))
            clip = getattr(tier.cfg, "clip_path", None)
            dim = None if clip is None else await anyio.to_thread.run_sync(projector_dim, clip)
            if dim is not None and dim != info.n_embd:
                raise InvalidModelFile(
                    f"the projector {clip} makes {dim}-wide embeddings; the model "
                    f"{tier.cfg.path} takes {info.n_embd}-wide ones: not a pair",
                    path=str(clip),
                )
            return info
        except InvalidModelFile as exc:
            tier.attempts.append(LoadAttempt(-1, 0, 0, 0, False, exc.message, 0, "model"))
            raise

    async def _projector_mb(self, tier: TierState) -> float:
        """The tier's vision projector's need (0 without one); it lands where the layers
        do: in VRAM on a GPU rung, in RAM on a CPU rung."""
        clip = getattr(tier.cfg, "clip_path", None)
        if clip is None:
            return 0.0
        return await anyio.to_thread.run_sync(projector_need_mb, Path(clip))

    async def plan(
        self,
        tier: TierState,
        candidates: Sequence[DeviceCandidate],
        snap: MemorySnapshot,
        *,
        must_fit: bool = False,
    ) -> LoadPlan:
        """Where ``tier`` should load among ``candidates`` (see ``services/memory/devices``),
        decided on ``snap``: the device where its best rung fits now, or a split across
        GPUs when the tier allows it and no single one fits. One candidate: that one,
        without reading a thing unless ``must_fit`` asks whether a GPU rung fits there.
        """
        lone = len(candidates) == 1 and not must_fit
        if lone and not (tier.cfg.allow_split and candidates[0].device != CPU):
            c = candidates[0]
            return LoadPlan(c.device, "the only device", (c.evicts,) if c.evicts else ())
        info = await self._info(tier)
        projector = await self._projector_mb(tier)
        options, usable = [], {}
        for c in candidates:
            budget = self.placement.view_of(snap, device=c.device).budget
            usable[c.device] = budget.usable_mb + c.extra_mb
            rungs = self._rungs(tier, info, c.device)
            overhead = self.placement.worker_overhead_mb(c.device, self._backend(tier))
            start = start_rung(
                info,
                rungs,
                usable[c.device],
                c.device,
                overhead_mb=overhead + projector + self._cache_on(tier, c.device),
                what=tier.name,
                **self._slots(tier),
            )
            heavy = self.placement.heavy_tasks(c.device)
            # On a GPU a CPU rung (0 layers) always "fits" (it takes no VRAM): what counts
            # here is whether a rung with layers on the card does.
            fits = start.fits and (c.device == CPU or rungs[start.index][0] != 0)
            options.append(
                LoadOption(c.device, start.index, fits, usable[c.device], heavy, c.evicts)
            )
        choice = choose_load_device(options)
        gpus = [c for c in candidates if c.device != CPU]
        if not choice.option.fits and tier.cfg.allow_split and len(gpus) > 1:
            split = self._split(tier, info, gpus, usable, projector)
            if split is not None:
                return dataclasses.replace(split, info=info)
        evicts = (choice.option.evicts,) if choice.option.evicts else ()
        return LoadPlan(
            choice.option.device, choice.because, evicts, fits=choice.option.fits, info=info
        )

    def _slots(self, tier: TierState) -> dict[str, int]:
        """The estimate's ``slots`` for a llama-server tier (its KV cache per slot)."""
        models = self.settings.models
        if models.backend_of(tier.cfg) != "llama-server":
            return {}
        return {"slots": models.parallel_of(tier.cfg)}

    def _backend(self, tier: TierState) -> str:
        return self.settings.models.backend_of(tier.cfg)

    def _cache_ram_mb(self, tier: TierState) -> int | None:
        """llama-server's prompt-cache cap for this tier (None on llama-cpp-python)."""
        if self._backend(tier) != "llama-server":
            return None
        return self.settings.models.llama_server_cache_ram_mb

    def _cache_on(self, tier: TierState, device: str) -> float:
        """The prompt cache's share of the need on ``device``: it lives in RAM, so it
        counts in the need only on a CPU host (on a GPU host, in the RAM need)."""
        return float(self._cache_ram_mb(tier) or 0) if device == CPU else 0.0

    def _rungs(self, tier: TierState, info: GGUFInfo, device: str) -> list[tuple[int, int]]:
        cfg = tier.cfg
        return load_rungs(cfg.n_gpu_layers, cfg.n_ctx, self.settings.ladder, info, device)

    def _split(
        self,
        tier: TierState,
        info: GGUFInfo,
        gpus: Sequence[DeviceCandidate],
        usable: dict[str, float],
        projector: float = 0.0,
    ) -> LoadPlan | None:
        """The first GPU rung whose estimate the GPUs hold together, as a split plan."""
        backend = self._backend(tier)
        overhead = max(self.placement.worker_overhead_mb(c.device, backend) for c in gpus)
        for i, (n_layers, n_ctx) in enumerate(self._rungs(tier, info, gpus[0].device)):
            if n_layers == 0:
                break
            est = estimate(info, n_layers, n_ctx, **self._slots(tier))
            sp = split_plan(
                {c.device: usable[c.device] for c in gpus}, est.vram_mb + projector, overhead
            )
            if sp is not None:
                evicts = tuple(c.evicts for c in gpus if c.evicts and c.device in sp.devices)
                shares = ", ".join(
                    f"{d} {s:.0%}" for d, s in zip(sp.devices, sp.shares, strict=True)
                )
                why = f"no single GPU holds rung {i}: split across {shares}"
                return LoadPlan(sp.devices[0], why, evicts, split=sp, split_rung=i)
        return None

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
