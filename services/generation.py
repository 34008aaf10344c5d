"""Generation jobs: image, video and music pipelines run behind the memory gate.

A job is queued at the gate, runs its pipeline in a worker thread (never on the event
loop), reports progress per step, and can be cancelled while queued or at its next step.
A CUDA out-of-memory error unloads everything else and retries once with the
pipeline's memory savers; a second one answers 503 ``insufficient_vram``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import anyio

from services.errors import Cancelled, EdisonError, InsufficientMemory, NotFound
from services.memory_gate import MemoryGate
from services.pipelines import KINDS, GenerationParams, PipelineHost, PipelineOOM, RunResult
from services.settings import PipelineSettings, Settings

log = logging.getLogger("edison.generation")
MAX_JOBS_KEPT = 1000


class PipelineRegistry:
    """The pipeline hosts, one per kind, loaded on first use and kept while memory allows."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hosts: dict[str, PipelineHost] = {}
        self.busy: set[str] = set()
        self._reaper: asyncio.Task[None] | None = None

    def config(self, kind: str) -> PipelineSettings:
        return getattr(self.settings.generation, kind)

    def host(self, kind: str, device: str) -> PipelineHost:
        host = self.hosts.get(kind)
        if host is None or host.device != device:
            cfg = self.config(kind)
            host = PipelineHost(kind, cfg.pipeline, device, self.settings.server.outputs_dir)
            self.hosts[kind] = host
        return host

    def describe(self) -> list[dict[str, Any]]:
        return [h.describe() for h in self.hosts.values()]

    async def unload_idle(self, keep: str = "") -> list[str]:
        """Unload every loaded pipeline that is not running and not ``keep``."""
        freed = []
        for kind, host in list(self.hosts.items()):
            if kind != keep and kind not in self.busy and host.loaded:
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
                if host.loaded and kind not in self.busy and now - host.last_used_at >= keep:
                    log.info("Pipeline %s idle %.0f s: unloading", kind, now - host.last_used_at)
                    await anyio.to_thread.run_sync(host.unload)


@dataclass
class Job:
    id: str
    kind: str
    params: GenerationParams
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    progress: dict[str, int] = field(default_factory=lambda: {"done": 0, "total": 0})
    outputs: list[dict[str, Any]] = field(default_factory=list)
    seed: int | None = None
    gate: dict[str, Any] | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    exc: EdisonError | None = field(default=None, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": dict(self.progress),
            "outputs": self.outputs,
            "seed": self.seed,
            "gate": self.gate,
            "timings_ms": self.timings_ms,
            "error": self.error,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


class JobService:
    """Creates, runs, finds and cancels generation jobs. One per app."""

    def __init__(
        self,
        settings: Settings,
        gate: MemoryGate,
        pipelines: PipelineRegistry,
        *,
        observe: Any = None,
    ) -> None:
        self.settings = settings
        self.gate = gate
        self.pipelines = pipelines
        self.observe = observe  # callable(kind, status, seconds) for metrics
        self.jobs: OrderedDict[str, Job] = OrderedDict()

    def submit(self, kind: str, params: GenerationParams) -> Job:
        if kind not in KINDS:
            raise NotFound(f"No such generation kind {kind!r}")
        job = Job(uuid.uuid4().hex, kind, params)
        job.progress["total"] = params.steps
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS_KEPT:
            old_id, old = next(iter(self.jobs.items()))
            if not old.done.is_set():
                break
            self.jobs.pop(old_id)
        job.task = asyncio.create_task(self._run(job), name=f"edison-job-{job.id}")
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"No job {job_id!r}", job_id=job_id)
        return job

    def cancel(self, job_id: str, why: str = "cancelled by request") -> Job:
        """Cancel a queued job now, a running one at its next step."""
        job = self.get(job_id)
        if job.done.is_set():
            return job
        job.cancel_event.set()
        job.error = {"code": "cancelled", "message": why}
        if job.status == "queued" and job.task is not None:
            job.task.cancel()
        return job

    async def _run(self, job: Job) -> None:
        t0 = time.perf_counter()
        cfg = self.pipelines.config(job.kind)
        reason = f"{job.kind}: {job.params.prompt[:40]}"
        try:
            async with self.gate.heavy_task(
                cfg.required_vram_mb, reason, required_ram_mb=cfg.required_ram_mb, kind=job.kind
            ) as task:
                if job.cancel_event.is_set():
                    raise Cancelled("Cancelled before it ran")
                job.status = "running"
                job.gate = task.gate.to_dict() if task.gate else None
                job.timings_ms["queued"] = round(task.queued_ms, 1)
                self.pipelines.busy.add(job.kind)
                try:
                    result = await self._run_with_retry(job, task.device, reason)
                finally:
                    self.pipelines.busy.discard(job.kind)
            job.outputs = [
                {
                    "url": f"/outputs/{o.name}",
                    "name": o.name,
                    "media_type": o.media_type,
                    **o.meta,
                }
                for o in result.outputs
            ]
            job.seed = result.seed
            job.timings_ms["load"] = round(result.load_ms, 1)
            job.timings_ms["run"] = round(result.run_ms, 1)
            job.status = "succeeded"
        except (asyncio.CancelledError, Cancelled):
            job.status = "cancelled"
            job.error = job.error or {"code": "cancelled", "message": "cancelled"}
        except EdisonError as exc:
            job.status, job.exc = "failed", exc
            job.error = {"code": exc.code, "message": exc.message, **exc.details}
        except Exception as exc:  # noqa: BLE001 - a failing pipeline never takes the service down
            log.exception("job %s failed", job.id)
            job.status = "failed"
            job.exc = EdisonError(f"{job.kind} generation failed: {type(exc).__name__}: {exc}")
            job.error = {"code": "internal_error", "message": job.exc.message}
        finally:
            job.timings_ms["total"] = round((time.perf_counter() - t0) * 1000, 1)
            job.finished_at = time.time()
            job.done.set()
            if self.observe:
                self.observe(job.kind, job.status, job.timings_ms["total"] / 1000)

    async def _run_with_retry(self, job: Job, device: str, reason: str) -> RunResult:
        host = self.pipelines.host(job.kind, device)
        try:
            return await self._run_host(host, job, savers=False)
        except PipelineOOM:
            log.warning("CUDA out of memory in %s: retrying once with memory savers", reason)
        await self.gate.recover_from_oom(reason)
        try:
            return await self._run_host(host, job, savers=True)
        except PipelineOOM as exc:
            raise InsufficientMemory(
                f"{job.kind} ran out of VRAM even with memory savers and nothing else loaded",
                retry_after_s=30,
                required_vram_mb=self.pipelines.config(job.kind).required_vram_mb,
                free_vram_mb=None,
                freed_mb=0,
                device=device,
            ) from exc

    async def _run_host(self, host: PipelineHost, job: Job, *, savers: bool) -> RunResult:
        def on_step(done: int, total: int) -> None:
            job.progress = {"done": done, "total": total}

        run = functools.partial(
            host.run,
            job.params,
            on_step=on_step,
            should_cancel=job.cancel_event.is_set,
            savers=savers,
        )
        # Why not abandon on cancel: the thread owns the pipeline; the gate must stay
        # held until it really stops (cancellation goes through cancel_event instead).
        return await anyio.to_thread.run_sync(run)
