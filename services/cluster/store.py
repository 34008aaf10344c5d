"""The cluster's database: Procrastinate's JobManager for the queue, Edison's tables beside it.

Every method is one short transaction. Writes a running job makes (its start, progress,
result, hand-back) are fenced on the engine still giving the job to this worker
(``status = 'doing' AND worker_id = me``); a refused write returns False or None, and the
caller stops the run there.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from procrastinate import App, PsycopgConnector
from procrastinate import jobs as pjobs
from procrastinate.manager import JobManager
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.cluster import schema as q

log = logging.getLogger("edison.cluster")


class DatabaseDown(Exception):
    """The cluster database cannot be reached (the psycopg error is the cause)."""


@dataclass(frozen=True)
class NodeRow:
    """One node as the database knows it."""

    name: str
    public_url: str
    kinds: list[str]
    meta: dict[str, Any]
    alive: bool
    heartbeat_age_s: float | None
    worker_id: int | None


@dataclass(frozen=True)
class JobRow:
    """One Edison job: Procrastinate's status and attempts with Edison's progress and result."""

    id: str
    procrastinate_id: int
    kind: str
    params: dict[str, Any]
    queue_status: str  # todo | doing | succeeded | failed | cancelled | aborted
    abort_requested: bool
    attempts: int  # the engine's count: finished and requeued runs
    node: str | None
    device: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress_done: int
    progress_total: int
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    runs: list[dict[str, Any]]
    refusals: list[dict[str, Any]]
    place: int | None
    submitted_by: str

    @property
    def runs_started(self) -> int:
        """Runs this job has started, the one under way included."""
        return self.attempts + (1 if self.queue_status == "doing" else 0)


@dataclass(frozen=True)
class QueueStats:
    """One kind's queue: jobs waiting and running now; attempts over the jobs it keeps."""

    queue: str
    queued: int
    running: int
    attempts: int  # the engine's count: finished runs, requeues and hand-backs
    retried: int  # jobs that took more than one attempt (or are on their second)


@dataclass
class SweepOutcome:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _ts(value: Any) -> float | None:
    return None if value is None else value.timestamp()


