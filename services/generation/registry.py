"""The pipeline hosts, one per kind: loaded on first use, kept while memory allows.

The registry runs every pipeline call itself (in a worker thread), so it knows which
pipelines are running: the gate may unload only the idle ones, and the idle reaper
never releases a pipeline under a run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

import anyio

from services.generation.params import GenerationParams, RunResult
from services.generation.pipelines import PipelineHost, PipelineInfo
from services.settings import PipelineSettings, Settings

log = logging.getLogger("edison.generation")


class PipelineRegistry:
    """One per app. Async API; every blocking call goes to a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hosts: dict[str, PipelineHost] = {}
        # Why a set of kinds and no lock: only the event loop reads and writes it; a
        # thread runs the pipeline while the kind is in it.
        self._running: set[str] = set()
        self._reaper: asyncio.Task[None] | None = None

    def config(self, kind: str) -> PipelineSettings:
        return getattr(self.settings.generation, kind)

    def host(self, kind: str, device: str) -> PipelineHost:
        """The host of ``kind`` on ``device`` (a new one if the device changed)."""
        host = self.hosts.get(kind)
        if host is None or host.device != device:
            cfg = self.config(kind)
            host = PipelineHost(kind, cfg.pipeline, device, self.settings.server.outputs_dir)
            self.hosts[kind] = host
        return host

    def is_running(self, kind: str) -> bool:
        return kind in self._running

    def describe(self) -> list[PipelineInfo]:
        return [h.describe(running=k in self._running) for k, h in self.hosts.items()]

    def longest_clip_s(self, kind: str) -> float | None:
        """The loaded pipeline's longest audio clip, when it has one."""
        host = self.hosts.get(kind)
        return host.longest_clip_s() if host is not None else None

    async def run(
        self,
        kind: str,
        device: str,
        params: GenerationParams,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        savers: bool = False,
    ) -> RunResult:
        """Run ``kind`` on ``device`` in a worker thread (loading it first if needed)."""
        host = self.host(kind, device)
        call = functools.partial(
            host.run, params, on_step=on_step, should_cancel=should_cancel, savers=savers
        )
        self._running.add(kind)
        try:
            # Why not abandon on cancel: the thread owns the pipeline; the caller's gate
            # must stay held until it really stops (cancel through should_cancel instead).
            return await anyio.to_thread.run_sync(call)
        finally:
            self._running.discard(kind)

    async def unload_idle(self, keep: str = "") -> list[str]:
        """Unload every loaded pipeline that is not running and not ``keep``."""
        freed = []
        for kind, host in list(self.hosts.items()):
            if kind != keep and kind not in self._running and host.loaded:
                await anyio.to_thread.run_sync(host.unload)
                freed.append(kind)
        return freed

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="edison-pipeline-reaper")

    async def shutdown(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for host in self.hosts.values():
            if host.loaded:
                await anyio.to_thread.run_sync(host.unload)

    async def _reap(self) -> None:
        """Release pipelines idle longer than their keep_alive_s."""
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for kind, host in list(self.hosts.items()):
                keep = self.config(kind).keep_alive_s
                idle = kind not in self._running and now - host.last_used_at >= keep
                if host.loaded and idle:
                    log.info("Pipeline %s idle %.0f s: unloading", kind, now - host.last_used_at)
                    await anyio.to_thread.run_sync(host.unload)
