"""ClosingStreamingResponse runs its close however the response ends: the chat lease and
the cluster proxies' upstream connections rely on it. Driven at the ASGI level, with a
client that disconnects (what a real server sends when the socket goes)."""

from __future__ import annotations

import anyio
import pytest

from app.streaming import ClosingStreamingResponse

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _drive(response: ClosingStreamingResponse, disconnect_after: float | None) -> list:
    sent: list = []

    async def receive() -> dict:
        if disconnect_after is None:
            await anyio.sleep_forever()
        await anyio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "GET", "headers": []}
    with anyio.fail_after(10):
        await response(scope, receive, send)
    return sent


async def test_an_upstream_that_never_answers_is_closed_when_the_client_leaves() -> None:
    closed = []

    async def upstream():  # a proxied node that sends nothing yet
        await anyio.sleep_forever()
        yield b""

    async def close() -> None:
        await anyio.sleep(0.01)  # an await in the close: it must not be cancelled again
        closed.append(True)

    response = ClosingStreamingResponse(upstream(), on_close=close, status_code=202)
    await _drive(response, disconnect_after=0.05)
    assert closed == [True]


async def test_a_finished_stream_keeps_its_status_and_closes_once() -> None:
    closed = []

    async def body():
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    async def close() -> None:
        closed.append(True)

    response = ClosingStreamingResponse(
        body(), on_close=close, status_code=429, media_type="text/event-stream"
    )
    sent = await _drive(response, disconnect_after=None)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 429
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"data: 1\n\ndata: 2\n\n"
    assert closed == [True]
