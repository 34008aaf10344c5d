"""Layer 4: the swarm memory policy, and the swarm that follows it.

Several agents answer one prompt, each on a tier of its choice. From measured memory
(the ledger's ``usable_mb``, the figure the gate decides on) the policy picks:

* ``normal``: at most one heavy model to load, or free memory above 2 x threshold.
  Every agent gets its tier and agents run concurrently, except that distinct heavy
  tiers still take turns in the heavy slot (it holds one model; letting them run at
  once would make them evict each other, which is the thrash this layer exists to stop).
* ``time_slice``: threshold <= free <= 2 x threshold. Agents are grouped by tier and
  the groups run one after another; each group holds its model for the whole group,
  so a model is loaded at most once per round.
* ``degraded``: free < threshold. Every agent shares ``swarm.fallback_tier``.

Every load goes through ModelManager, which checks the ledger: a swarm never loads a
model into memory that a running generation holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from services.chat_proxy import ChatProxy
from services.errors import ContextLengthExceeded, EdisonError, InvalidRequest
from services.memory_ledger import MemoryLedger, device_name
from services.memory_probe import MemoryProbe
from services.model_manager import ModelManager
from services.model_records import FALLBACKS, Resolution
from services.settings import HEAVY_TIERS, Settings, SwarmSettings

log = logging.getLogger("edison.swarm")

NORMAL, TIME_SLICE, DEGRADED = "normal", "time_slice", "degraded"
SYNTHESIS_TIER = "fast"  # resident, so the synthesis never swaps the heavy slot
_DEFAULT_KEYWORDS = tuple(SwarmSettings().vision_keywords)


def decide(heavy_needed: int, free_mb: float, threshold_mb: float) -> tuple[str, str]:
    """The policy as a function of numbers: (mode, reason).

    Boundaries: free > 2 x threshold is normal; threshold <= free <= 2 x threshold is
    time_slice (both ends included); free < threshold is degraded. At most one heavy
    model to load is normal whatever the memory: the manager's own memory check then
    decides whether it loads or falls back down the tier chain.
    """
    if heavy_needed <= 1:
        return NORMAL, f"{heavy_needed} heavy model(s) to load: every agent gets its tier"
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

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.tier, "agents": [a.name for a in self.agents]}


def group_agents_by_model(agents: Sequence[Agent]) -> list[AgentGroup]:
    """Agents grouped by tier: light (fast) tiers first, then heavy tiers in order of
    first appearance. Within a group, the agents keep their order."""
    groups: dict[str, AgentGroup] = {}
    for a in agents:
        groups.setdefault(a.model, AgentGroup(a.model, [])).agents.append(a)
    return sorted(groups.values(), key=lambda g: g.tier in HEAVY_TIERS)  # stable


@dataclass(frozen=True)
class PolicyDecision:
    mode: str
    reason: str
    free_mb: float
    threshold_mb: float
    heavy_needed: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "reason": self.reason,
            "free_vram_mb": round(self.free_mb, 1),
            "threshold_mb": self.threshold_mb,
            "heavy_needed": self.heavy_needed,
            "device": self.device,
        }


class SwarmMemoryPolicy:
    """Reads memory as the gate does and decides how a swarm runs."""

    def __init__(
        self, settings: Settings, probe: MemoryProbe, ledger: MemoryLedger, manager: ModelManager
    ) -> None:
        self.settings, self.probe, self.ledger, self.manager = settings, probe, ledger, manager

    def heavy_needed(self, agents: Sequence[Agent]) -> int:
        """Distinct heavy tiers the agents ask for that are not resident (a resident
        model needs no new memory)."""
        return len({a.model for a in agents if a.model in HEAVY_TIERS and not self._resident(a)})

    def _resident(self, agent: Agent) -> bool:
        tier = self.manager.tiers.get(agent.model)
        return tier is not None and tier.model is not None and tier.model.worker.alive

    async def assess(self, agents: Sequence[Agent]) -> PolicyDecision:
        snap = await anyio.to_thread.run_sync(self.probe.snapshot)
        device = device_name(snap, self.settings.memory.device)
        free = self.ledger.budget(snap, device).usable_mb
        threshold = float(self.settings.swarm.degraded_threshold_mb)
        needed = self.heavy_needed(agents)
        mode, reason = decide(needed, free, threshold)
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
        return PolicyDecision(mode, reason, free, threshold, needed, device)


@dataclass
class SwarmRun:
    """One swarm request, as the router hands it over."""

    prompt: str
    agents: list[Agent]
    rounds: int = 1
    synthesize: bool = False
    images: list[str] = field(default_factory=list)
    max_tokens: int = 64


@dataclass
class _Swarm:
    """What one swarm's rounds share."""

    run: SwarmRun
    asked: dict[str, str]  # agent name -> the tier it asked for
    notes: dict[str, str]  # agent name -> why it runs on another tier
    errors: list[EdisonError] = field(default_factory=list)


