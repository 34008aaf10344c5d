"""The swarm memory policy: how several agents share the GPU, decided from measured memory.

From the figures placement gives (the ledger's ``usable_mb`` on the work device, the
figure the gate decides on) the policy picks:

* ``normal``: at most one heavy tier asked for, or free memory above 2 x threshold.
  Every agent gets its tier and agents run concurrently, except that distinct heavy
  tiers still take turns in the heavy slot (it holds one model; letting them run at
  once would make them evict each other, which is the thrash this layer exists to stop).
* ``time_slice``: threshold <= free <= 2 x threshold. Agents are grouped by tier and
  the groups run one after another; each group holds its model for the whole group,
  so a model is loaded at most once per round.
* ``degraded``: free < threshold. Every agent shares ``swarm.fallback_tier``.

``runner.py`` carries the decision out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.llm.manager import ModelManager
from services.memory.placement import Placement
from services.settings import HEAVY_TIERS, Settings, SwarmSettings

log = logging.getLogger("edison.swarm")

NORMAL, TIME_SLICE, DEGRADED = "normal", "time_slice", "degraded"
SYNTHESIS_TIER = "fast"  # resident, so the synthesis never swaps the heavy slot
_DEFAULT_KEYWORDS = tuple(SwarmSettings().vision_keywords)


def decide(
    heavy_needed: int, free_mb: float, threshold_mb: float, heavy_slots: int = 1
) -> tuple[str, str]:
    """The policy as a function of numbers: (mode, reason).

    Boundaries: free > 2 x threshold is normal; threshold <= free <= 2 x threshold is
    time_slice (both ends included); free < threshold is degraded. No more heavy tiers
    than heavy slots (one per device) is normal whatever the memory: the manager's own
    memory check then decides whether each loads or falls back down the tier chain.
    """
    if heavy_needed <= heavy_slots:
        slots = f", {heavy_slots} heavy slots (one per device)" if heavy_slots > 1 else ""
        return NORMAL, (f"{heavy_needed} heavy tier(s) asked for{slots}: every agent gets its tier")
    if free_mb > 2 * threshold_mb:
        return NORMAL, (
            f"{free_mb:.0f} MB free > 2 x threshold ({2 * threshold_mb:.0f} MB): "
            "every agent gets its tier"
        )
    if free_mb >= threshold_mb:
        return TIME_SLICE, (
            f"{free_mb:.0f} MB free is between the threshold ({threshold_mb:.0f} MB) and "
            f"2 x threshold ({2 * threshold_mb:.0f} MB): groups by model, one after another"
        )
    return DEGRADED, (
        f"{free_mb:.0f} MB free < threshold ({threshold_mb:.0f} MB): "
        "every agent shares the fallback tier"
    )


def should_load_vision(
    has_images: bool, prompt: str, keywords: Iterable[str] = _DEFAULT_KEYWORDS
) -> bool:
    """True when images are present or the prompt names one of the vision keywords
    (whole words, any case): only then is the vision model worth its memory."""
    if has_images:
        return True
    return any(
        re.search(rf"(?<!\w){re.escape(k.strip())}(?!\w)", prompt, re.IGNORECASE)
        for k in keywords
        if k.strip()
    )


@dataclass(frozen=True)
class Agent:
    name: str
    role: str
    model: str  # a tier name


@dataclass
class AgentGroup:
    tier: str
    agents: list[Agent]


def group_agents_by_model(agents: Sequence[Agent]) -> list[AgentGroup]:
    """Agents grouped by tier: light (fast) tiers first, then heavy tiers in order of
    first appearance. Within a group, the agents keep their order."""
    groups: dict[str, AgentGroup] = {}
    for a in agents:
        groups.setdefault(a.model, AgentGroup(a.model, [])).agents.append(a)
    return sorted(groups.values(), key=lambda g: g.tier in HEAVY_TIERS)  # stable


@dataclass(frozen=True)
class PolicyDecision:
    """How a swarm runs, and the figures that decided it."""

    mode: str
    reason: str
    free_vram_mb: float  # usable memory on the work device (RAM on a CPU-only host)
    threshold_mb: float
    heavy_needed: int
    device: str
    heavy_slots: int = 1  # one per device Edison places on


class SwarmMemoryPolicy:
    """Reads memory as the gate does and decides how a swarm runs."""

    def __init__(self, settings: Settings, placement: Placement, manager: ModelManager) -> None:
        self.settings, self.placement, self.manager = settings, placement, manager

    def heavy_needed(self, agents: Sequence[Agent]) -> int:
        """Distinct heavy tiers the agents ask for, loaded or not: the heavy slot holds
        one, so two of them swap in it whatever is loaded now (which one is loaded
        decides only the order the runner takes them in)."""
        return len({a.model for a in agents if a.model in HEAVY_TIERS})

    async def assess(self, agents: Sequence[Agent]) -> PolicyDecision:
        # The very figures the gate decides on; with several devices, the roomiest.
        views = self.placement.views_of(await self.placement.snapshot())
        view = max(views, key=lambda v: v.budget.usable_mb)
        device, free = view.device, view.budget.usable_mb
        threshold = float(self.settings.swarm.degraded_threshold_mb)
        needed = self.heavy_needed(agents)
        mode, reason = decide(needed, free, threshold, len(views))
        if mode == DEGRADED:
            reason += f" ({self.settings.swarm.fallback_tier})"
        log.info(
            "Swarm policy: %s - %s (free=%.0fMB threshold=%.0fMB heavy_needed=%d device=%s "
            "agents=%d)",
            mode,
            reason,
            free,
            threshold,
            needed,
            device,
            len(agents),
        )
        return PolicyDecision(mode, reason, round(free, 1), threshold, needed, device, len(views))