def _json(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


class ClusterStore:
    """The database of one node: the engine's JobManager plus Edison's own statements."""

    def __init__(
        self, url: str, *, connect_timeout_s: float = 5.0, wait_s: float | None = None
    ) -> None:
        """``wait_s``: the longest Edison's own statements wait for a pooled connection
        before the database counts as lost (default ``connect_timeout_s``)."""
        self.url = url
        self.wait_s = connect_timeout_s if wait_s is None else wait_s
        self.connector = PsycopgConnector(
            conninfo=url,
            min_size=1,
            max_size=6,
            timeout=connect_timeout_s,
            kwargs={"connect_timeout": max(1, int(connect_timeout_s))},
        )
        self.app = App(connector=self.connector)
        self.manager: JobManager = self.app.job_manager
        self.connect_timeout_s = connect_timeout_s

    async def open(self) -> None:
        """Connect and create the schema when missing (DatabaseDown when unreachable)."""
        try:
            await self.connector.open_async()
            await self._apply_schema()
        except (psycopg.Error, OSError) as exc:
            raise DatabaseDown(str(exc)) from exc
        except Exception as exc:  # procrastinate wraps psycopg's errors in its own
            if isinstance(exc.__cause__, psycopg.Error | OSError) or "connect" in str(exc):
                raise DatabaseDown(str(exc)) from exc
            raise

    async def close(self) -> None:
        await self.connector.close_async()

    async def _apply_schema(self) -> None:
        async with self.conn(self.connect_timeout_s) as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (q.SCHEMA_LOCK,))
            try:
                cur = await conn.execute("SELECT to_regclass('procrastinate_jobs') AS t")
                row = await cur.fetchone()
                if row is None or row["t"] is None:
                    log.info("Creating Procrastinate's schema in the cluster database")
                    await conn.execute(self.app.schema_manager.get_schema())
                await conn.execute(q.EDISON_SCHEMA)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (q.SCHEMA_LOCK,))

    @asynccontextmanager
    async def conn(
        self, wait_s: float | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection in one transaction, rows as dicts; DatabaseDown when lost."""
        try:
            async with self.connector.pool.connection(timeout=wait_s or self.wait_s) as conn:
                conn.row_factory = dict_row  # type: ignore[assignment]
                async with conn.transaction():
                    yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            raise DatabaseDown(str(exc)) from exc
        except Exception as exc:
            if type(exc).__name__ == "PoolTimeout":
                raise DatabaseDown(str(exc)) from exc
            raise

    async def _all(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        async with self.conn() as conn:
            cur = await conn.execute(sql, params)  # type: ignore[arg-type]
            return list(await cur.fetchall()) if cur.description else []

    # ---- nodes -----------------------------------------------------------------------
    async def register(
        self, name: str, public_url: str, kinds: list[str], meta: dict[str, Any]
    ) -> int:
        """Register this node's worker (the engine's heartbeat row) and its metadata."""
        try:
            worker_id = await self.manager.register_worker()
        except Exception as exc:  # noqa: BLE001 - the engine wraps the driver's errors
            raise DatabaseDown(str(exc)) from exc
        await self._all(
            q.UPSERT_NODE,
            name=name,
            worker_id=worker_id,
            public_url=public_url,
            kinds=kinds,
            meta=Jsonb(meta),
        )
        return worker_id

    async def heartbeat(self, worker_id: int, name: str, meta: dict[str, Any]) -> bool:
        """Beat and publish this node's metadata; False when the worker row is gone (pruned
        by someone: the caller registers again)."""
        async with self.conn() as conn:
            cur = await conn.execute(q.HEARTBEAT, {"id": worker_id})
            alive = await cur.fetchone() is not None
            await conn.execute(q.UPDATE_NODE_META, {"meta": Jsonb(meta), "name": name})
        return alive

    async def unregister(self, worker_id: int) -> None:
        try:
            await self.manager.unregister_worker(worker_id)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.warning("could not unregister worker %s", worker_id)

    async def nodes(self, timeout_s: float) -> list[NodeRow]:
        rows = await self._all(q.NODES, timeout=timeout_s)
        return [
            NodeRow(
                name=r["name"],
                public_url=r["public_url"],
                kinds=list(r["kinds"]),
                meta=r["meta"] or {},
                alive=bool(r["alive"]),
                heartbeat_age_s=None
                if r["heartbeat_age_s"] is None
                else float(r["heartbeat_age_s"]),
                worker_id=r["worker_id"],
            )
            for r in rows
        ]

    async def queue_stats(self) -> list[QueueStats]:
        return [
            QueueStats(
                r["queue_name"], int(r["queued"]), int(r["running"]), int(r["attempts"]),
                int(r["retried"]),
            )
            for r in await self._all(q.QUEUE_STATS, task=q.TASK_NAME)
        ]  # fmt: skip

    # ---- submitting, viewing, cancelling ---------------------------------------------
    async def enqueue(
        self, job_id: str, kind: str, params: dict[str, Any], total: int, node: str
    ) -> int:
        """The job into the engine's queue for its kind and Edison's row, in one transaction."""
        async with self.conn() as conn:
            deferred = await self.manager.defer_job_async(
                pjobs.Job(
                    id=None,
                    queue=q.queue_name(kind),
                    lock=None,
                    queueing_lock=None,
                    task_name=q.TASK_NAME,
                    task_kwargs={"id": job_id, "kind": kind},
                ),
                connection=conn,
            )
            assert deferred.id is not None
            await conn.execute(
                "INSERT INTO edison_jobs (id, procrastinate_id, kind, params, submitted_by,"
                " progress_total) VALUES (%s, %s, %s, %s, %s, %s)",
                (job_id, deferred.id, kind, Jsonb(params), node, total),
            )
        return deferred.id

    async def job(self, job_id: str) -> JobRow | None:
        rows = await self._all(q.JOB_VIEW, id=job_id)
        if not rows:
            return None
        r = rows[0]
        return JobRow(
            id=r["id"],
            procrastinate_id=r["procrastinate_id"],
            kind=r["kind"],
            params=r["params"],
            queue_status=str(r["queue_status"]),
            abort_requested=bool(r["abort_requested"]),
            attempts=int(r["attempts"]),
            node=r["node"],
            device=r["device"],
            created_at=_ts(r["created_at"]) or 0.0,
            started_at=_ts(r["started_at"]),
            finished_at=_ts(r["finished_at"]),
            progress_done=r["progress_done"],
            progress_total=r["progress_total"],
            result=r["result"],
            error=r["error"],
            runs=list(r["runs"] or []),
            refusals=list(r["refusals"] or []),
            place=None if r["place"] is None else int(r["place"]),
            submitted_by=r["submitted_by"],
        )

    async def cancel(self, procrastinate_id: int) -> bool:
        """A queued job is cancelled at once (it never starts); a running one is asked to
        abort (its node stops it at its next step)."""
        try:
            return await self.manager.cancel_job_by_id_async(procrastinate_id, abort=True)
        except Exception as exc:  # noqa: BLE001 - the engine wraps the driver's errors
            raise DatabaseDown(str(exc)) from exc

    async def note_cancelled(self, job_id: str, message: str) -> None:
        """Why a job that never ran was cancelled."""
        await self._all(
            "UPDATE edison_jobs SET error = %(error)s, finished_at = now() "
            "WHERE id = %(id)s AND finished_at IS NULL",
            id=job_id,
            error=Jsonb({"code": "cancelled", "message": message, "details": {}}),
        )

    async def output_node(self, name: str) -> str | None:
        """The public URL of the node that wrote output ``name``."""
        rows = await self._all(q.OUTPUT_NODE, name=name)
        return rows[0]["public_url"] if rows else None

    # ---- a run, fenced ---------------------------------------------------------------
    async def fetch(self, queues: list[str], worker_id: int) -> pjobs.Job | None:
        try:
            return await self.manager.fetch_job(queues, worker_id)
        except Exception as exc:  # noqa: BLE001 - the engine wraps the driver's errors
            raise DatabaseDown(str(exc)) from exc

    async def start_run(self, job_id: str, worker_id: int, node: str) -> bool:
        rows = await self._all(q.START_RUN, id=job_id, worker_id=worker_id, node=node)
        return bool(rows)

    async def write_progress(
        self, job_id: str, worker_id: int, done: int, total: int, device: str | None
    ) -> tuple[bool, bool]:
        """(accepted, abort requested)."""
        rows = await self._all(
            q.WRITE_PROGRESS, id=job_id, worker_id=worker_id, done=done, total=total, device=device
        )
        if not rows:
            return False, False
        return True, bool(rows[0]["abort_requested"])

    async def write_result(
        self,
        job_id: str,
        pid: int,
        worker_id: int,
        status: str,
        *,
        result: dict[str, Any] | None,
        error: dict[str, Any] | None,
        done: int,
        total: int,
        device: str | None,
    ) -> bool:
        """The result and the engine's finish (``succeeded``, ``failed`` or ``aborted``) in
        one transaction, fenced; False when refused (the job is no longer this worker's)."""
        async with self.conn() as conn:
            cur = await conn.execute(
                q.WRITE_RESULT,
                {
                    "id": job_id,
                    "pid": pid,
                    "worker_id": worker_id,
                    "result": _json(result),
                    "error": _json(error),
                    "done": done,
                    "total": total,
                    "device": device,
                },
            )
            if await cur.fetchone() is None:
                return False
            await conn.execute(q.FINISH, {"pid": pid, "status": status})
        return True

    async def hand_back(
        self,
        job_id: str,
        pid: int,
        worker_id: int,
        kind: str,
        *,
        node: str,
        message: str,
        delay_s: float,
        timeout_s: float,
        again: bool = False,
    ) -> str:
        """Give a job this node can never hold back to the queue for another node; when no
        other live node that runs ``kind`` is left to try, fail it naming every refusal.
        ``again``: this node refused it before (its refusal and attempt are on record: the
        job goes back unchanged). Returns "handed_back", "passed", "failed" or "refused"
        (no longer this worker's)."""
        others = [
            r["name"]
            for r in await self._all(q.WHO_CAN_TAKE, kind=kind, id=job_id, timeout=timeout_s)
            if r["name"] != node
        ]
        if others and again:
            rows = await self._all(q.PASS_BACK, pid=pid, worker_id=worker_id, delay=delay_s)
            return "passed" if rows else "refused"
        if others:
            rows = await self._all(
                q.HAND_BACK, pid=pid, worker_id=worker_id, node=node, message=message,
                delay=delay_s,
            )  # fmt: skip
            return "handed_back" if rows else "refused"
        job = await self.job(job_id)
        refusals = [f"{r['node']}: {r['message']}" for r in (job.refusals if job else [])]
        if not again:
            refusals.append(f"{node}: {message}")
        error = {
            "code": "insufficient_memory_everywhere",
            "message": f"No node of the cluster can hold this {kind} job: {'; '.join(refusals)}",
            "details": {"refusals": refusals},
        }
        async with self.conn() as conn:
            cur = await conn.execute(
                q.FAIL_UNHOLDABLE,
                {
                    "pid": pid,
                    "worker_id": worker_id,
                    "node": node,
                    "message": message,
                    "again": again,
                    "error": Jsonb(error),
                },
            )
            if await cur.fetchone() is None:
                return "refused"
            await conn.execute(q.FINISH, {"pid": pid, "status": "failed"})
        return "failed"

    # ---- the sweep -------------------------------------------------------------------
    async def sweep(self, timeout_s: float, max_attempts: int) -> SweepOutcome:
        rows = await self._all(
            q.SWEEP, task=q.TASK_NAME, timeout=timeout_s, max_attempts=max_attempts
        )
        out = SweepOutcome()
        for r in rows:
            (out.requeued if r["status"] == "todo" else out.failed).append(r["edison_id"])
        return out

    # ---- notifications ---------------------------------------------------------------
    async def listen(
        self, channels: list[str], on_payload: Callable[[str, str], Awaitable[None]]
    ) -> None:
        """Listen on ``channels`` until cancelled (DatabaseDown when the connection fails;
        the caller retries)."""

        async def handle(*, channel: str, payload: str) -> None:
            await on_payload(channel, payload)

        try:
            await self.connector.listen_notify(on_notification=handle, channels=channels)
        except Exception as exc:  # noqa: BLE001 - the engine wraps the driver's errors
            raise DatabaseDown(str(exc)) from exc


def params_json(params: Any) -> dict[str, Any]:
    """A dataclass of request parameters as JSON; input images (decoded bytes) go back to
    data URLs, which the running node checks and decodes again."""
    data = dataclasses.asdict(params)
    for key, value in data.items():
        if isinstance(value, bytes):
            data[key] = "data:application/octet-stream;base64," + base64.b64encode(value).decode()
    return json.loads(json.dumps(data))
