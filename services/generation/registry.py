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

from services.generation.params import GenerationParams, RunResult
from services.generation.pipelines import PipelineHost, PipelineInfo, load_dtype
from services.generation.sizing import PipelineShape, RequestSize, read_shape, request_size
from services.memory.learning import Prediction
from services.memory.ledger import CPU, Reservation
from services.memory.placement import Placement, TaskNeed
from services.settings import PipelineSettings, Settings

log = logging.getLogger("edison.generation")

HostKey = tuple[str, str]  # (kind, device)


@dataclasses.dataclass(frozen=True)
class PredictedNeed:
    """A request's need on a device, and the prediction behind it."""

    need: TaskNeed
    prediction: Prediction
    size: RequestSize
    key: str  # the memory model it came from: folder|dtype|device


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
        # Why a set and no lock: only the event loop reads and writes it; a thread runs
        # the pipeline while its key is in it.
        self._running: set[HostKey] = set()
        self._held: dict[HostKey, Reservation] = {}  # ledger entries of loaded pipelines
        # The torch device a placed device runs on: itself, except on a simulated
        # many-GPU host (tests, bench/multi_gpu.py), where every "cuda:N" runs on the CPU.
        self.run_device = run_device or (lambda device: device)
        self._reaper: asyncio.Task[None] | None = None
        # (kind, predicted MB, measured MB) of each learned prediction, for the metrics
        self.on_measured: Callable[[str, float, float], None] | None = None

    def config(self, kind: str) -> PipelineSettings:
        return getattr(self.settings.generation, kind)

    def host(self, kind: str, device: str) -> PipelineHost:
        """The host of ``kind`` on ``device`` (made on first use)."""
        host = self.hosts.get((kind, device))
        if host is None:
            cfg = self.config(kind)
            host = PipelineHost(
                kind, cfg.pipeline, self.run_device(device), self.settings.server.outputs_dir
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

    def model_key(self, kind: str, device: str) -> str:
        """Which learned model a run belongs to: folder (resolved), dtype, device."""
        folder = self.config(kind).pipeline
        folder = folder.resolve() if folder is not None else None
        return f"{folder}|{load_dtype(device)}|{device}"

    def describe(self) -> list[PipelineInfo]:
        return [
            dataclasses.replace(
                h.describe(running=key in self._running),
                device=key[1],
                memory_model=self.learned.view(self.model_key(*key)),
            )
            for key, h in self.hosts.items()
        ]

    def longest_clip_s(self, kind: str) -> float | None:
        """The loaded pipeline's longest audio clip, when it has one."""
        host = self.host_of(kind)
        return host.longest_clip_s() if host is not None else None

    # ---- memory --------------------------------------------------------------------
    async def shape(self, kind: str) -> PipelineShape | None:
        """The folder's sizing facts (read once, in a thread); None without a folder."""
        folder = self.config(kind).pipeline
        if folder is None:
            return None
        if kind not in self._shapes:
            self._shapes[kind] = await anyio.to_thread.run_sync(read_shape, kind, folder)
        return self._shapes[kind]

    def predict(
        self, kind: str, device: str, params: GenerationParams, shape: PipelineShape
    ) -> PredictedNeed:
        """What ``params`` will need on ``device``: learned from this pipeline's measured
        runs once there are enough, the configured figure before; the weights counted
        when the pipeline is not loaded there."""
        cfg = self.config(kind)
        size = request_size(shape, params)
        key = self.model_key(kind, device)
        if self.loaded_on(kind, device):
            resident = 0.0
        else:
            bytes_per = 2 if load_dtype(device) == "float16" else 4
            resident = self.learned.resident_mb(key) or shape.weights_mb(bytes_per)
        prior = cfg.required_ram_mb if device == CPU else cfg.required_vram_mb
        p = self.learned.predict(key, size.unit, size.value, prior_mb=prior, resident_mb=resident)
        need = TaskNeed(device, p.need_mb, p.source, size.text)
        return PredictedNeed(need, p, size, key)

    def record_oom(self, predicted: PredictedNeed) -> None:
        """A run of this size ran out of memory under this need: never predict as low."""
        p = predicted.prediction
        self.learned.record_oom(predicted.key, p.unit, p.size, predicted.need.mb)

    async def _learn(
        self, kind: str, host: PipelineHost, result: RunResult, p: PredictedNeed
    ) -> None:
        peak = result.peak
        if peak is None:
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
        """Keep the ledger's entry for a loaded pipeline equal to what it holds."""
        res = self._held.get(key)
        if not host.loaded or host.resident_mb is None:
            self._release(key)
            return
        if res is None:
            res = self._held[key] = self.placement.ledger.reserve(
                key[1], host.resident_mb, f"pipeline:{key[0]}", "pipeline"
            )
        self.placement.ledger.settle(res, host.resident_mb)

    def _release(self, key: HostKey) -> None:
        self.placement.ledger.release(self._held.pop(key, None))

    # ---- running -------------------------------------------------------------------
    async def run(
        self,
        kind: str,
        device: str,
        params: GenerationParams,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        savers: bool = False,
        predicted: PredictedNeed | None = None,
        write: bool = True,
    ) -> RunResult:
        """Run ``kind`` on ``device`` in a worker thread (loading it first if needed), and
        learn from the run's measured peak."""
        host = self.host(kind, device)
        call = functools.partial(
            host.run,
            params,
            on_step=on_step,
            should_cancel=should_cancel,
            savers=savers,
            write=write,
        )
        key = (kind, device)
        self._running.add(key)
        try:
            # Why not abandon on cancel: the thread owns the pipeline; the caller's gate
            # must stay held until it really stops (cancel through should_cancel instead).
            result = await anyio.to_thread.run_sync(call)
        finally:
            self._running.discard(key)
            self._hold(key, host)
        if predicted is not None and not savers:  # savers change the peak: not this model
            await self._learn(kind, host, result, predicted)
        return result

    async def warm(self, kind: str, device: str, params: GenerationParams) -> RunResult:
        """Load ``kind`` and run it once without writing files: the first request then pays
        no load and no kernel warm-up. Learns nothing (a first run is not typical)."""
        return await self.run(kind, device, params, write=False)

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
