"""The pipeline hosts, one per kind: loaded on first use, kept while memory allows.

The registry runs every pipeline call itself (in a worker thread), so it knows which
pipelines are running: the gate may unload only the idle ones, and the idle reaper
never releases a pipeline under a run. It also keeps the memory books of pipelines:
what a request is predicted to need (sized from the folder's config, learned from
measured runs), each run's measured peak, and a ledger entry for each loaded pipeline's
resident memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable

import anyio

from services.errors import ModelUnavailable
from services.generation.capabilities import PipelineCaps, choose_dtype, read_caps
from services.generation.params import GenerationParams, RunResult
from services.generation.pipelines import PipelineHost, PipelineInfo
from services.generation.placement_ladder import (
    Context,
    RungLadder,
    RungOption,
    RungPlan,
    RungUnsupported,
)
from services.generation.placement_sizes import PipelineSizes, read_sizes
from services.generation.rung_needs import LadderRequest, build_ladder, rung_key
from services.generation.rung_speeds import RungSpeeds
from services.generation.sizing import PipelineShape, RequestSize, read_shape, request_size
from services.memory.learning import Prediction
from services.memory.ledger import CPU, Reservation
from services.memory.placement import Placement, TaskNeed
from services.settings import KINDS, PipelineSettings, Settings

log = logging.getLogger("edison.generation")

HostKey = tuple[str, str]  # (kind, device)


@dataclasses.dataclass(frozen=True)
class PredictedNeed:
    """A request's need on a device, and the prediction behind it."""

    need: TaskNeed
    prediction: Prediction
    size: RequestSize
    key: str  # the memory model it came from: folder|dtype|device (|rung below full)
    rung: str = "full"  # the placement rung it is the need of