class SwarmService:
    """One per app: validates a swarm, asks the policy, runs the rounds."""

    def __init__(
        self,
        settings: Settings,
        probe: MemoryProbe,
        ledger: MemoryLedger,
        manager: ModelManager,
        chat: ChatProxy,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.chat = chat
        self.policy = SwarmMemoryPolicy(settings, probe, ledger, manager)

    def validate(self, run: SwarmRun) -> None:
        """Limits that depend on the config: raise InvalidRequest naming the field."""
        cfg = self.settings.swarm
        if len(run.agents) > cfg.max_agents:
            raise InvalidRequest(
                "agents",
                f"at most {cfg.max_agents} agents (swarm.max_agents), got {len(run.agents)}",
            )
        seen: set[str] = set()
        for i, a in enumerate(run.agents):
            if a.model not in self.manager.tiers:
                configured = ", ".join(self.manager.tiers) or "none"
                raise InvalidRequest(
                    f"agents.{i}.model", f"tier {a.model!r} is not configured ({configured})"
                )
            if a.name in seen:
                raise InvalidRequest(f"agents.{i}.name", f"duplicate agent name {a.name!r}")
            seen.add(a.name)

    def _route(self, run: SwarmRun) -> tuple[list[Agent], dict[str, str]]:
        """The agents on the tiers they will run on, and a note for each moved one."""
        notes: dict[str, str] = {}
        vision = should_load_vision(
            bool(run.images), run.prompt, self.settings.swarm.vision_keywords
        )
        out = []
        for a in run.agents:
            if a.model == "vision" and not vision:
                tier = next((t for t in FALLBACKS["vision"] if t in self.manager.tiers), "vision")
                if tier != "vision":
                    notes[a.name] = f"vision not loaded: no images or vision keywords; {tier} asked"
                    a = dataclasses.replace(a, model=tier)
            out.append(a)
        return out, notes

    async def run(self, run: SwarmRun) -> dict[str, Any]:
        t_start = time.perf_counter()
        self.validate(run)
        agents, notes = self._route(run)
        policy = await self.policy.assess(agents)
        if policy.mode == DEGRADED:
            fb = self.settings.swarm.fallback_tier
            for a in agents:
                notes[a.name] = f"degraded mode: every agent shares the {fb} tier"
            agents = [dataclasses.replace(a, model=fb) for a in agents]
        groups = group_agents_by_model(agents)

        s = _Swarm(run, {a.name: a.model for a in run.agents}, notes)
        t_policy = time.perf_counter()
        responses: list[dict[str, Any]] = []
        schedule: list[dict[str, Any]] = []
        round_ms: list[float] = []
        previous: dict[str, str] = {}
        for round_no in range(1, run.rounds + 1):
            t0, loads0 = time.perf_counter(), self.manager.loads_total()
            out, order = await self._run_round(s, groups, policy.mode, round_no, previous)
            responses += out
            previous = {r["agent"]: r["content"] for r in out if r["content"] is not None}
            round_ms.append(round((time.perf_counter() - t0) * 1000, 1))
            schedule.append(
                {
                    "round": round_no,
                    "order": order,
                    "concurrent": policy.mode == NORMAL,
                    "loads": self.manager.loads_total() - loads0,
                }
            )
        if s.errors and all(r["content"] is None for r in responses):
            raise s.errors[0]  # no agent answered at all: report why

        synthesis, synthesis_ms = None, None
        if run.synthesize:
            t0 = time.perf_counter()
            tier = self.settings.swarm.fallback_tier if policy.mode == DEGRADED else SYNTHESIS_TIER
            synthesis = await self._synthesize(tier, run, previous)
            synthesis_ms = round((time.perf_counter() - t0) * 1000, 1)
        return {
            "policy": policy.to_dict(),
            "groups": [g.to_dict() for g in groups],
            "responses": responses,
            "synthesis": synthesis,
            "schedule": schedule,
            "timings_ms": {
                "policy": round((t_policy - t_start) * 1000, 1),
                "rounds": round_ms,
                "synthesis": synthesis_ms,
                "total": round((time.perf_counter() - t_start) * 1000, 1),
            },
        }

    async def _run_round(
        self,
        s: _Swarm,
        groups: list[AgentGroup],
        mode: str,
        round_no: int,
        previous: dict[str, str],
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """One round: every agent answers once. Returns the answers (in request order)
        and the order the groups ran in."""
        light = [g for g in groups if g.tier not in HEAVY_TIERS]
        # The heavy model already in the slot goes first: one load fewer per round.
        slot = self.manager.heavy_slot
        heavy = sorted((g for g in groups if g.tier in HEAVY_TIERS), key=lambda g: g.tier != slot)
        out: list[dict[str, Any]] = []

        async def run_groups(gs: list[AgentGroup]) -> None:
            for g in gs:
                out.extend(await self._run_group(s, g, round_no, previous))

        if mode == NORMAL:
            # Light groups beside the heavy ones; heavy tiers still take turns in the slot.
            await asyncio.gather(*(run_groups([g]) for g in light), run_groups(heavy))
        else:
            await run_groups(light + heavy)
        position = {a.name: i for i, a in enumerate(s.run.agents)}
        out.sort(key=lambda r: position[r["agent"]])
        return out, [g.tier for g in light + heavy]

    async def _run_group(
        self, s: _Swarm, g: AgentGroup, round_no: int, previous: dict[str, str]
    ) -> list[dict[str, Any]]:
        """Hold the group's tier (or the tier its chain fell back to) for the whole group."""

        def item(a: Agent, tier: str | None, content: str | None, why: str | None) -> dict:
            r: dict[str, Any] = {"agent": a.name, "model": s.asked[a.name], "tier": tier}
            r |= {"round": round_no, "content": content}
            if reasons := [w for w in (s.notes.get(a.name), why) if w]:
                r["fallback_reason"] = "; ".join(reasons)
            return r

        try:
            async with self.manager.use(g.tier) as res:

                async def one(a: Agent) -> dict[str, Any]:
                    peers = [(n, c) for n, c in previous.items() if n != a.name]
                    system = f"You are {a.name}" + (f", {a.role}" if a.role else "") + "."
                    try:
                        content, meta, shown = await self._complete(res, s.run, system, peers)
                    except EdisonError as exc:  # this agent fails, the others go on
                        s.errors.append(exc)
                        err = {"code": exc.code, "message": exc.message}
                        return item(a, res.tier, None, res.fallback_reason) | {"error": err}
                    r = item(a, meta["tier"], content, res.fallback_reason)
                    return r | {"peers_shown": shown}

                return list(await asyncio.gather(*(one(a) for a in g.agents)))
        except EdisonError as exc:  # no tier of the chain could load
            s.errors.append(exc)
            err = {"code": exc.code, "message": exc.message}
            return [item(a, None, None, None) | {"error": err} for a in g.agents]

    async def _complete(
        self,
        res: Resolution,
        run: SwarmRun,
        system: str,
        peers: list[tuple[str, str]],
        *,
        heading: str = "Other agents answered:",
    ) -> tuple[str, dict[str, Any], int]:
        """One completion on the held tier: (content, chat metadata, peer answers shown).
        Peer answers are cut to fit the model's context; when the worker still says the
        context is exceeded, they are cut further, then left out."""
        room = res.model.n_ctx - run.max_tokens - len(system) - len(run.prompt) - 32
        budget = max(0, room - 16 * len(peers)) // max(1, len(peers))  # >= 1 char per token
        for cut in (budget, budget // 2, budget // 8, 0):
            text = run.prompt
            if peers and cut > 0:
                text += f"\n\n{heading}\n" + "\n".join(f"[{n}] {c[:cut]}" for n, c in peers)
            content: Any = text
            if res.tier == "vision" and run.images:
                content = [{"type": "text", "text": text}] + [
                    {"type": "image_url", "image_url": {"url": u}} for u in run.images
                ]
            body = {
                "model": res.tier,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": content},
                ],
                "max_tokens": run.max_tokens,
            }
            try:
                data, meta = await self.chat.complete(body)
            except ContextLengthExceeded:
                if cut == 0 or not peers:
                    raise
                continue
            shown = len(peers) if cut > 0 else 0
            return data["choices"][0]["message"].get("content") or "", meta, shown
        raise AssertionError("unreachable")  # the last cut is 0, which returns or raises

    async def _synthesize(
        self, tier: str, run: SwarmRun, answers: dict[str, str]
    ) -> dict[str, Any] | None:
        if not answers:
            return None
        system = "Combine the agents' answers into one final answer to the prompt."
        try:
            async with self.manager.use(tier) as res:
                content, meta, _ = await self._complete(
                    res, run, system, list(answers.items()), heading="The agents answered:"
                )
        except EdisonError as exc:  # the agents' answers still stand
            err = {"code": exc.code, "message": exc.message}
            return {"model": tier, "tier": None, "content": None, "error": err}
        out: dict[str, Any] = {"model": tier, "tier": meta["tier"], "content": content}
        if res.fallback_reason:
            out["fallback_reason"] = res.fallback_reason
        return out
