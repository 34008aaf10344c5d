"""Chat in a cluster: a node without the tier proxies the chat to the node that has it
loaded (read from the nodes' heartbeat metadata), streaming included."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.cluster.conftest import Cluster
from tests.helpers import wait_until


def test_chat_goes_to_the_node_holding_the_tier_streaming_too(
    cluster: Cluster, tiny_dir: Path
) -> None:
    holder = cluster.start(
        "holder",
        models={"fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256}, "n_threads": 1},
    )
    front = cluster.start("front")  # no tiers of its own
    wait_until(
        lambda: any(
            "fast" in n["tiers_loaded"] for n in front.get("/system/cluster").json()["nodes"]
        ),
        timeout=60,
        what="front sees the holder's loaded tier",
    )
    body = {
        "model": "fast",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    r = httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-edison-node"] == "holder" and r.headers["x-edison-tier"] == "fast"
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    chunks = []
    with httpx.stream(
        "POST", f"{front.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as s:
        assert s.status_code == 200 and s.headers["x-edison-node"] == "holder"
        assert s.headers["content-type"].startswith("text/event-stream")
        chunks = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]" and len(chunks) >= 2
    # The holder answers its own chats itself.
    r = httpx.post(f"{holder.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and "x-edison-node" not in r.headers
