"""The stalled-job sweep against a real PostgreSQL, in one process: two sweepers at once
never requeue a job a live worker holds, and requeue a dead worker's job exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.cluster.conftest import Cluster


@pytest.mark.anyio
async def test_two_sweepers_at_once_never_requeue_a_running_job(cluster: Cluster) -> None:
    from services.cluster.store import ClusterStore

    stores = [ClusterStore(cluster.url) for _ in range(2)]
    for s in stores:
        await s.open()
    store = stores[0]
    try:
        live = await store.register("live", "http://127.0.0.1:1", ["image"], {})
        for round_ in range(15):
            dead = await store.register(f"dead{round_}", "http://127.0.0.1:2", ["image"], {})
            jid = f"job{round_}"
            await store.enqueue(jid, "image", {"prompt": "x"}, 2, "live")
            taken = await store.fetch(["edison.image"], dead)
            assert taken is not None
            await store._all(
                "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour' "
                "WHERE id = %(id)s",
                id=dead,
            )
            refetched: list[Any] = []

            async def fetch_when_requeued(refetched: list[Any] = refetched) -> None:
                for _ in range(200):
                    got = await store.fetch(["edison.image"], live)
                    if got is not None:
                        refetched.append(got)
                        return
                    await asyncio.sleep(0.005)

            async def sweep_many(s: ClusterStore) -> int:
                n = 0
                for _ in range(10):
                    n += len((await s.sweep(5.0, 5)).requeued)
                    await asyncio.sleep(0)
                return n

            counts = await asyncio.gather(
                sweep_many(stores[0]), sweep_many(stores[1]), fetch_when_requeued()
            )
            assert counts[0] + counts[1] == 1  # requeued once, by one sweeper
            assert len(refetched) == 1
            row = await store.job(jid)
            assert row is not None
            # The live worker holds it, and no later sweep took it back.
            assert row.queue_status == "doing" and row.attempts == 1
            await store.write_result(
                jid, row.procrastinate_id, live, "succeeded", result={}, error=None,
                done=2, total=2, device="cpu",
            )  # fmt: skip
            # A write from the dead worker is refused (fenced).
            assert not await store.start_run(jid, dead, f"dead{round_}")
    finally:
        for s in stores:
            await s.close()
