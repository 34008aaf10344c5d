"""Unloading a model under steady traffic: a draining model gets no new requests (they
wait for the reload), and its worker is ended only once the requests in flight are done.
Real llama.cpp workers on a tiny GGUF, on the CPU; the traffic is real chat requests,
streaming and not, through the ChatProxy."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from services.errors import UpstreamError
from services.llm import unloads
from services.llm.chat import ChatProxy
from services.llm.manager import ModelManager
from services.memory.placement import Placement, ledger_for
from services.memory.probe import MemoryProbe

pytestmark = pytest.mark.anyio


async def test_no_request_sees_its_worker_killed_during_an_unload(
    make_settings, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Longer than any answer here takes, short enough for a test that fails to end.
    monkeypatch.setattr(unloads, "DRAIN_TIMEOUT_S", 15.0)
    settings = make_settings(
        models={
            "fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256, "preload": False},
            "n_threads": 1,
        }
    )
    probe = MemoryProbe(timeout_s=5)
    mm = ModelManager(settings, Placement(settings, probe, ledger_for(settings)))
    chat = ChatProxy(mm)
    first = await mm.load("fast")
    done: list[int] = [0, 0, 0, 0]
    broken: list[str] = []
    stop = anyio.Event()
    body = {
        "model": "fast",
        "max_tokens": 24,
        "temperature": 0,
        "messages": [{"role": "user", "content": "tell me about memory"}],
    }

    async def client(i: int) -> None:
        while not stop.is_set():
            if i % 2:
                opened = await chat.stream({**body, "stream": True})
                text = b"".join([c async for c in opened.chunks]).decode()
                if "upstream_error" in text or "data: [DONE]" not in text:
                    broken.append(text[-200:])
            else:
                try:
                    out = await chat.complete(body)
                    assert out.body["choices"], json.dumps(out.body)[:200]
                except UpstreamError as exc:
                    broken.append(exc.message)
            done[i] += 1

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(done)):
                tg.start_soon(client, i)
            with anyio.fail_after(60):
                while min(done) < 2:
                    await anyio.sleep(0.01)
                out = await mm.unload("fast", reason="test: under traffic")
                assert out.unloaded == ["fast"] and not first.worker.alive
                seen = list(done)
                while any(d < s + 2 for d, s in zip(done, seen, strict=True)):
                    await anyio.sleep(0.01)
            stop.set()
        assert broken == []
        tier = mm.tiers["fast"]
        assert (tier.unloads, tier.loads) == (1, 2)  # the traffic after it brought it back
        assert tier.model is not None and tier.model.worker is not first.worker
        assert tier.model.active == 0
    finally:
        await chat.aclose()
        await mm.unload_all()
