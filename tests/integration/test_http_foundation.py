"""The foundation endpoints: a real uvicorn server with httpx, TestClient for the rest."""

from __future__ import annotations

import threading

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import wait_until

SNAPSHOT_FIELDS = {
    "ram_total_mb",
    "ram_available_mb",
    "ram_used_mb",
    "gpus",
    "vram_source",
    "timestamp",
    "loaded_models",
    "heavy_slot",
    "gate",
    "device",
    "reservations",
}


def test_system_memory_over_real_http(make_settings, live_server) -> None:
    server = live_server(create_app(make_settings()))
    r = httpx.get(f"{server.url}/system/memory", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert SNAPSHOT_FIELDS <= set(body)
    assert body["ram_total_mb"] >= body["ram_available_mb"] > 0
    assert body["vram_source"] in {"nvml", "torch", "nvidia-smi", "none"}
    assert isinstance(body["loaded_models"], list)
    assert body["gate"]["state"] == "idle"
    dev = body["device"]
    assert dev["usable_mb"] == pytest.approx(
        max(0, min(dev["driver_free_mb"], dev["capacity_mb"] - dev["held_mb"]) - dev["reserve_mb"])
    )
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}


def test_api_key_over_real_http(make_settings, live_server) -> None:
    server = live_server(create_app(make_settings(server={"api_key": "s3cret-key-42"})))
    url = f"{server.url}/system/memory"
    missing = httpx.get(url, timeout=30)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(url, headers={"Authorization": "Bearer s3cret-key-43"}, timeout=30)
    assert wrong.status_code == 401
    ok = httpx.get(url, headers={"Authorization": "Bearer s3cret-key-42"}, timeout=30)
    assert ok.status_code == 200
    for open_path in ("/health", "/ready", "/docs", "/openapi.json"):
        assert httpx.get(f"{server.url}{open_path}", timeout=30).status_code in (200, 503), (
            open_path
        )


def test_ready_turns_200_after_startup(make_settings) -> None:
    with TestClient(create_app(make_settings())) as client:

        def ready() -> httpx.Response | None:
            r = client.get("/ready")
            if r.status_code == 200:
                return r
            assert r.json()["error"]["code"] == "not_ready"
            assert r.headers["retry-after"]
            return None

        r = wait_until(ready, what="/ready answered 200")
        assert r.json()["ready"] is True


def test_unknown_route_uses_the_error_body(make_settings) -> None:
    with TestClient(create_app(make_settings())) as client:
        r = client.get("/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_docs_describe_the_memory_model(make_settings) -> None:
    with TestClient(create_app(make_settings())) as client:
        spec = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    schema = spec["components"]["schemas"]["SystemMemory"]
    assert "vram_source" in schema["properties"]
    assert schema["properties"]["vram_source"]["description"]
    assert "ErrorBody" in spec["components"]["schemas"]


@pytest.mark.anyio
async def test_memory_endpoint_answers_while_the_probe_of_another_request_is_stuck(
    make_settings,
) -> None:
    """A probe that blocks (a hung driver) holds a worker thread, never the event loop."""
    app = create_app(make_settings())
    release = threading.Event()
    entered = threading.Event()
    async with app.router.lifespan_context(app):
        await app.state.ready.wait()
        real = app.state.probe.snapshot
        calls = {"n": 0}

        def snapshot():
            calls["n"] += 1
            if calls["n"] == 1:
                entered.set()
                release.wait(30)
            return real()

        app.state.probe.snapshot = snapshot
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            async with anyio.create_task_group() as tg:
                results = {}

                async def slow() -> None:
                    results["slow"] = await client.get("/system/memory")

                tg.start_soon(slow)
                await anyio.to_thread.run_sync(entered.wait, 30)
                fast = await client.get("/system/memory")
                health = await client.get("/health")
                assert "slow" not in results  # the stuck one is still stuck...
                release.set()  # ...while the others were served
            assert fast.status_code == health.status_code == results["slow"].status_code == 200
