"""Generation jobs in cluster mode: what ``app.state.jobs`` is when a ``cluster`` section is set.

Any node accepts a request: it is checked here (the same limits, 422 naming the field),
then queued in the engine for its kind. The answer is a mirror :class:`Job` kept in step
with the database (NOTIFY on every change, a poll as a fallback), so the generation
router waits on it, answers 202, or cancels on disconnect exactly as on one host. Every
other call (the local gate's view, warm-ups) goes to the node's own JobService.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.cluster.store import ClusterStore, DatabaseDown, JobRow, params_json
from services.errors import (
    Cancelled,
    EdisonError,
    InsufficientMemory,
    ModelUnavailable,
    NotFound,
    QueueFull,
)
from services.generation.jobs import Job, JobError, JobOutput, JobProgress, JobService, JobTimings
from services.generation.params import GenerationParams

if TYPE_CHECKING:
    from services.cluster.node import ClusterNode

log = logging.getLogger("edison.cluster")
STATUS = {
    "todo": "queued",
    "doing": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
    "aborted": "cancelled",
}


class NoNodeCanHold(InsufficientMemory):
    """Every live node that runs the job's kind refused it: each refusal's figures."""

    code = "insufficient_memory_everywhere"


ERRORS: dict[str, type[EdisonError]] = {
    "insufficient_vram": InsufficientMemory,
    "insufficient_ram": InsufficientMemory,
    "insufficient_memory_everywhere": NoNodeCanHold,
    "cancelled": Cancelled,
}


class DatabaseUnavailable(QueueFull):
    """The cluster database cannot be reached: new generation requests wait (503)."""

    code = "cluster_database_unavailable"


class RemoteJobFailed(EdisonError):
    """A job that failed on another node (or could run nowhere): its code and figures."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.code = code


@dataclass(frozen=True)
class ClusterJob:
    """One job as every node shows it: the job and where and how often it ran."""

    job: Job
    node: str | None
    attempts: int
    submitted_by: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)


def job_from_row(row: JobRow, mirror: Job | None = None) -> Job:
    """The database's job as a :class:`Job` (updating ``mirror`` in place when given)."""
    job = mirror or Job(row.id, row.kind, GenerationParams(**row.params))
    job.status = STATUS.get(row.queue_status, row.queue_status)
    if row.queue_status == "doing" and row.node is None:
        job.status = "queued"  # fetched, its run not started yet
    job.progress = JobProgress(row.progress_done, row.progress_total)
    job.device = row.device
    job.created_at = row.created_at
    job.started_at = row.started_at
    job.finished_at = row.finished_at
    result = row.result or {}
    job.outputs = [JobOutput(**o) for o in result.get("outputs", [])]
    job.seed = result.get("seed")
    if result.get("timings_ms"):
        job.timings_ms = JobTimings(**result["timings_ms"])
    if row.error is not None:
        job.error = JobError(
            row.error.get("code", "internal_error"),
            row.error.get("message", ""),
            row.error.get("details") or {},
        )
    elif job.status == "cancelled":
        job.error = JobError("cancelled", "cancelled")
    if job.status in ("queued", "running"):
        job.position = row.place if job.status == "queued" else 0
    else:
        job.position, job.eta_s = None, None
    if job.status == "failed" and job.error is not None:
        cls = ERRORS.get(job.error.code)
        if cls is not None and issubclass(cls, InsufficientMemory):
            job.exc = cls(job.error.message, **job.error.details)
        else:
            job.exc = RemoteJobFailed(job.error.code, job.error.message, **job.error.details)
    if job.status in ("succeeded", "failed", "cancelled"):
        job.done.set()
    return job


