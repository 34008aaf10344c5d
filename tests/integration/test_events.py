"""GET /events over real HTTP, and job positions with ETAs, on tiny CPU models."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import wait_ready, wait_until


@pytest.fixture
def ops_settings(make_settings, tiny_dir, tiny_pipelines):
    def build(**extra: Any):
        models = {
            "fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256},
            "medium": {"path": str(tiny_dir / "medium.gguf"), "n_ctx": 256, "preload": False},
            "n_threads": 1,
        }
        return make_settings(
            models=extra.pop("models", models),
            generation={
                "image": {
                    "pipeline": str(tiny_pipelines["image"]),
                    "required_ram_mb": 64,
                    "default_steps": 2,
                }
            },
            **extra,
        )

    return build


class EventReader:
    """Reads /events in a thread, as any client would, until told to stop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[dict[str, Any]] = []
        self.connected = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        with httpx.stream("GET", f"{self.url}/events", timeout=60) as r:
            kind = None
            for line in r.iter_lines():
                self.connected.set()
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind != "dropped":
                    self.events.append(json.loads(line[6:]))
                if self._stop.is_set():
                    return

    def __enter__(self) -> EventReader:
        self.thread.start()
        self.connected.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def types(self) -> list[str]:
        return [e["type"] for e in self.events if e["type"] != "memory.snapshot"]


def test_events_arrive_in_order_for_a_load_a_generation_and_an_unload(
    ops_settings, live_server
) -> None:
    server = live_server(create_app(ops_settings()))
    wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 200)
    with EventReader(server.url) as reader:
        assert httpx.post(f"{server.url}/models/medium/load", timeout=60).status_code == 200
        r = httpx.post(
            f"{server.url}/generate-image",
            json={"prompt": "x", "width": 32, "height": 32},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert httpx.post(f"{server.url}/models/medium/unload", timeout=60).status_code == 200
        wait_until(lambda: "model.unloaded" in reader.types(), what="the unload event")
        wait_until(
            lambda: any(e["type"] == "memory.snapshot" for e in reader.events),
            what="a memory snapshot",
        )
    types = reader.types()
    expected = [
        "model.loading",
        "model.loaded",
        "job.queued",
        "gate.decision",
        "job.started",
        "job.progress",
        "job.progress",
        "job.finished",
        "model.unloaded",
    ]
    assert types == expected, types
    seqs = [e["seq"] for e in reader.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    by_type = {e["type"]: e["data"] for e in reader.events}
    assert by_type["model.loaded"]["tier"] == "medium"
    assert by_type["model.loaded"]["status"] == "loaded"
    assert by_type["model.unloaded"]["status"] == "unloaded"
    assert by_type["job.finished"]["status"] == "succeeded"
    assert by_type["job.finished"]["job_id"] == r.json()["job_id"]
    assert by_type["gate.decision"]["ok"] is True
    progress = [e["data"]["progress"] for e in reader.events if e["type"] == "job.progress"]
    assert [p["done"] for p in progress] == [1, 2]
    snapshot = next(e["data"] for e in reader.events if e["type"] == "memory.snapshot")
    assert set(snapshot) >= {"device", "reservations", "gate", "pipelines", "jobs"}


def test_a_hundred_clients_come_and_go_and_leave_nothing_behind(ops_settings, live_server):
    server = live_server(create_app(ops_settings(models={})))
    app = server.app
    wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 200)
    loop = app.state.events._loop

    def tasks() -> int:
        async def count() -> int:
            return len(asyncio.all_tasks())

        return asyncio.run_coroutine_threadsafe(count(), loop).result(10)

    before = tasks()
    with httpx.Client(timeout=30) as client:
        for _ in range(100):
            with client.stream("GET", f"{server.url}/events") as r:
                assert r.status_code == 200
                next(r.iter_raw())  # the opening comment: subscribed
    wait_until(lambda: app.state.events.subscribers == 0, what="every subscriber gone")
    wait_until(lambda: tasks() <= before, what="no task left behind")
    # The bus still serves a client that stays.
    with EventReader(server.url) as reader:
        httpx.post(f"{server.url}/generate-image", json={"prompt": "x", "width": 32, "height": 32})
        wait_until(lambda: "job.finished" in reader.types(), what="events after the churn")


def test_positions_and_etas_move_up_as_jobs_finish(ops_settings, step_gate) -> None:
    with TestClient(create_app(ops_settings(models={}))) as client:
        wait_ready(client)
        body = {"prompt": "x", "width": 32, "height": 32}
        prefer = {"Prefer": "respond-async"}
        ids = [client.post("/generate-image", json=body, headers=prefer).json()["job_id"]]
        step_gate.wait_held()  # the first runs, held at its first step
        for _ in range(3):
            r = client.post("/generate-image", json=body, headers=prefer)
            assert r.status_code == 202 and r.json()["position"] >= 1
            ids.append(r.json()["job_id"])

        def places() -> list[tuple[int | None, float | None]]:
            jobs = [client.get(f"/jobs/{i}").json() for i in ids]
            return [(j["position"], j["eta_s"]) for j in jobs]

        first = places()
        assert [p for p, _ in first] == [0, 1, 2, 3]
        etas = [e for _, e in first]
        assert all(e is not None and e >= 0 for e in etas)
        assert etas[1] < etas[2] < etas[3]
        memory = client.get("/system/memory").json()
        assert [q["ticket"] for q in memory["gate"]["queue"]] == ids[1:]
        assert [q["position"] for q in memory["gate"]["queue"]] == [1, 2, 3]
        assert [j["job_id"] for j in memory["jobs"]] == ids
        step_gate.release_one()  # the first finishes; the second runs and is held
        wait_until(lambda: places()[0][0] is None, what="the first done")
        step_gate.wait_held()
        moved = places()
        assert [p for p, _ in moved] == [None, 0, 1, 2]
        assert moved[0][1] is None  # done: no ETA
        assert moved[2][1] < moved[3][1]
        step_gate.release()
        wait_until(lambda: all(p is None for p, _ in places()), what="all done")
