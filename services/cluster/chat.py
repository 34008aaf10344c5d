"""Where a chat goes in a cluster: to a node that has the tier loaded, read from the nodes'
heartbeat metadata; this node's own load path otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from services.cluster.store import NodeRow
from services.errors import EdisonError
from services.llm.manager import ModelManager

ROUTED_HEADER = "X-Edison-Routed-From"  # set on a proxied chat: it is never routed again


@dataclass(frozen=True)
class ChatRoute:
    node: str
    url: str
    because: str


def loaded_here(models: ModelManager, tier: str) -> bool:
    try:
        return models.tier_view(tier).status == "loaded"
    except EdisonError:
        return False  # not a tier of this node


def route_chat(
    tier: str, models: ModelManager, nodes: list[NodeRow], this_node: str
) -> ChatRoute | None:
    """The node to proxy a chat for ``tier`` to, or None for this node's own path: ``auto``
    and a tier loaded here stay here; else the live node holding it that has been heard from
    most recently."""
    if tier == "auto" or loaded_here(models, tier):
        return None
    holders = [
        n
        for n in nodes
        if n.alive and n.name != this_node and tier in n.meta.get("tiers_loaded", [])
    ]
    if not holders:
        return None
    best = min(holders, key=lambda n: n.heartbeat_age_s or 0.0)
    return ChatRoute(best.name, best.public_url, f"{best.name} has {tier} loaded")


@dataclass(frozen=True)
class ClusterTier:
    """A chat tier somewhere in the cluster: the live nodes that have it loaded."""

    tier: str
    heavy: bool
    loaded_on: list[str]


def cluster_tiers(models: ModelManager, nodes: list[NodeRow], this_node: str) -> list[ClusterTier]:
    """Every tier some live node configures (this node's first, in its order), with the
    nodes that have it loaded now (this node's own state read live, the others' from their
    last heartbeat)."""
    order: dict[str, bool] = {t.tier: t.heavy for t in models.describe()}
    loaded: dict[str, list[str]] = {t: [] for t in order}
    for t in models.describe():
        if t.status == "loaded":
            loaded[t.tier].append(this_node)
    for n in nodes:
        if not n.alive or n.name == this_node:
            continue
        heavy = set(n.meta.get("tiers_heavy", []))
        for tier in n.meta.get("tiers_configured", []):
            order.setdefault(tier, tier in heavy)
            loaded.setdefault(tier, [])
        for tier in n.meta.get("tiers_loaded", []):
            loaded.setdefault(tier, []).append(n.name)
            order.setdefault(tier, tier in heavy)
    return [ClusterTier(t, order[t], sorted(loaded[t])) for t in order]
