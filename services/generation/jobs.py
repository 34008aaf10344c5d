"""Generation jobs: image, video and music pipelines run behind the memory gate.

A request is checked against the config's limits (:meth:`JobService.prepare`), becomes a
job, is queued at the gate, runs its pipeline in a worker thread (never on the event
loop), reports progress per step, and can be cancelled while queued or at its next step.
The gate chooses the job's placement rung (``placement_ladder.py``); a CUDA out-of-memory
error unloads everything else and steps down to the next rung, and one at the last rung
answers 503 ``insufficient_vram``. A rung the model cannot take is skipped the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from services.errors import (
    Cancelled,
    EdisonError,
    InsufficientMemory,
    InvalidRequest,
    JobNotFinished,
    ModelUnavailable,
    NotFound,
)
from services.events import EventBus
from services.generation.checks import decode_inputs, resolve, warm_params
from services.generation.eta import DurationModel
from services.generation.params import Adjustment, GenerationParams, RunResult
from services.generation.pipelines import PipelineOOM
from services.generation.placement_ladder import RungLadder, RungOption, RungUnsupported
from services.generation.registry import PipelineRegistry, PredictedNeed
from services.generation.retention import PruneResult, prune_outputs
from services.generation.sizing import PipelineShape, request_size
from services.memory.gate import GateDecision, MemoryGate, Place
from services.memory.placement import TaskNeed, task_need
from services.settings import KINDS, Settings

log = logging.getLogger("edison.generation")
MAX_JOBS_KEPT = 1000
PRUNE_EVERY_S = 60.0  # a retention pass at least this often (and after each job)


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
    ladder: RungLadder | None = field(default=None, repr=False)  # its placements, last built
    adjustments: list[Adjustment] = field(default_factory=list)  # round_to_valid's changes
    place: Place | None = field(default=None, repr=False)  # its place in line, from submit

    def snapshot(self, progress: JobProgress | None = None) -> JobState:
        """The job as it is now, as a frozen copy (``progress``: the one of a given step)."""
        now = {f.name: getattr(self, f.name) for f in dataclasses.fields(JobState)}
        now.update(
            progress=dataclasses.replace(progress or self.progress),
            timings_ms=dataclasses.replace(self.timings_ms),
            outputs=tuple(self.outputs),
            adjustments=tuple(self.adjustments),
        )
        return JobState(**now)


@dataclass(frozen=True)
class JobState:
    """A job as it was at one moment: what events and the memory report carry, so that a
    reader who gets it later (an event subscriber behind the others) sees that moment,
    not whatever the job has become since. Its fields are :class:`Job`'s public ones."""

    id: str
    kind: str
    params: GenerationParams
    status: str
    progress: JobProgress
    outputs: tuple[JobOutput, ...]
    seed: int | None
    gate: GateDecision | None
    timings_ms: JobTimings
    error: JobError | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    position: int | None
    eta_s: float | None
    device: str | None
    adjustments: tuple[Adjustment, ...]


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
        self._prune_soon = asyncio.Event()  # set when a job ends: a retention pass is due
        self._retention: asyncio.Task[None] | None = None

    async def prepare(
        self, kind: str, params: GenerationParams
    ) -> tuple[GenerationParams, list[Adjustment]]:
        """Check a request against the config's limits and what its pipeline can make
        (InvalidRequest naming the field, with the nearest valid values), and fill in the
        defaults: the request's, else the config's, else the pipeline's own."""
        if kind not in KINDS:
            raise NotFound(f"No such generation kind {kind!r}")
        cfg = self.pipelines.config(kind)
        steps = params.steps or cfg.default_steps
        _check("steps", steps <= cfg.max_steps, f"must be at most {cfg.max_steps}")
        if kind == "image":
            most = cfg.max_images  # type: ignore[attr-defined]
            _check("num_images", params.num_images <= most, f"must be at most {most}")
        caps = await self.pipelines.caps(kind)
        if caps is None:  # no folder: the load says so (503 model_unavailable)
            return dataclasses.replace(params, steps=steps), []
        params, adjustments = resolve(caps, cfg, params)
        if params.image is not None or params.last_image is not None:
            params = await anyio.to_thread.run_sync(decode_inputs, kind, cfg, params)
        return params, adjustments

    async def submit(self, kind: str, params: GenerationParams) -> Job:
        """Check the request, queue it as a job and start it; returns once it is queued.

        A request whose learned need exceeds what the device could ever give (its whole
        memory less the reserve) is refused here: InvalidRequest naming the field that
        makes it large, with the prediction."""
        params, adjustments = await self.prepare(kind, params)
        shape = await self.pipelines.shape(kind)
        if shape is not None:
            await self._check_it_can_ever_fit(kind, params, shape)
        job = Job(uuid.uuid4().hex, kind, params, shape=shape, adjustments=adjustments)
        job.progress.total = params.steps or 0
        if shape is not None:
            job.size = request_size(shape, params).value
        # The place in line is taken before anyone hears of the job: a full line refuses
        # it here (QueueFull, 503 with Retry-After), never after a 202 went out.
        job.place = await self.gate.take_place(
            self._need_of(job), self._reason(job), kind=kind, ticket=job.id
        )
        job.device = job.place.device
        self.jobs[job.id] = job
        self.prune_jobs()
        job.task = asyncio.create_task(self._run(job), name=f"edison-job-{job.id}")
        job.task.add_done_callback(functools.partial(self._task_ended, job))
        self._publish("job.queued", job)
        return self.locate(job)

    def _need_of(self, job: Job) -> Callable[[str], TaskNeed]:
        """The job's need on a device: request-sized when the folder's shape is known,
        else the configured figures."""
        if job.shape is not None:
            return functools.partial(self._predict, job)
        cfg = self.pipelines.config(job.kind)
        return functools.partial(
            task_need, required_vram_mb=cfg.required_vram_mb, required_ram_mb=cfg.required_ram_mb
        )

    @staticmethod
    def _reason(job: Job) -> str:
        return f"{job.kind}: {job.params.prompt[:40]}"

    def _task_ended(self, job: Job, task: asyncio.Task[None]) -> None:
        """A job task cancelled before it ran never reached its own clean-up: leave its
        place in line and mark it cancelled here."""
        if job.place is not None:
            job.place.abandon()  # nothing once heavy_task took the place over
        if not job.done.is_set():
            job.status = "cancelled"
            job.error = job.error or JobError("cancelled", "cancelled")
            job.finished_at = time.time()
            job.done.set()
            self._publish("job.finished", job)

    def prune_jobs(self, now: float | None = None) -> int:
        """Forget finished jobs beyond ``MAX_JOBS_KEPT`` (oldest first) and those finished
        longer than ``server.outputs_max_age_h`` ago, wherever they stand in the order
        (an unfinished job never stops the pruning, and is never pruned). Returns how
        many were forgotten."""
        now = time.time() if now is None else now
        max_age_h = self.settings.server.outputs_max_age_h
        cutoff = None if max_age_h is None else now - max_age_h * 3600
        finished = [j for j in self.jobs.values() if j.done.is_set()]  # oldest first
        gone = [
            j.id
            for j in finished
            if cutoff is not None and (j.finished_at or j.created_at) < cutoff
        ]
        excess = len(self.jobs) - len(gone) - MAX_JOBS_KEPT
        gone += [j.id for j in finished if j.id not in gone][: max(0, excess)]
        for job_id in gone:
            self.jobs.pop(job_id, None)
        return len(gone)

    async def warm(self, kind: str) -> float:
        """Load a pipeline and run one tiny step through the gate (start-up preload);
        returns the milliseconds it took."""
        cfg = self.pipelines.config(kind)
        caps = await self.pipelines.caps(kind)
        if caps is None:
            raise ModelUnavailable(f"no {kind} pipeline folder is configured", kind=kind)
        tiny = warm_params(caps)
        shape = await self.pipelines.shape(kind)
        pipelines = self.pipelines

        def need_on(device: str) -> TaskNeed:
            assert shape is not None
            return pipelines.predict(kind, device, tiny, shape).need

        def ladder_on(device: str) -> RungLadder:
            assert shape is not None
            return pipelines.ladder(kind, device, tiny, shape)

        t0 = time.perf_counter()
        # Through the placement ladder as a request is: a pipeline larger than the card
        # preloads at the fastest rung that fits instead of failing at full residency.
        async with self.gate.heavy_task(
            cfg.required_vram_mb,
            f"{kind}: warm-up",
            required_ram_mb=cfg.required_ram_mb,
            kind=kind,
            need_on=None if shape is None else need_on,
            ladder_on=None if shape is None else ladder_on,
        ) as task:
            await self.pipelines.warm(kind, task.device, tiny, option=task.rung)
        return (time.perf_counter() - t0) * 1000

    async def _check_it_can_ever_fit(
        self, kind: str, params: GenerationParams, shape: PipelineShape
    ) -> None:
        placement = self.pipelines.placement
        snap = await placement.snapshot()
        refusals = []
        for device in placement.allowed(snap, self.pipelines.config(kind).device):
            budget = placement.view_of(snap, device=device).budget
            p = self.pipelines.predict(kind, device, params, shape, least=True)
            most = budget.capacity_mb - budget.reserve_mb
            if p.need.source != "learned" or p.need.mb <= most:
                return  # some device could hold it
            refusals.append(
                f"{p.size.text} is predicted to need {p.need.mb:.0f} MB of {p.need.memory} "
                f"(learned from measured runs); {device} can never give more than "
                f"{most:.0f} MB"
            )
        raise InvalidRequest(p.size.field, "; ".join(refusals))

    def _ladder(self, job: Job, device: str) -> RungLadder:
        """The job's placements on ``device``, for the gate to choose from (kept on the job
        for the OOM step-down)."""
        assert job.shape is not None
        job.ladder = self.pipelines.ladder(job.kind, device, job.params, job.shape)
        return job.ladder

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

    # ---- retention -----------------------------------------------------------------
    async def start(self) -> None:
        self._retention = asyncio.create_task(self._retain(), name="edison-outputs-retention")

    async def shutdown(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention

    async def _retain(self) -> None:
        """A retention pass after each job ends and at least every ``PRUNE_EVERY_S``."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._prune_soon.wait(), PRUNE_EVERY_S)
            self._prune_soon.clear()
            try:
                await self.prune()
            except Exception:  # noqa: BLE001 - retention must never stop the service
                log.exception("outputs retention pass failed")

    async def prune(self) -> PruneResult:
        """One retention pass: forget old finished jobs (``prune_jobs``) and delete the
        generated files beyond ``server.outputs_max_age_h`` / ``outputs_max_mb`` (in a
        worker thread), never a file of a job not done."""
        self.prune_jobs()
        unfinished = [j for j in self.jobs.values() if not j.done.is_set()]
        started = [j.started_at for j in unfinished if j.started_at is not None]
        server = self.settings.server
        age_h = server.outputs_max_age_h
        return await anyio.to_thread.run_sync(
            functools.partial(
                prune_outputs,
                server.outputs_dir,
                max_age_s=None if age_h is None else age_h * 3600,
                max_mb=server.outputs_max_mb,
                busy_since=min(started, default=None),
                busy_names=frozenset(o.name for j in unfinished for o in j.outputs),
            )
        )

    async def remove(self, job_id: str) -> Job:
        """Forget a finished job and delete its files; JobNotFinished (409) while it is
        queued or running (cancel it first)."""
        job = self.get(job_id)
        if not job.done.is_set():
            raise JobNotFinished(
                f"Job {job_id!r} is {job.status}: cancel it first (POST /jobs/{job_id}/cancel)",
                job_id=job_id,
                job_status=job.status,
            )
        self.jobs.pop(job.id, None)
        folder = self.settings.server.outputs_dir
        await anyio.to_thread.run_sync(_delete_files, [folder / o.name for o in job.outputs])
        return job

    def _publish(self, type_: str, job: Job, progress: JobProgress | None = None) -> None:
        """Publish the job as it is now (a frozen copy: see :class:`JobState`)."""
        if self.events is not None:
            self.events.publish(type_, self.locate(job).snapshot(progress))

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
        reason = self._reason(job)
        try:
            async with self.gate.heavy_task(
                cfg.required_vram_mb,
                reason,
                required_ram_mb=cfg.required_ram_mb,
                kind=job.kind,
                need_on=self._need_of(job),
                ticket=job.id,
                place=job.place,
                ladder_on=None if job.shape is None else functools.partial(self._ladder, job),
            ) as task:
                if job.cancel_event.is_set():
                    raise Cancelled("Cancelled before it ran")
                job.status = "running"
                job.started_at = time.time()
                self._publish("job.started", job)
                job.gate = task.decision
                job.device = task.device
                job.timings_ms.queued = round(task.queued_ms, 1)
                result = await self._run_with_retry(job, task.device, reason, task.rung)
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
            self._prune_soon.set()
            self._publish("job.finished", job)
            if self.observe:
                self.observe(job.kind, job.status, job.timings_ms.total / 1000)

    async def _run_with_retry(
        self, job: Job, device: str, reason: str, option: RungOption | None
    ) -> RunResult:
        """Run at the rung the gate chose; on a CUDA out-of-memory error (learned as this
        rung's failure at this size) or a rung the model cannot take, the next rung down,
        until the ladder ends: then 503 with the figures."""
        tried: list[str] = []
        while True:
            if option is not None:
                job.predicted = option.predicted
            try:
                return await self._run_pipeline(job, device, option)
            except PipelineOOM as exc:
                failed, why = exc, "out of memory"
                if job.predicted is not None:
                    await self.pipelines.record_oom(job.predicted)
            except RungUnsupported as exc:
                failed, why = exc, f"unsupported ({exc.reason})"
            here = option.label if option is not None else "its placement"
            tried.append(f"{here}: {why}")
            after = None
            if job.ladder is not None and option is not None:
                skip = isinstance(failed, RungUnsupported)
                after = job.ladder.after(option, skip_rung=skip)
            if after is None:
                break
            log.warning("%s at %s in %s: stepping down to %s", why, here, reason, after.label)
            if isinstance(failed, PipelineOOM):
                await self.gate.recover_from_oom(job.kind, reason, device=device)
            option = after
        if isinstance(failed, RungUnsupported):
            raise failed
        budget = (await self.pipelines.placement.view(device=device)).budget
        need = job.predicted.need.mb if job.predicted is not None else None
        raise InsufficientMemory(
            f"{job.kind} ran out of memory at every rung it could take, with nothing else "
            f"loaded: {'; '.join(tried)}",
            retry_after_s=30,
            required_vram_mb=need or self.pipelines.config(job.kind).required_vram_mb,
            free_vram_mb=round(budget.usable_mb, 1),
            freed_mb=0,
            device=device,
        ) from failed

    async def _run_pipeline(self, job: Job, device: str, option: RungOption | None) -> RunResult:
        def on_step(done: int, total: int) -> None:  # in the pipeline's thread
            job.progress = JobProgress(done, total)
            if self.events is not None:  # the event says this step, whenever it is sent
                self.events.from_thread(self._publish, "job.progress", job, job.progress)

        return await self.pipelines.run(
            job.kind,
            device,
            job.params,
            on_step=on_step,
            should_cancel=job.cancel_event.is_set,
            option=option,
        )


def _delete_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _check(field_name: str, ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequest(field_name, message)