class ClusterJobs:
    """The cluster's job service, in front of this node's own JobService."""

    def __init__(self, node: ClusterNode, local: JobService) -> None:
        self.node = node
        self.local = local
        self.store: ClusterStore = node.store
        self.mirrors: dict[str, Job] = {}
        self._pid: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def __getattr__(self, name: str) -> Any:
        # The local gate's view (active, locate, queue_drain_s), warm-ups, cancel_all.
        return getattr(self.local, name)

    async def submit(self, kind: str, params: GenerationParams) -> Job:
        """Check the request here, then queue it in the engine for any node to run."""
        params, adjustments = await self.local.prepare(kind, params)
        if not self.node.db_ok:
            raise DatabaseUnavailable(
                "The cluster database is unreachable (cluster.database_url): try again",
                retry_after_s=self.node.cfg.heartbeat_s * 2,
            )
        if kind not in self.node.cluster_kinds():
            raise ModelUnavailable(f"No live node of the cluster runs {kind} generation")
        job = Job(uuid.uuid4().hex, kind, params, adjustments=adjustments)
        job.progress.total = params.steps or 0
        try:
            self._pid[job.id] = await self.store.enqueue(
                job.id, kind, params_json(params), job.progress.total, self.node.name
            )
        except DatabaseDown as exc:
            raise DatabaseUnavailable(
                f"The cluster database is unreachable (cluster.database_url): {exc}",
                retry_after_s=self.node.cfg.heartbeat_s * 2,
            ) from exc
        job.position = 1
        self.mirrors[job.id] = job
        while len(self.mirrors) > 1000:
            oldest = next(iter(self.mirrors))
            self.mirrors.pop(oldest)
            self._pid.pop(oldest, None)
        return job

    async def view(self, job_id: str) -> ClusterJob:
        """The job as the database has it (NotFound when no node knows it)."""
        try:
            row = await self.store.job(job_id)
        except DatabaseDown as exc:
            raise DatabaseUnavailable(
                f"The cluster database is unreachable (cluster.database_url): {exc}"
            ) from exc
        if row is None:
            raise NotFound(f"No job {job_id!r}", job_id=job_id)
        self._pid[job_id] = row.procrastinate_id
        mirror = self.mirrors.get(job_id)
        job = job_from_row(row, mirror)
        return ClusterJob(job, row.node, row.runs_started, row.submitted_by, row.runs, row.refusals)

    async def refresh(self, job_id: str) -> None:
        """Bring a mirror in step with the database (after a NOTIFY, or by the poll)."""
        mirror = self.mirrors.get(job_id)
        if mirror is None or mirror.done.is_set():
            return
        row = await self.store.job(job_id)
        if row is not None:
            job_from_row(row, mirror)

    async def refresh_all(self) -> None:
        for job_id in [i for i, m in self.mirrors.items() if not m.done.is_set()]:
            await self.refresh(job_id)

    def get(self, job_id: str) -> Job:
        mirror = self.mirrors.get(job_id)
        return mirror if mirror is not None else self.local.get(job_id)

    async def cancel_async(self, job_id: str, why: str = "cancelled by request") -> ClusterJob:
        """Cancel from any node: a queued job never starts, a running one stops at its next
        step on the node that runs it."""
        view = await self.view(job_id)
        if view.job.done.is_set():
            return view
        pid = self._pid[job_id]
        try:
            await self.store.cancel(pid)
            if view.job.status == "queued":
                await self.store.note_cancelled(job_id, why)
        except DatabaseDown as exc:
            raise DatabaseUnavailable(f"The cluster database is unreachable: {exc}") from exc
        return await self.view(job_id)

    def cancel(self, job_id: str, why: str = "cancelled by request") -> Job:
        """The generation router's cancel (a client that went away): scheduled, not awaited."""
        mirror = self.mirrors.get(job_id)
        if mirror is None:
            return self.local.cancel(job_id, why)
        task = asyncio.create_task(self._cancel_quietly(job_id, why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return mirror

    async def _cancel_quietly(self, job_id: str, why: str) -> None:
        try:
            await self.cancel_async(job_id, why)
        except EdisonError as exc:
            log.warning("could not cancel cluster job %s: %s", job_id, exc.message)

    def cancel_all(self, why: str) -> None:
        self.local.cancel_all(why)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
