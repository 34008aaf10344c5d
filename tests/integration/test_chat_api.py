"""Chat and model endpoints with real llama.cpp workers on tiny models, on the CPU.

Tests taking the ``backend`` fixture run once per worker backend (llama_cpp.server and
llama-server): the proxy, streaming, the ``edison`` field and a worker's death must not
depend on which one serves.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from services.demo.tiny_gguf import TinyShape, write_tiny_gguf
from tests.helpers import FakeGpuProbe, wait_ready, wait_until
from tests.images import data_url, image_bytes, image_message


@pytest.fixture(scope="module")
def long_ctx_model(tmp_path_factory) -> Path:
    """A tiny model trained (nominally) on 2048 tokens, so answers can run long."""
    return write_tiny_gguf(
        tmp_path_factory.mktemp("long") / "long.gguf", TinyShape(n_ctx_train=2048)
    )


@pytest.fixture
def chat_settings(make_settings, tiny_dir):
    def build(**models):
        base = {
            "fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256},
            "medium": {"path": str(tiny_dir / "medium.gguf"), "n_ctx": 256, "preload": False},
            "n_threads": 1,
        }
        return make_settings(models={**base, **models})

    return build


def test_openai_client_against_v1(chat_settings, live_server, backend) -> None:
    server = live_server(create_app(chat_settings(backend=backend)))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    listed = [m.id for m in client.models.list().data]
    assert listed == ["auto", "fast", "medium"]
    out = client.chat.completions.create(
        model="medium", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert out.model == "medium"
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
        )
    )
    assert len(chunks) >= 2
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    memory = httpx.get(f"{server.url}/system/memory", timeout=30).json()
    assert memory["heavy_slot"] == "medium"
    assert {m["key"] for m in memory["loaded_models"]} == {"fast", "medium"}
    fast = next(m for m in memory["loaded_models"] if m["key"] == "fast")
    assert fast["n_ctx"] == 256 and fast["pid"] > 0 and fast["port"] > 0 and fast["heavy"] is False
    assert fast["backend"] == backend and fast["slot_ctx"] == 256
    # No max_tokens: the worker's own tokenizer counts the prompt (llama_cpp.server's
    # /extras/tokenize/count, llama-server's /tokenize) and the answer gets the rest.
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "fast", "messages": [{"role": "user", "content": "hello there"}]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    clamped = r.json()["edison"]["max_tokens_clamped_to"]
    assert 0 < clamped < 256 - 3  # the prompt's tokens, counted, are not in it
    assert r.json()["usage"]["completion_tokens"] <= clamped + 3


def test_stream_passes_chunks_as_they_come(
    chat_settings, long_ctx_model, live_server, backend
) -> None:
    server = live_server(
        create_app(
            chat_settings(fast={"path": str(long_ctx_model), "n_ctx": 2048}, backend=backend)
        )
    )
    body = {
        "model": "fast",
        "stream": True,
        "max_tokens": 400,
        "temperature": 0,  # greedy: the same answer every run (random weights may stop early)
        "messages": [{"role": "user", "content": "go"}],
    }
    arrivals = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["x-edison-tier"] == "fast"
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(json.loads(line[6:]))
    # Many separate events, in order, ending with a finish reason: nothing was buffered into one.
    assert len(arrivals) > 10
    assert arrivals[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_unknown_tier_and_too_long_prompt(chat_settings, backend) -> None:
    with TestClient(create_app(chat_settings(backend=backend))) as client:
        wait_ready(client)
        r = client.post(
            "/v1/chat/completions",
            json={"model": "huge", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "unknown_tier"
        assert r.json()["error"]["tiers"] == ["fast", "medium"]
        long = "hello world " * 400
        r = client.post(
            "/v1/chat/completions",
            json={"model": "fast", "messages": [{"role": "user", "content": long}]},
        )
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["n_ctx"] == 256
        bad = client.post("/v1/chat/completions", json={"model": "fast", "messages": []})
        assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "messages"


def test_killed_worker_answers_502_then_recovers(
    chat_settings, long_ctx_model, live_server, backend
) -> None:
    server = live_server(
        create_app(
            chat_settings(fast={"path": str(long_ctx_model), "n_ctx": 2048}, backend=backend)
        )
    )
    models = server.server.config.app.state.models
    pid = wait_until(lambda: models.tiers["fast"].model, what="fast loaded").pid
    body = {
        "model": "fast",
        "stream": True,
        "max_tokens": 1800,
        "messages": [{"role": "user", "content": "go"}],
    }
    lines = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 3:
                os.kill(pid, signal.SIGKILL)
    tail = [json.loads(x[6:]) for x in lines if x.startswith("data: {")][-1]
    # The stream ends with an error event, not a hang.
    assert (
        tail.get("error", {}).get("code") == "upstream_error" or tail["choices"][0]["finish_reason"]
    )
    wait_until(
        lambda: models.tiers["fast"].model is None or models.tiers["fast"].model.pid != pid,
        what="the killed worker noticed",
    )
    again = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]},
        timeout=60,
    )
    assert again.status_code == 200
    assert models.tiers["fast"].model.pid != pid


def test_client_disconnect_closes_the_upstream(chat_settings, long_ctx_model, live_server) -> None:
    server = live_server(
        create_app(chat_settings(fast={"path": str(long_ctx_model), "n_ctx": 2048}))
    )
    models = server.server.config.app.state.models
    body = {
        "model": "fast",
        "stream": True,
        "max_tokens": 1800,
        "messages": [{"role": "user", "content": "go"}],
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 4:
                break  # leave mid-stream: the context manager closes the connection
    model = models.tiers["fast"].model
    wait_until(lambda: model.active == 0, what="the proxy let go of the worker")
    assert model.worker.alive


def test_images_go_to_vision_or_say_who_answered(chat_settings) -> None:
    with TestClient(create_app(chat_settings())) as client:
        wait_ready(client)
        msg = image_message(data_url(image_bytes()))  # no vision tier configured here
        r = client.post(
            "/v1/chat/completions", json={"model": "auto", "messages": [msg], "max_tokens": 4}
        )
        assert r.status_code == 200, r.text
        meta = r.json()["edison"]
        assert meta["route"] == "images present"
        assert meta["tier"] == "medium" and "vision: not configured" in meta["fallback_reason"]
        assert r.headers["x-edison-tier"] == "medium"


def test_operator_endpoints(chat_settings) -> None:
    with TestClient(create_app(chat_settings())) as client:
        wait_ready(client)
        loaded = client.post("/models/medium/load").json()
        assert loaded["status"] == "loaded" and loaded["loaded"]["rung"] == 0
        pid = loaded["loaded"]["pid"]
        view = client.get("/models").json()
        assert view["heavy_slot"] == "medium"
        out = client.post("/models/medium/unload").json()
        assert out["unloaded"] == ["medium"] and out["held_mb"] > 0 and out["freed_mb"] >= 0
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert client.post("/models/nope/load").status_code == 404
        out = client.post("/models/unload-all").json()
        assert out["unloaded"] == ["fast"]
        assert client.get("/system/memory").json()["loaded_models"] == []


def test_missing_model_file_marks_tier_failed_others_serve(chat_settings, tmp_path) -> None:
    doomed = tmp_path / "medium.gguf"
    doomed.write_bytes(b"GGUF")
    with TestClient(
        create_app(chat_settings(medium={"path": str(doomed), "n_ctx": 256}))
    ) as client:
        wait_ready(client)
        r = client.post("/models/medium/load")
        assert r.status_code == 503 and r.json()["error"]["code"] == "invalid_model_file"
        tiers = {t["tier"]: t for t in client.get("/models").json()["tiers"]}
        assert tiers["medium"]["status"] == "failed" and tiers["medium"]["last_error"]
        ok = client.post(
            "/v1/chat/completions",
            json={"model": "fast", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
        )
        assert ok.status_code == 200


@pytest.mark.anyio
async def test_chat_during_generation_does_not_take_its_memory(chat_settings) -> None:
    """On a 12 GB card (reported by a double: no GPU here) a generation holds 11 GB; a
    chat load that arrives meanwhile lands on a rung that fits beside it."""
    probe = FakeGpuProbe(total_mb=12288, used_mb=0)
    settings = chat_settings(
        fast={"path": chat_settings().models.fast.path, "n_ctx": 256, "preload": False}
    )
    settings.memory.reserve_vram_mb = 512
    app = create_app(settings, probe=probe)
    async with app.router.lifespan_context(app):
        await app.state.ready.wait()
        gate, models = app.state.gate, app.state.models
        async with gate.heavy_task(11500, "video: long job") as task:
            assert task.decision.ok
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                r = await c.post(
                    "/v1/chat/completions",
                    json={
                        "model": "medium",
                        "max_tokens": 2,
                        "messages": [{"role": "user", "content": "x"}],
                    },
                )
            assert r.status_code == 200
            medium = models.tiers["medium"].model
            assert medium.n_gpu_layers == 0 and medium.device == "cuda:0"
            held = app.state.ledger.held_mb("cuda:0")
            assert held <= 12288 - 512  # never more than the card less the reserve
