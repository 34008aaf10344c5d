"""A streaming chat's lease on its model ends however the response ends: a client that
disconnects at once, before the first chunk, included. A real uvicorn on loopback, a
real llama.cpp worker on a tiny GGUF, a raw socket as the impatient client."""

from __future__ import annotations

import json
import socket

import pytest

from app.main import create_app
from services.llm.chat import ChatProxy
from services.llm.manager import ModelManager
from tests.helpers import wait_until


def send_and_hang_up(port: int, body: dict) -> None:
    """POST ``body`` and close the connection at once, reading nothing."""
    data = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + data)


def in_flight(models: ModelManager) -> int:
    return sum(m.active for m in models.loaded_models())


def test_a_client_gone_before_the_first_chunk_leaves_no_lease(
    make_settings, tiny_dir, live_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    leased: list[str] = []
    fit = ChatProxy._fit

    async def counted(self, body, res):  # noqa: ANN001, ANN202 - a spy: runs under the lease
        leased.append(res.tier)
        return await fit(self, body, res)

    monkeypatch.setattr(ChatProxy, "_fit", counted)
    settings = make_settings(
        models={"fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256}, "n_threads": 1}
    )
    server = live_server(create_app(settings))
    models: ModelManager = server.app.state.models
    wait_until(lambda: models.tiers["fast"].status == "loaded", timeout=60, what="fast loaded")
    body = {
        "model": "fast",
        "stream": True,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello"}],
    }
    for n in range(1, 4):
        send_and_hang_up(server.port, body)
        wait_until(lambda n=n: len(leased) == n, what=f"request {n} took its lease")
        wait_until(lambda: in_flight(models) == 0, timeout=20, what="the lease released")
    model = models.tiers["fast"].model
    assert model is not None and model.idle.is_set() and model.worker.alive


def test_a_client_gone_under_asgi_2_4_leaves_no_lease(make_settings, tiny_dir) -> None:
    """The same client, as an ASGI 2.4 server reports it: ``send`` raises OSError once the
    client is gone, so Starlette stops before it iterates the body (the chunks' own
    ``finally`` never runs). uvicorn 0.55 speaks 2.3, where httpcore's shielded close let
    the old code through; Hypercorn-style servers do this. The app runs its lifespan in a
    TestClient; the request is one ASGI call made here, playing that server."""
    from fastapi.testclient import TestClient

    from tests.helpers import wait_ready

    settings = make_settings(
        models={"fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256}, "n_threads": 1}
    )
    app = create_app(settings)
    body = json.dumps(
        {
            "model": "fast",
            "stream": True,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    sent: list[str] = []

    async def call() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message["type"])
            raise OSError("the client went away")  # ASGI 2.4: the connection is closed

        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - Starlette's ClientDisconnect: what a server logs
            pass

    with TestClient(app) as client:
        wait_ready(client)
        models: ModelManager = app.state.models
        assert client.portal is not None
        client.portal.call(call)
        assert sent == ["http.response.start"]  # refused at the first message
        wait_until(lambda: in_flight(models) == 0, timeout=10, what="the lease released")
        assert models.tiers["fast"].model is not None
