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
MAX_TOKENS = 100
# </s> and the 256 byte tokens banned (see bench/chat_proxy.py): every answer runs to
# MAX_TOKENS, streamed token by token (a chunk can carry two tokens that decode together).
BANNED = {str(t): -100 for t in range(2, 259)}


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wider than the demo models, so tokens come slower than this test reads them: the
    order the chunks arrive in is the order they were generated in."""
    shape = TinyShape(n_embd=512, n_ff=1024, n_layer=4, n_ctx_train=2048)
    return write_tiny_gguf(tmp_path_factory.mktemp("c") / "long.gguf", shape)


async def one_stream(
    client: httpx.AsyncClient, i: int, arrivals: list[tuple[int, int]]
) -> list[int]:
    """Stream one chat; note each content chunk in ``arrivals`` as (stream, order of
    arrival among every stream's chunks). Returns this stream's arrival orders."""
    body = {
        "model": "fast",
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logit_bias": BANNED,
        "messages": [{"role": "user", "content": f"stream {i}"}],
    }
    mine: list[int] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                arrivals.append((i, len(arrivals)))
                mine.append(arrivals[-1][1])
    return mine


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
    arrivals: list[tuple[int, int]] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        streams = await asyncio.gather(*(one_stream(client, i, arrivals) for i in range(STREAMS)))
    assert all(MAX_TOKENS // 2 < len(s) <= MAX_TOKENS for s in streams), streams
    # (first chunk, last chunk) of each stream, in the order the streams started.
    spans = sorted((s[0], s[-1]) for s in streams)
    first_last = min(last for _, last in spans)
    if backend == "llama-server":
        # Every stream had its first token before any stream had its last: together.
        assert all(first < first_last for first, _ in spans), spans
    else:
        # One at a time: each stream's first token came after the previous one's last.
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