class PipelineRegistry:
    """One per app. Async API; every blocking call goes to a thread."""

    def __init__(
        self,
        settings: Settings,
        placement: Placement,
        *,
        run_device: Callable[[str], str] | None = None,
    ) -> None:
        self.settings = settings
        self.placement = placement
        self.learned = placement.learned
        # One host per kind and device: with several GPUs, two image tasks run at once.
        self.hosts: dict[HostKey, PipelineHost] = {}
        self._shapes: dict[str, PipelineShape] = {}
        self._caps: dict[str, PipelineCaps] = {}
        self._sizes: dict[str, PipelineSizes] = {}  # each folder's components (headers)
        self.speeds = RungSpeeds(settings.memory.state_dir)
        # Why a set and no lock: only the event loop reads and writes it; a thread runs
        # the pipeline while its key is in it.
        self._running: set[HostKey] = set()
        self._held: dict[HostKey, Reservation] = {}  # ledger entries of loaded pipelines
        self._held_ram: dict[HostKey, Reservation] = {}  # their offloaded weights in RAM
        # The torch device a placed device runs on: itself, except on a simulated
        # many-GPU host (tests, bench/multi_gpu.py), where every "cuda:N" runs on the CPU.
        self.run_device = run_device or (lambda device: device)
        self._reaper: asyncio.Task[None] | None = None
        # (kind, predicted MB, measured MB) of each learned prediction, for the metrics
        self.on_measured: Callable[[str, float, float], None] | None = None

    def config(self, kind: str) -> PipelineSettings:
        return getattr(self.settings.generation, kind)

    def unsupported(self, kind: str) -> dict[str, str]:
        """The rungs ``kind``'s folder refused (kept across restarts): rung -> why."""
        return self.speeds.unsupported_for(str(self.config(kind).pipeline))

    def host(self, kind: str, device: str) -> PipelineHost:
        """The host of ``kind`` on ``device`` (made on first use)."""
        host = self.hosts.get((kind, device))
        if host is None:
            cfg = self.config(kind)
            host = PipelineHost(
                kind,
                cfg.pipeline,
                self.run_device(device),
                self.settings.server.outputs_dir,
                dtype=cfg.dtype,
                caps=self._caps.get(kind),
            )
            self.hosts[(kind, device)] = host
        return host

    def host_of(self, kind: str) -> PipelineHost | None:
        """A host of ``kind``: the loaded one first (with one device, the only one)."""
        hosts = [h for (k, _), h in self.hosts.items() if k == kind]
        return next((h for h in hosts if h.loaded), hosts[0] if hosts else None)

    def loaded_on(self, kind: str, device: str) -> bool:
        host = self.hosts.get((kind, device))
        return host is not None and host.loaded

    def model_key(self, kind: str, device: str, rung: str = "full") -> str:
        """Which learned model a run belongs to: folder (resolved), dtype, device, and
        the placement rung below full residency."""
        folder = self.config(kind).pipeline
        folder = folder.resolve() if folder is not None else None
        return rung_key(f"{folder}|{self.dtype(kind, device)}|{device}", rung)

    def dtype(self, kind: str, device: str) -> str:
        """The dtype ``kind`` loads in on ``device`` (``generation.<kind>.dtype``)."""
        return choose_dtype(self.config(kind).dtype, self._caps.get(kind), self.run_device(device))[
            0
        ]

    def describe(self) -> list[PipelineInfo]:
        """Every configured pipeline, from start-up: each host (loaded or not); for a
        kind, each device it has a learned memory model on but no host yet (learned
        before a restart); a kind with neither shows once, on its pinned device or
        ``auto``."""
        rows = [
            dataclasses.replace(
                h.describe(running=key in self._running),
                device=key[1],
                unsupported_rungs=self.unsupported(key[0]),
                memory_model=self.learned.view(self.model_key(*key)),
            )
            for key, h in self.hosts.items()
        ]
        known = self.learned.keys()
        for kind in KINDS:
            cfg = self.config(kind)
            if cfg.pipeline is None:
                continue
            hosted = {d for k, d in self.hosts if k == kind}
            prefix = f"{cfg.pipeline.resolve()}|"
            learned = {k.rsplit("|", 1)[1] for k in known if k.startswith(prefix)}
            devices = [d for d in sorted(learned - hosted) if self.model_key(kind, d) in known]
            if not hosted and not devices:
                devices = ["auto" if cfg.device == "auto" else f"cuda:{cfg.device}"]
            for device in devices:
                idle = PipelineHost(
                    kind,
                    cfg.pipeline,
                    device,
                    self.settings.server.outputs_dir,
                    dtype=cfg.dtype,
                    caps=self._caps.get(kind),
                )
                view = None if device == "auto" else self.learned.view(self.model_key(kind, device))
                rows.append(
                    dataclasses.replace(
                        idle.describe(),
                        memory_model=view,
                        unsupported_rungs=self.unsupported(kind),
                    )
                )
        return rows

    async def caps(self, kind: str) -> PipelineCaps | None:
        """What the folder of ``kind`` can do (read once, in a thread); None without a
        folder. UnsupportedPipeline, naming the class, when Edison cannot call it."""
        folder = self.config(kind).pipeline
        if folder is None:
            return None
        if kind not in self._caps:
            caps = await anyio.to_thread.run_sync(read_caps, kind, folder)
            self._caps[kind] = caps
            for (k, _), host in self.hosts.items():
                if k == kind and host.caps is None:
                    host.caps = caps
        return self._caps[kind]

    def known_caps(self) -> dict[str, PipelineCaps]:
        """The capabilities read so far, by kind (never waits)."""
        return dict(self._caps)

    # ---- memory --------------------------------------------------------------------
    async def shape(self, kind: str) -> PipelineShape | None:
        """The folder's sizing facts (read once, in a thread); None without a folder."""
        folder = self.config(kind).pipeline
        if folder is None:
            return None
        if kind not in self._shapes:
            self._shapes[kind] = await anyio.to_thread.run_sync(read_shape, kind, folder)
        if kind not in self._sizes:
            self._sizes[kind] = await anyio.to_thread.run_sync(read_sizes, folder)
        return self._shapes[kind]

    def ladder(
        self, kind: str, device: str, params: GenerationParams, shape: PipelineShape
    ) -> RungLadder:
        """The placements ``params`` could run at on ``device``, fastest first, each with
        its need and speed (``rung_needs.py``); the gate walks them."""
        cfg = self.config(kind)
        host = self.hosts.get((kind, device))
        size = request_size(shape, params)
        run_on = self.run_device(device)
        request = LadderRequest(
            device=device,
            base_key=self.model_key(kind, device),
            size=size,
            steps=params.steps or cfg.default_steps,
            sizes=self._sizes.get(kind) or PipelineSizes(()),
            ctx=Context(
                bytes_per=4 if self.dtype(kind, device) == "float32" else 2,
                on_cpu=device == CPU,
                streams=run_on.startswith("cuda"),
            ),
            prior_mb=cfg.required_ram_mb if device == CPU else cfg.required_vram_mb,
            placement=cfg.placement,
            fp8=cfg.fp8,
            pin=cfg.pin_memory,
            loaded=host.plan if host is not None and host.loaded else None,
            unsupported=self.unsupported(kind),
        )
        ladder = build_ladder(self.learned, self.speeds, request)
        options = tuple(
            dataclasses.replace(
                o,
                predicted=PredictedNeed(
                    TaskNeed(
                        device,
                        o.need_mb,
                        "learned" if o.predicted.working_learned else o.source,
                        size.text,
                    ),
                    o.predicted.prediction,
                    size,
                    o.predicted.key,
                    o.rung,
                ),
            )
            for o in ladder.options
        )
        return dataclasses.replace(ladder, options=options)

    def predict(
        self,
        kind: str,
        device: str,
        params: GenerationParams,
        shape: PipelineShape,
        *,
        least: bool = False,
    ) -> PredictedNeed:
        """What ``params`` will need on ``device`` at the fastest rung it may take
        (``least``: at the rung that needs the least): learned from this pipeline's
        measured runs at that rung once there are enough, estimated or configured
        before; the weights counted when the pipeline is not loaded there at that rung."""
        ladder = self.ladder(kind, device, params, shape)
        option = ladder.least if least else next(iter(ladder.options), None)
        if option is None:  # every rung marked unsupported for the folder
            raise ModelUnavailable(
                f"{kind} pipeline supports none of its placements: " + "; ".join(ladder.skipped),
                kind=kind,
            )
        return option.predicted

    async def record_oom(self, predicted: PredictedNeed) -> None:
        """A run of this size ran out of memory: its own need (without an earlier floor)
        x 1.25 becomes a floor for the size, capped at what the device could ever give
        (``learning.py`` says how the floor decays)."""
        p = predicted.prediction
        budget = (await self.placement.view(device=predicted.need.device)).budget
        cap = budget.capacity_mb - budget.reserve_mb
        self.learned.record_oom(predicted.key, p.unit, p.size, p.own_mb, cap_mb=cap)
        await anyio.to_thread.run_sync(self.learned.save)

    async def _learn(
        self, kind: str, host: PipelineHost, result: RunResult, p: PredictedNeed
    ) -> None:
        decayed = self.learned.record_success(p.key, p.prediction.size)
        peak = result.peak
        if peak is None:
            if decayed:
                await anyio.to_thread.run_sync(self.learned.save)
            return
        working = peak.working_mb if peak.sane else float("nan")
        if self.learned.record_run(
            p.key,
            p.prediction.unit,
            p.prediction.size,
            working,
            predicted_mb=p.prediction.working_mb,
            resident_mb=host.resident_mb,
        ):
            if self.on_measured is not None and p.prediction.working_mb is not None:
                self.on_measured(kind, p.prediction.working_mb, working)
            log.info(
                "Pipeline %s run measured: size=%.0f %s working=%.1fMB predicted=%s (%s) method=%s",
                kind,
                p.prediction.size,
                p.prediction.unit,
                working,
                "n/a" if p.prediction.working_mb is None else f"{p.prediction.working_mb:.1f}MB",
                p.prediction.source,
                peak.method,
            )
        await anyio.to_thread.run_sync(self.learned.save)

    def _hold(self, key: HostKey, host: PipelineHost) -> None:
        """Keep the ledger's entries for a loaded pipeline equal to what it holds: on its
        device, and in RAM the weights an offload rung keeps there."""
        if not host.loaded or host.resident_mb is None:
            self._release(key)
            return
        ledger = self.placement.ledger
        res = self._held.get(key)
        if res is None:
            res = self._held[key] = ledger.reserve(
                key[1], host.resident_mb, f"pipeline:{key[0]}", "pipeline"
            )
        ledger.settle(res, host.resident_mb)
        offloaded = host.offloaded_mb or 0.0
        ram = self._held_ram.get(key)
        if offloaded <= 0 or key[1] == CPU:
            ledger.release(self._held_ram.pop(key, None))
        elif ram is None:
            self._held_ram[key] = ledger.reserve(
                CPU, offloaded, f"pipeline:{key[0]}:offloaded", "pipeline"
            )
        else:
            ledger.settle(ram, offloaded)

    def _release(self, key: HostKey) -> None:
        self.placement.ledger.release(self._held.pop(key, None))
        self.placement.ledger.release(self._held_ram.pop(key, None))

    # ---- running -------------------------------------------------------------------
    async def run(
        self,
        kind: str,
        device: str,
        params: GenerationParams,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        option: RungOption | None = None,
        predicted: PredictedNeed | None = None,
        write: bool = True,
        learn: bool = True,
    ) -> RunResult:
        """Run ``kind`` on ``device`` in a worker thread at ``option``'s placement
        (loading it first, or moving it there, if needed), and learn the rung's working
        memory and speed from the run (under ``predicted`` when there is no option).
        Without an option: the placement it is loaded at, else the configured one.
        RungUnsupported (the folder's model cannot take that rung) is remembered for the
        folder, logged and raised for the caller to step on."""
        host = self.host(kind, device)
        plan = option.plan if option is not None else None
        if plan is None and not host.loaded and self.config(kind).placement != "auto":
            plan = RungPlan(self.config(kind).placement)
        call = functools.partial(
            host.run,
            params,
            on_step=on_step,
            should_cancel=should_cancel,
            plan=plan,
            write=write,
        )
        key = (kind, device)
        self._running.add(key)
        try:
            # Why not abandon on cancel: the thread owns the pipeline; the caller's gate
            # must stay held until it really stops (cancel through should_cancel instead).
            result = await anyio.to_thread.run_sync(call)
        except RungUnsupported as exc:
            self.speeds.mark_unsupported(str(self.config(kind).pipeline), exc.rung, exc.reason)
            await anyio.to_thread.run_sync(self.speeds.save)
            log.warning(
                "Pipeline %s: %s marked unsupported for %s (%s); skipped from now on",
                kind,
                exc.rung,
                self.config(kind).pipeline,
                exc.reason,
            )
            raise
        finally:
            self._running.discard(key)
            self._hold(key, host)
        predicted = option.predicted if option is not None else predicted
        if predicted is not None and learn:
            if not result.first_run and params.steps:  # a first run loads kernels too
                self.speeds.record(
                    predicted.key, predicted.size.value, result.run_ms / 1000 / params.steps
                )
                await anyio.to_thread.run_sync(self.speeds.save)
            await self._learn(kind, host, result, predicted)
        return result

    async def warm(
        self, kind: str, device: str, params: GenerationParams, option: RungOption | None = None
    ) -> RunResult:
        """Load ``kind`` at ``option``'s rung and run it once without writing files: the
        first request then pays no load and no kernel warm-up. Learns nothing (a first
        run is not typical)."""
        return await self.run(kind, device, params, write=False, option=option, learn=False)

    async def _unload(self, key: HostKey, host: PipelineHost) -> None:
        await anyio.to_thread.run_sync(host.unload)
        self._release(key)

    async def unload_idle(self, keep: str = "", device: str | None = None) -> list[str]:
        """Unload every loaded pipeline that is not running and not ``keep`` (on ``device``
        only, when given)."""
        freed = []
        for key, host in list(self.hosts.items()):
            kind, on = key
            if device is not None and on != device:
                continue
            if kind != keep and key not in self._running and host.loaded:
                await self._unload(key, host)
                freed.append(kind)
        return freed

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="edison-pipeline-reaper")

    async def shutdown(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for key, host in self.hosts.items():
            if host.loaded:
                await self._unload(key, host)

    async def _reap(self) -> None:
        """Release pipelines idle longer than their keep_alive_s."""
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for key, host in list(self.hosts.items()):
                keep = self.config(key[0]).keep_alive_s
                idle = key not in self._running and now - host.last_used_at >= keep
                if host.loaded and idle:
                    log.info(
                        "Pipeline %s on %s idle %.0f s: unloading",
                        *key,
                        now - host.last_used_at,
                    )
                    await self._unload(key, host)
