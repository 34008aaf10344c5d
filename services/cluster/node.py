"""One Edison node of a cluster: its heartbeat, its sweeps for stalled jobs, its fetch loop,
and what it tells the other nodes (devices, loaded tiers, kinds).

Built in the app's lifespan only when the config has a ``cluster`` section; the rest of
Edison sees it through ``app.state.cluster`` and ``app.state.jobs`` (a ClusterJobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from services.cluster.config import ClusterSettings
from services.cluster.jobs import ClusterJobs
from services.cluster.schema import JOB_CHANNEL
from services.cluster.store import ClusterStore, DatabaseDown, NodeRow, QueueStats
from services.cluster.worker import Worker
from services.errors import ConfigError
from services.generation.jobs import JobService
from services.llm.manager import ModelManager
from services.memory.gate import MemoryGate
from services.memory.placement import Placement
from services.settings import KINDS, Settings

log = logging.getLogger("edison.cluster")


@dataclass(frozen=True)
class ClusterView:
    """Every node and the queue, as /system/cluster shows them."""

    this_node: str
    database_ok: bool
    nodes: list[NodeRow]
    queues: list[QueueStats]


class ClusterNode:
    def __init__(
        self,
        settings: Settings,
        placement: Placement,
        models: ModelManager,
        gate: MemoryGate,
        local: JobService,
    ) -> None:
        assert settings.cluster is not None
        self.settings = settings
        self.cfg: ClusterSettings = settings.cluster
        self.placement = placement
        self.models = models
        self.gate = gate
        self.local = local
        # A heartbeat that cannot get a connection within two beats finds the database lost
        # (/ready then says so) rather than waiting out the whole connect timeout.
        wait_s = min(self.cfg.connect_timeout_s, max(2.0, 2 * self.cfg.heartbeat_s))
        self.store = ClusterStore(
            self.cfg.database_url, connect_timeout_s=self.cfg.connect_timeout_s, wait_s=wait_s
        )
        self.kinds = [k for k in KINDS if getattr(settings.generation, k).pipeline is not None]
        self.worker_id: int | None = None
        self.db_ok = False
        self._healthy_since: float | None = None  # monotonic time the database came back
        self._nodes: list[NodeRow] = []
        self._last_meta: dict[str, Any] = {}
        self.jobs = ClusterJobs(self, local)
        self.worker = Worker(
            self.cfg, self.store, local, self.kinds,
            worker_id=lambda: self.worker_id, db_ok=lambda: self.db_ok,
        )  # fmt: skip
        self._tasks: list[asyncio.Task[None]] = []
        self.sweeps = 0
        self.swept_requeued = 0
        self.swept_failed = 0

    @property
    def name(self) -> str:
        return self.cfg.node_name

    async def start(self) -> None:
        """Connect, register, and start the loops; ConfigError naming cluster.database_url
        when the database cannot be reached."""
        try:
            await self.store.open()
            self._last_meta = await self._meta()
            self.worker_id = await self.store.register(
                self.name, self.cfg.public_url, self.kinds, self._last_meta
            )
        except DatabaseDown as exc:
            with contextlib.suppress(Exception):
                await self.store.close()
            raise ConfigError(
                f"cluster.database_url: cannot reach the cluster database "
                f"{_redacted(self.cfg.database_url)}: {exc}"
            ) from exc
        self._set_db(True)
        await self._refresh_nodes()
        log.info(
            "Cluster node %s (worker %s) consumes %s",
            self.name,
            self.worker_id,
            self.kinds or "none",
        )
        for coro, name in (
            (self._heartbeats(), "heartbeat"),
            (self._metas(), "meta"),
            (self._sweeps(), "sweep"),
            (self._listen_jobs(), "listen-jobs"),
            (self._listen_queue(), "listen-queue"),
            (self._poll_mirrors(), "poll-mirrors"),
            (self.worker.run_forever(), "fetch"),
        ):
            self._tasks.append(asyncio.create_task(coro, name=f"edison-cluster-{name}"))

    async def stop(self) -> None:
        await self.worker.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.jobs.aclose()
        if self.worker_id is not None and self.db_ok:
            await self.store.unregister(self.worker_id)
        with contextlib.suppress(Exception):
            await self.store.close()

    # ---- state -----------------------------------------------------------------------
    def _set_db(self, ok: bool) -> None:
        if ok and not self.db_ok:
            self._healthy_since = time.monotonic()
            if self._tasks:
                log.warning("cluster database reachable again")
        elif not ok and self.db_ok:
            self._healthy_since = None
            log.error("cluster database unreachable: new generation requests get 503")
        self.db_ok = ok

    def cluster_kinds(self) -> set[str]:
        """Kinds some live node runs (from the last heartbeat's read of the nodes)."""
        kinds = {k for n in self._nodes if n.alive for k in n.kinds}
        return kinds | set(self.kinds)

    def nodes(self) -> list[NodeRow]:
        """The nodes as the last heartbeat read them (at most ``heartbeat_s`` old)."""
        return list(self._nodes)

    async def fresh_nodes(self) -> list[NodeRow]:
        """The nodes read now; the last heartbeat's read when the database is lost."""
        try:
            await self._refresh_nodes()
        except DatabaseDown:
            pass
        return list(self._nodes)

    async def view(self) -> ClusterView:
        try:
            nodes = await self.store.nodes(self.cfg.heartbeat_timeout_s)
            queues = await self.store.queue_stats()
        except DatabaseDown:
            return ClusterView(self.name, False, self._nodes, [])
        return ClusterView(self.name, True, nodes, queues)

    async def _meta(self) -> dict[str, Any]:
        """What the other nodes read about this one: devices, loaded tiers, its gate."""
        snap = await self.placement.snapshot()
        devices = [
            {
                "device": v.device,
                "capacity_mb": round(v.budget.capacity_mb, 1),
                "usable_mb": round(v.budget.usable_mb, 1),
                "reserve_mb": round(v.budget.reserve_mb, 1),
            }
            for v in self.placement.views_of(snap)
        ]
        described = self.models.describe()
        return {
            "devices": devices,
            "tiers_loaded": [t.tier for t in described if t.status == "loaded"],
            "tiers_configured": [t.tier for t in described],
            "tiers_heavy": [t.tier for t in described if t.heavy],
            "gate": {
                "running": len(self.gate.running()),
                "waiting": self.gate.queue_length,
            },
            "running_jobs": len(self.worker.running),
        }

    # ---- loops -----------------------------------------------------------------------
    async def _metas(self) -> None:
        """What the heartbeat publishes, refreshed apart from it: a slow probe must never
        delay a beat (a late beat gets this node's job requeued)."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            try:
                self._last_meta = await self._meta()
            except Exception:  # noqa: BLE001 - the last figures stand
                log.exception("node metadata refresh failed")

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            try:
                meta = {**self._last_meta, "running_jobs": len(self.worker.running)}
                assert self.worker_id is not None
                if not await self.store.heartbeat(self.worker_id, self.name, meta):
                    log.warning("this node's worker row was pruned: registering again")
                    self.worker_id = await self.store.register(
                        self.name, self.cfg.public_url, self.kinds, meta
                    )
                self._set_db(True)
                await self._refresh_nodes()
            except DatabaseDown as exc:
                self._set_db(False)
                log.debug("heartbeat failed: %s", exc)
            except Exception:  # noqa: BLE001 - the heartbeat must go on
                log.exception("heartbeat failed")

    async def _refresh_nodes(self) -> None:
        self._nodes = await self.store.nodes(self.cfg.heartbeat_timeout_s)

    async def _sweeps(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sweep_every_s)
            # A node that just got the database back waits one full timeout before it
            # sweeps, so every live node has had the time to beat again.
            since = self._healthy_since
            if not self.db_ok or since is None:
                continue
            if time.monotonic() - since < self.cfg.heartbeat_timeout_s:
                continue
            try:
                out = await self.store.sweep(self.cfg.heartbeat_timeout_s, self.cfg.max_attempts)
            except DatabaseDown:
                continue
            except Exception:  # noqa: BLE001 - the sweep must go on
                log.exception("sweep failed")
                continue
            self.sweeps += 1
            self.swept_requeued += len(out.requeued)
            self.swept_failed += len(out.failed)
            for job_id in out.requeued:
                log.warning("job %s: its node stopped heartbeating; requeued", job_id)
            for job_id in out.failed:
                log.error("job %s: its node stopped heartbeating; failed (max_attempts)", job_id)

    async def _listen_jobs(self) -> None:
        """Edison's own channel: a job's status or row changed, refresh its mirror."""

        async def on(channel: str, payload: str) -> None:
            if payload in self.jobs.mirrors:
                try:
                    await self.jobs.refresh(payload)
                except DatabaseDown:
                    pass

        await self._listen_forever([JOB_CHANNEL], on)

    async def _listen_queue(self) -> None:
        """The engine's channels for this node's queues: inserts, requeues, abort requests."""
        from procrastinate.manager import get_channel_for_queues

        from services.cluster.schema import queue_name

        channels = list(get_channel_for_queues([queue_name(k) for k in self.kinds]))
        if channels:
            await self._listen_forever(channels, self.worker.on_notification)

    async def _listen_forever(self, channels: list[str], on: Any) -> None:
        while True:
            try:
                await self.store.listen(channels, on)
            except DatabaseDown as exc:
                log.debug("listen on %s lost: %s", channels, exc)
            await asyncio.sleep(min(1.0, self.cfg.heartbeat_s))
            self.worker.wake.set()

    async def _poll_mirrors(self) -> None:
        """A fallback for a NOTIFY lost while the listening connection was down."""
        while True:
            await asyncio.sleep(self.cfg.poll_s)
            try:
                await self.jobs.refresh_all()
            except DatabaseDown:
                continue
            except Exception:  # noqa: BLE001
                log.exception("refreshing job mirrors failed")


def _redacted(url: str) -> str:
    """The URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"
