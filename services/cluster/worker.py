"""This node's side of the queue: pull a job only when the local gate has a free line, run it
through the local JobService (placement, ledger, learned need, unloads), write its progress
and result fenced, and hand back what this node can never hold.

Procrastinate's stock worker fetches whenever one of its slots is free and has no hook for
a gate, so this is a small loop on its JobManager: ``fetch_job`` once per admission,
``listen_for_jobs`` for inserts (wake up) and abort requests (cancel the local run).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from services.cluster.config import ClusterSettings
from services.cluster.schema import queue_name
from services.cluster.store import ClusterStore, DatabaseDown
from services.errors import EdisonError, InsufficientMemory, InvalidRequest
from services.generation.jobs import Job, JobService
from services.generation.params import GenerationParams

log = logging.getLogger("edison.cluster")


@dataclasses.dataclass
class Running:
    """A cluster job this node fetched: the engine's id, Edison's id, the local job."""

    edison_id: str
    pid: int
    kind: str
    local: Job | None = None
    lost: bool = False  # a fenced write was refused: the job is no longer ours


class Worker:
    """The fetch loop and the runs it starts. One per node."""

    def __init__(
        self,
        cfg: ClusterSettings,
        store: ClusterStore,
        local: JobService,
        kinds: list[str],
        *,
        worker_id: Callable[[], int | None],
        db_ok: Callable[[], bool],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.local = local
        self.kinds = kinds
        self._worker_id = worker_id
        self._db_ok = db_ok
        self.wake = asyncio.Event()
        self.running: dict[str, Running] = {}  # by engine id (str) and Edison id
        self.refused: set[str] = set()  # Edison ids this node refused (hands them back)
        self._tasks: set[asyncio.Task[None]] = set()
        self.completed = 0

    # ---- admission -------------------------------------------------------------------
    def kinds_with_room(self) -> list[str]:
        """The kinds this node may pull now: a device line of its own is free (nothing
        running or waiting there, and no job fetched here not yet in its line)."""
        gate = self.local.gate
        pending = sum(
            1
            for r in self.running.values()
            if r.local is None or (r.local.status == "queued" and not r.local.done.is_set())
        )
        if pending:
            return []  # one fetch per admission: wait until the last one joined its line
        devices = self._devices()
        free = [d for d in devices if gate.tasks_on(d) == 0]
        return list(self.kinds) if free else []

    def _devices(self) -> list[str]:
        placement = self.local.pipelines.placement
        snap = getattr(self, "_snap", None)
        return placement.devices(snap) if snap is not None else ["cpu"]

    async def refresh_devices(self) -> None:
        self._snap = await self.local.pipelines.placement.snapshot()

    # ---- the loop --------------------------------------------------------------------
    async def run_forever(self) -> None:
        await self.refresh_devices()
        while True:
            worker_id = self._worker_id()
            kinds = self.kinds_with_room() if worker_id is not None and self._db_ok() else []
            job = None
            if kinds:
                try:
                    job = await self.store.fetch([queue_name(k) for k in kinds], worker_id)
                except DatabaseDown as exc:
                    log.warning("fetch failed, the database is unreachable: %s", exc)
            if job is None:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    # Woken by a NOTIFY (insert, requeue), a local job ending, or the poll.
                    await asyncio.wait_for(self.wake.wait(), self.cfg.poll_s)
                continue
            assert job.id is not None and worker_id is not None
            run = Running(str(job.task_kwargs["id"]), job.id, str(job.task_kwargs["kind"]))
            self.running[str(job.id)] = run
            task = asyncio.create_task(self._run(run, worker_id), name=f"edison-cluster-{job.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # Wait until the run joined its line (or ended) before the next admission.
            while run.local is None or (
                run.local.status == "queued"
                and not run.local.done.is_set()
                and not any(e.ticket == run.local.id for e in self.local.gate.queue())
            ):
                if task.done():
                    break
                await asyncio.sleep(0.01)

    async def on_notification(self, channel: str, payload: str) -> None:
        """Procrastinate's notifications: a job inserted or requeued wakes the loop; an
        abort request cancels the local run at its next step."""
        import json

        try:
            note = json.loads(payload)
        except ValueError:
            return
        if note.get("type") == "abort_job_requested":
            run = self.running.get(str(note.get("job_id")))
            if run is not None and run.local is not None:
                self.local.cancel(run.local.id, "cancelled by request (from the cluster)")
        self.wake.set()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---- one run ---------------------------------------------------------------------
    async def _run(self, run: Running, worker_id: int) -> None:
        try:
            await self._run_inner(run, worker_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken run must not end the loop
            log.exception("cluster job %s failed on this node", run.edison_id)
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(Exception):
                await self.store.write_result(
                    run.edison_id, run.pid, worker_id, "failed", result=None,
                    error={**error, "details": {}}, done=0, total=0, device=None,
                )  # fmt: skip
        finally:
            self.running.pop(str(run.pid), None)
            self.wake.set()

    async def _run_inner(self, run: Running, worker_id: int) -> None:
        row = await self._retry_db(lambda: self.store.job(run.edison_id))
        if row is None:
            log.error("cluster job %s has no edison_jobs row", run.edison_id)
            return
        if run.edison_id in self.refused:
            await self._hand_back(run, worker_id, "refused here before", again=True)
            return
        if not await self._retry_db(
            lambda: self.store.start_run(run.edison_id, worker_id, self.name)
        ):
            log.warning("cluster job %s was taken from this node before it started", run.edison_id)
            return
        try:
            # This node's own limits first: a refusal there fails the job, it is no memory
            # question; an InvalidRequest from submit after it is the fit check.
            params, _ = await self.local.prepare(run.kind, GenerationParams(**row.params))
        except EdisonError as exc:
            await self._finish(run, worker_id, "failed", None, _error(exc), 0, 0, None)
            return
        try:
            run.local = await self.local.submit(run.kind, params)
        except InvalidRequest as exc:
            # The learned need is beyond what any device here could ever give.
            self.refused.add(run.edison_id)
            await self._hand_back(run, worker_id, exc.message)
            return
        except EdisonError as exc:
            await self._finish(run, worker_id, "failed", None, _error(exc), 0, 0, None)
            return
        job = run.local
        last = (-1, -1)
        while not job.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.done.wait(), self.cfg.progress_every_s)
            if job.done.is_set():
                break
            now = (job.progress.done, job.progress.total)
            if now == last and not self._db_ok():
                continue
            try:
                ok, abort = await self.store.write_progress(
                    run.edison_id, worker_id, now[0], now[1], job.device
                )
            except DatabaseDown:
                continue  # the run goes on; its result is kept until the database returns
            last = now
            if not ok:
                # Stop at the first refused write: another node owns the job now.
                run.lost = True
                self.local.cancel(job.id, "the cluster gave this job to another node")
                log.warning("cluster job %s is no longer this node's: stopping", run.edison_id)
                await job.done.wait()
                return
            if abort:
                self.local.cancel(job.id, "cancelled by request (from the cluster)")
        if job.status == "failed" and isinstance(job.exc, InsufficientMemory):
            self.refused.add(run.edison_id)
            await self._hand_back(run, worker_id, job.exc.message)
            return
        status = {"succeeded": "succeeded", "cancelled": "aborted"}.get(job.status, "failed")
        result = None
        if job.status == "succeeded":
            result = {
                "outputs": [dataclasses.asdict(o) for o in job.outputs],
                "names": [o.name for o in job.outputs],
                "seed": job.seed,
                "timings_ms": dataclasses.asdict(job.timings_ms),
                "gate": _gate(job),
            }
        error = None
        if job.error is not None:
            error = {"code": job.error.code, "message": job.error.message, "details": {}}
            error["details"] = _jsonable(job.error.details)
        await self._finish(
            run, worker_id, status, result, error, job.progress.done, job.progress.total, job.device
        )

    @property
    def name(self) -> str:
        return self.cfg.node_name

    async def _finish(
        self,
        run: Running,
        worker_id: int,
        status: str,
        result: dict[str, Any] | None,
        error: dict[str, Any] | None,
        done: int,
        total: int,
        device: str | None,
    ) -> None:
        """Write the result; kept here and retried while the database is unreachable."""
        ok = await self._retry_db(
            lambda: self.store.write_result(
                run.edison_id, run.pid, worker_id, status, result=result, error=error,
                done=done, total=total, device=device,
            )
        )  # fmt: skip
        if ok:
            self.completed += 1
        else:
            log.warning(
                "cluster job %s: result refused (the job is no longer this node's)", run.edison_id
            )

    async def _hand_back(
        self, run: Running, worker_id: int, message: str, *, again: bool = False
    ) -> None:
        outcome = await self._retry_db(
            lambda: self.store.hand_back(
                run.edison_id, run.pid, worker_id, run.kind, node=self.name, message=message,
                delay_s=self.cfg.handback_delay_s, timeout_s=self.cfg.heartbeat_timeout_s,
                again=again,
            )
        )  # fmt: skip
        log.info("cluster job %s: %s (%s)", run.edison_id, outcome, message)

    async def _retry_db(self, call: Callable[[], Any]) -> Any:
        """Run a database call until it succeeds: a running job's writes wait out an outage
        (retried at most every two heartbeats, so a result lands soon after it returns)."""
        delay, most = 0.2, min(5.0, max(0.5, 2 * self.cfg.heartbeat_s))
        while True:
            try:
                return await call()
            except DatabaseDown as exc:
                log.warning("database unreachable, retrying in %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, most)


def _error(exc: EdisonError) -> dict[str, Any]:
    return {"code": exc.code, "message": exc.message, "details": _jsonable(exc.details)}


def _gate(job: Job) -> dict[str, Any] | None:
    if job.gate is None:
        return None
    return _jsonable(dataclasses.asdict(job.gate))


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))
