"""Generation jobs: image, video and music pipelines run behind the memory gate.

A request is checked against the config's limits (:meth:`JobService.prepare`), becomes a
job, is queued at the gate, runs its pipeline in a worker thread (never on the event
loop), reports progress per step, and can be cancelled while queued or at its next step.
A CUDA out-of-memory error unloads everything else and retries once with the
pipeline's memory savers; a second one answers 503 ``insufficient_vram``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.errors import Cancelled, EdisonError, InsufficientMemory, InvalidRequest, NotFound
from services.events import EventBus
from services.generation.eta import DurationModel
from services.generation.params import GenerationParams, RunResult
from services.generation.pipelines import PipelineOOM
from services.generation.registry import PipelineRegistry, PredictedNeed
from services.generation.sizing import PipelineShape, request_size
from services.memory.gate import GateDecision, MemoryGate
from services.memory.placement import TaskNeed
from services.settings import KINDS, Settings

log = logging.getLogger("edison.generation")
MAX_JOBS_KEPT = 1000


@dataclass
class JobProgress:
    done: int = 0
    total: int = 0


@dataclass(frozen=True)
class JobOutput:
    """One file a job wrote; the media fields that apply to its kind are set."""

    url: str
    name: str
    media_type: str
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: int | None = None
    duration_s: float | None = None
    sample_rate: int | None = None
    channels: int | None = None


@dataclass
class JobTimings:
    """Milliseconds: waiting for the gate, loading the pipeline, running it, in all; and,
    when they happened inside this job, importing the generation stack (part of ``load``)
    and a first run after a load (``run``, which then also loaded the device's kernels)."""

    queued: float | None = None
    load: float | None = None
    run: float | None = None
    total: float | None = None
    imports: float | None = None
    warmup: float | None = None


@dataclass(frozen=True)
class JobError:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    id: str
    kind: str
    params: GenerationParams
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    progress: JobProgress = field(default_factory=JobProgress)
    outputs: list[JobOutput] = field(default_factory=list)
    seed: int | None = None
    gate: GateDecision | None = None
    timings_ms: JobTimings = field(default_factory=JobTimings)
    error: JobError | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    position: int | None = None  # 0 running, n waiting (1 is next), None when done
    eta_s: float | None = None  # seconds until it is expected to finish, while not done
    device: str | None = None  # the device whose line it waits in or it runs on
    size: float | None = field(default=None, repr=False)  # the request's size (sizing.py)
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    exc: EdisonError | None = field(default=None, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    shape: PipelineShape | None = field(default=None, repr=False)
    predicted: PredictedNeed | None = field(default=None, repr=False)


Observer = Callable[[str, str, float], None]  # (kind, status, seconds), for metrics


class JobService:
    """Checks, creates, runs, finds and cancels generation jobs. One per app."""

    def __init__(
        self,
        settings: Settings,
        gate: MemoryGate,
        pipelines: PipelineRegistry,
        *,
        observe: Observer | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.settings = settings
        self.gate = gate
        self.pipelines = pipelines
        self.observe = observe
        self.events = events
        self.durations = DurationModel()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        gate.queue_drain_s = self.queue_drain_s  # Retry-After from measured durations

    def prepare(self, kind: str, params: GenerationParams) -> GenerationParams:
        """Check a request against the config's limits (InvalidRequest naming the field)
        and fill in the defaults the config gives."""
        if kind not in KINDS:
            raise NotFound(f"No such generation kind {kind!r}")
        cfg = self.pipelines.config(kind)
        steps = params.steps or cfg.default_steps
        _check("steps", steps <= cfg.max_steps, f"must be at most {cfg.max_steps}")
        if kind in ("image", "video") and params.width and params.height:
            most = cfg.max_pixels  # type: ignore[attr-defined]
            _check(
                "width",
                params.width * params.height <= most,
                f"width x height must be at most {most} pixels",
            )
        limits = {
            "image": ("num_images", "max_images"),
            "video": ("num_frames", "max_frames"),
            "music": ("duration_s", "max_duration_s"),
        }
        name, limit = limits[kind]
        value, most = getattr(params, name), getattr(cfg, limit)
        if value is not None:
            _check(name, value <= most, f"must be at most {most:g}")
        if kind == "music" and params.duration_s is not None:
            longest = self.pipelines.longest_clip_s(kind)
            if longest:
                _check(
                    "duration_s",
                    params.duration_s <= longest,
                    f"the pipeline's longest clip is {longest:g} s",
                )
        return dataclasses.replace(params, steps=steps)

    async def submit(self, kind: str, params: GenerationParams) -> Job:
        """Check the request, queue it as a job and start it; returns once it is queued.

        A request whose learned need exceeds what the device could ever give (its whole
        memory less the reserve) is refused here: InvalidRequest naming the field that
        makes it large, with the prediction."""
        params = self.prepare(kind, params)
        shape = await self.pipelines.shape(kind)
        if shape is not None:
            await self._check_it_can_ever_fit(kind, params, shape)
        job = Job(uuid.uuid4().hex, kind, params, shape=shape)
        job.progress.total = params.steps or 0
        if shape is not None:
            job.size = request_size(shape, params).value
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS_KEPT:
            old_id, old = next(iter(self.jobs.items()))
            if not old.done.is_set():
                break
            self.jobs.pop(old_id)
        job.task = asyncio.create_task(self._run(job), name=f"edison-job-{job.id}")
        self._publish("job.queued", job)
        return self.locate(job)

    async def warm(self, kind: str) -> float:
        """Load a pipeline and run one tiny step through the gate (start-up preload);
        returns the milliseconds it took."""
        cfg = self.pipelines.config(kind)
        tiny = {
            "image": GenerationParams("warm-up", steps=1, width=64, height=64, seed=0),
            "video": GenerationParams("warm-up", steps=1, width=64, height=64, num_frames=2),
            "music": GenerationParams("warm-up", steps=1, duration_s=0.5, seed=0),
        }[kind]
        t0 = time.perf_counter()
        async with self.gate.heavy_task(
            cfg.required_vram_mb, f"{kind}: warm-up", required_ram_mb=cfg.required_ram_mb, kind=kind
        ) as task:
            await self.pipelines.warm(kind, task.device, tiny)
        return (time.perf_counter() - t0) * 1000

    async def _check_it_can_ever_fit(
        self, kind: str, params: GenerationParams, shape: PipelineShape
    ) -> None:
        placement = self.pipelines.placement
        snap = await placement.snapshot()
        refusals = []
        for device in placement.allowed(snap, self.pipelines.config(kind).device):
            budget = placement.view_of(snap, device=device).budget
            p = self.pipelines.predict(kind, device, params, shape)
            most = budget.capacity_mb - budget.reserve_mb
            if p.need.source != "learned" or p.need.mb <= most:
                return  # some device could hold it
            refusals.append(
                f"{p.size.text} is predicted to need {p.need.mb:.0f} MB of {p.need.memory} "
                f"(learned from measured runs); {device} can never give more than "
                f"{most:.0f} MB"
            )
        raise InvalidRequest(p.size.field, "; ".join(refusals))

    def _predict(self, job: Job, device: str) -> TaskNeed:
        """The gate's figure for this job on ``device`` (kept on the job for learning)."""
        assert job.shape is not None
        job.predicted = self.pipelines.predict(job.kind, device, job.params, job.shape)
        return job.predicted.need

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"No job {job_id!r}", job_id=job_id)
        return self.locate(job)

    def active(self) -> list[Job]:
        """Jobs not done yet, running first, then in the order they will run."""
        jobs = [self.locate(j) for j in self.jobs.values() if not j.done.is_set()]
        return sorted(jobs, key=lambda j: (j.position is None, j.position or 0, j.created_at))

    def locate(self, job: Job) -> Job:
        """Set the job's place in line and its ETA (see eta.py for the method)."""
        if job.done.is_set():
            job.position, job.eta_s = None, None
            return job
        if job.status == "running":
            job.position, job.eta_s = 0, self._remaining_s(job)
            return job
        queue = self.gate.queue()
        entry = next((e for e in queue if e.ticket == job.id), None)
        device = entry.device if entry is not None else None
        job.device = device or job.device
        line = [e for e in queue if device is None or e.device == device]  # its device's line
        ahead = [e for e in line if e.ticket != job.id]
        mine = entry.position if entry is not None else len(line) + 1
        job.position = mine
        eta = self._running_left_s(device)
        for entry in ahead[: mine - 1]:
            other = self.jobs.get(entry.ticket or "")
            eta += self._duration_s(other.kind if other else entry.kind or "", other)
        job.eta_s = round(eta + self._duration_s(job.kind, job), 2)
        return job

    def _duration_s(self, kind: str, job: Job | None) -> float:
        seconds = self.durations.predict(kind, job.size if job else None)
        return self.gate.mean_task_s if seconds is None else seconds

    def _remaining_s(self, job: Job) -> float:
        elapsed = time.time() - (job.started_at or time.time())
        done, total = job.progress.done, job.progress.total
        if done > 0 and total >= done:
            return round(elapsed / done * (total - done), 2)
        return round(max(0.0, self._duration_s(job.kind, job) - elapsed), 2)

    def _running_left_s(self, device: str | None = None) -> float:
        """Seconds until the task running on ``device`` (any, when None) is done."""
        running = next(
            (
                j
                for j in self.jobs.values()
                if j.status == "running" and (device is None or j.device == device)
            ),
            None,
        )
        if running is not None:
            return self._remaining_s(running)
        tasks = [t for t in self.gate.running() if device is None or t.device == device]
        return max(0.0, self.gate.mean_task_s - tasks[0].running_s) if tasks else 0.0

    def queue_drain_s(self, device: str | None = None) -> float:
        """Seconds until the running job and every waiting one (on ``device``; every
        device, when None) are done, predicted from the measured run times of their kinds
        and sizes."""
        left = self._running_left_s(device)
        for entry in self.gate.queue():
            if device is not None and entry.device != device:
                continue
            other = self.jobs.get(entry.ticket or "")
            left += self._duration_s(other.kind if other else entry.kind or "", other)
        return left

    def _publish(self, type_: str, job: Job) -> None:
        if self.events is not None:
            self.events.publish(type_, self.locate(job))

    def cancel(self, job_id: str, why: str = "cancelled by request") -> Job:
        """Cancel a queued job now, a running one at its next step."""
        job = self.get(job_id)
        if job.done.is_set():
            return job
        job.cancel_event.set()
        job.error = JobError("cancelled", why)
        if job.status == "queued" and job.task is not None:
            job.task.cancel()
        return self.locate(job)

    def cancel_all(self, why: str) -> None:
        for job in list(self.jobs.values()):
            if not job.done.is_set():
                self.cancel(job.id, why)

    async def _run(self, job: Job) -> None:
        t0 = time.perf_counter()
        cfg = self.pipelines.config(job.kind)
        reason = f"{job.kind}: {job.params.prompt[:40]}"
        try:
            need_on = None if job.shape is None else functools.partial(self._predict, job)
            async with self.gate.heavy_task(
                cfg.required_vram_mb,
                reason,
                required_ram_mb=cfg.required_ram_mb,
                kind=job.kind,
                need_on=need_on,
                ticket=job.id,
            ) as task:
                if job.cancel_event.is_set():
                    raise Cancelled("Cancelled before it ran")
                job.status = "running"
                job.started_at = time.time()
                self._publish("job.started", job)
                job.gate = task.decision
                job.device = task.device
                job.timings_ms.queued = round(task.queued_ms, 1)
                result = await self._run_with_retry(job, task.device, reason)
            job.outputs = [
                JobOutput(url=f"/outputs/{o.name}", name=o.name, media_type=o.media_type, **o.meta)
                for o in result.outputs
            ]
            job.seed = result.seed
            job.timings_ms.load = round(result.load_ms, 1)
            job.timings_ms.run = round(result.run_ms, 1)
            if result.import_ms > 0:
                job.timings_ms.imports = round(result.import_ms, 1)
            if result.first_run:
                job.timings_ms.warmup = round(result.run_ms, 1)
            job.status = "succeeded"
            if job.size is not None and not result.used_savers:
                # The run alone: a pipeline load happens once, not for every job in line.
                self.durations.record(job.kind, job.size, result.run_ms / 1000)
        except (asyncio.CancelledError, Cancelled):
            job.status = "cancelled"
            job.error = job.error or JobError("cancelled", "cancelled")
        except EdisonError as exc:
            job.status, job.exc = "failed", exc
            job.error = JobError(exc.code, exc.message, dict(exc.details))
        except Exception as exc:  # noqa: BLE001 - a failing pipeline never takes the service down
            log.exception("job %s failed", job.id)
            job.status = "failed"
            job.exc = EdisonError(f"{job.kind} generation failed: {type(exc).__name__}: {exc}")
            job.error = JobError("internal_error", job.exc.message)
        finally:
            job.timings_ms.total = round((time.perf_counter() - t0) * 1000, 1)
            job.finished_at = time.time()
            job.done.set()
            self._publish("job.finished", job)
            if self.observe:
                self.observe(job.kind, job.status, job.timings_ms.total / 1000)

    async def _run_with_retry(self, job: Job, device: str, reason: str) -> RunResult:
        try:
            return await self._run_pipeline(job, device, savers=False)
        except PipelineOOM:
            log.warning("CUDA out of memory in %s: retrying once with memory savers", reason)
            if job.predicted is not None:
                self.pipelines.record_oom(job.predicted)
        await self.gate.recover_from_oom(job.kind, reason, device=device)
        try:
            return await self._run_pipeline(job, device, savers=True)
        except PipelineOOM as exc:
            after = (await self.pipelines.placement.view(device=device)).budget
            need = job.predicted.need.mb if job.predicted is not None else None
            raise InsufficientMemory(
                f"{job.kind} ran out of VRAM even with memory savers and nothing else loaded",
                retry_after_s=30,
                required_vram_mb=need or self.pipelines.config(job.kind).required_vram_mb,
                free_vram_mb=round(after.usable_mb, 1),
                freed_mb=0,
                device=device,
            ) from exc

    async def _run_pipeline(self, job: Job, device: str, *, savers: bool) -> RunResult:
        def on_step(done: int, total: int) -> None:  # in the pipeline's thread
            job.progress = JobProgress(done, total)
            if self.events is not None:
                self.events.from_thread(self._publish, "job.progress", job)

        return await self.pipelines.run(
            job.kind,
            device,
            job.params,
            on_step=on_step,
            should_cancel=job.cancel_event.is_set,
            savers=savers,
            predicted=job.predicted,
        )


def _check(field_name: str, ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequest(field_name, message)
