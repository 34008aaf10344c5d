"""Four chats at once on one tier, through Edison: llama-server's slots answer them
together, llama_cpp.server one after another. Ordering of real events, no timings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from services.demo.tiny_gguf import TinyShape, write_tiny_gguf

STREAMS = 4
MAX_TOKENS = 300
# </s> and the 256 byte tokens banned (see bench/chat_proxy.py): every answer runs to
# MAX_TOKENS, streamed token by token (a chunk can carry two tokens that decode together).
BANNED = {str(t): -100 for t in range(2, 259)}


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("c") / "long.gguf", TinyShape(n_ctx_train=2048))


async def one_stream(client: httpx.AsyncClient, i: int, events: list[tuple[str, int]]) -> int:
    body = {
        "model": "fast",
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logit_bias": BANNED,
        "messages": [{"role": "user", "content": f"stream {i}"}],
    }
    chunks = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                chunks += 1
                if chunks == 1:
                    events.append(("first", i))
    events.append(("end", i))
    return chunks


@pytest.mark.anyio
async def test_four_streams_overlap_on_llama_server_and_queue_on_llama_cpp_python(
    make_settings, live_server, long_model: Path, backend: str
) -> None:
    # n_ctx 2048: one request may fill it all on llama_cpp.server, 512 per slot of four
    # on llama-server; either way MAX_TOKENS fits.
    settings = make_settings(
        models={
            "fast": {"path": str(long_model), "n_ctx": 2048},
            "n_threads": 1,
            "backend": backend,
        }
    )
    server = live_server(create_app(settings))
    events: list[tuple[str, int]] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        counts = await asyncio.gather(*(one_stream(client, i, events) for i in range(STREAMS)))
    assert all(MAX_TOKENS // 2 < n <= MAX_TOKENS for n in counts), counts
    kinds = [k for k, _ in events]
    first_end = kinds.index("end")
    if backend == "llama-server":
        # Every stream had its first token before any stream ended: they ran together.
        assert kinds[:first_end] == ["first"] * STREAMS, events
    else:
        # One at a time: each stream's first token came after the previous one ended.
        assert kinds == ["first", "end"] * STREAMS, events
