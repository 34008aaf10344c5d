"""Chat in a cluster: a node without the tier proxies the chat to the node that has it
loaded (read from the nodes' heartbeat metadata), streaming included; /v1/models on
every node lists the cluster's tiers and where each is loaded."""

from __future__ import annotations

import httpx

from tests.cluster.conftest import Cluster, Node
from tests.helpers import wait_until


def published(front: Node) -> None:
    """Until a's loaded tier is in the database (its metadata goes out with its beats)."""
    wait_until(
        lambda: any(
            "fast" in n["tiers_loaded"] for n in front.get("/system/cluster").json()["nodes"]
        ),
        timeout=60,
        what="a's loaded tier published",
    )


def test_chat_goes_to_the_node_holding_the_tier_streaming_too(shared: Cluster) -> None:
    holder, front = shared.nodes["a"], shared.nodes["b"]  # b has no tiers of its own
    published(front)  # then the very next chat is routed (the nodes are read per chat)
    body = {
        "model": "fast",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    r = httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-edison-node"] == "a" and r.headers["x-edison-tier"] == "fast"
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    chunks = []
    with httpx.stream(
        "POST", f"{front.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as s:
        assert s.status_code == 200 and s.headers["x-edison-node"] == "a"
        assert s.headers["content-type"].startswith("text/event-stream")
        chunks = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]" and len(chunks) >= 2
    # The holder answers its own chats itself.
    r = httpx.post(f"{holder.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and "x-edison-node" not in r.headers


def test_v1_models_lists_the_cluster_tiers_on_every_node(shared: Cluster) -> None:
    published(shared.nodes["b"])
    for node in shared.nodes.values():
        models = {m["id"]: m for m in node.get("/v1/models").json()["data"]}
        fast = models["fast"]
        assert fast["status"] == "loaded" and fast["kind"] == "chat", fast
        assert fast["nodes"] == ["a"]  # where a chat for it goes
        # Tiers configured nowhere are not invented.
        assert not {"medium", "deep"} & set(models)
