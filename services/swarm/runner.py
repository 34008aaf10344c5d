"""The swarm runner: several agents answer one prompt, as the memory policy allows.

Each agent asks for a tier. The policy (``policy.py``) decides from measured memory
whether agents run side by side, in groups one tier after another, or all on the
fallback tier; the runner routes the agents, groups them, holds each group's tier once
for the whole group (so a model is loaded at most once per round) and gathers the
answers. Every load goes through the ModelManager, which checks the ledger: a swarm
never loads a model into memory that a running generation holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from services.errors import ContextLengthExceeded, EdisonError, InvalidRequest
from services.llm.chat import ChatProxy
from services.llm.manager import ModelManager
from services.llm.records import FALLBACKS, Resolution
from services.memory.placement import Placement
from services.settings import HEAVY_TIERS, Settings
from services.swarm.policy import (
    DEGRADED,
    NORMAL,
    SYNTHESIS_TIER,
    Agent,
    AgentGroup,
    PolicyDecision,
    SwarmMemoryPolicy,
    group_agents_by_model,
    should_load_vision,
)


@dataclass
class SwarmRun:
    """One swarm request, as the router hands it over."""

    prompt: str
    agents: list[Agent]
    rounds: int = 1
    synthesize: bool = False
    images: list[str] = field(default_factory=list)
    max_tokens: int = 64


@dataclass(frozen=True)
class AgentError:
    code: str
    message: str


@dataclass
class AgentAnswer:
    """One agent's answer in one round (``content`` None: see ``error``)."""

    agent: str
    model: str  # the tier the agent asked for
    tier: str | None  # the tier that answered; None: none could
    round: int
    content: str | None
    fallback_reason: str | None = None
    error: AgentError | None = None
    peers_shown: int = 0  # other agents' previous answers it saw (cut to fit its context)


@dataclass(frozen=True)
class Synthesis:
    model: str
    tier: str | None
    content: str | None
    fallback_reason: str | None = None
    error: AgentError | None = None


@dataclass(frozen=True)
class SwarmGroup:
    model: str  # the tier the group runs on
    agents: list[str]


@dataclass(frozen=True)
class RoundSchedule:
    round: int
    order: list[str]  # tiers in the order their groups ran
    concurrent: bool  # whether groups overlapped (normal mode)
    loads: int  # model loads the manager recorded during the round


@dataclass(frozen=True)
class SwarmTimings:
    policy: float
    rounds: list[float]
    synthesis: float | None
    total: float


@dataclass(frozen=True)
class SwarmResult:
    policy: PolicyDecision
    groups: list[SwarmGroup]
    responses: list[AgentAnswer]
    synthesis: Synthesis | None
    schedule: list[RoundSchedule]
    timings_ms: SwarmTimings


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
        self, settings: Settings, placement: Placement, manager: ModelManager, chat: ChatProxy
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.chat = chat
        self.policy = SwarmMemoryPolicy(settings, placement, manager)

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

    async def run(self, run: SwarmRun) -> SwarmResult:
        t_start = time.perf_counter()
        self.validate(run)
        if run.images:  # checked once (remote ones fetched once), not by every agent
            run = dataclasses.replace(
                run, images=await self.chat.check_image_urls(run.images, "images")
            )
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
        responses: list[AgentAnswer] = []
        schedule: list[RoundSchedule] = []
        round_ms: list[float] = []
        previous: dict[str, str] = {}
        for round_no in range(1, run.rounds + 1):
            t0, loads0 = time.perf_counter(), self.manager.loads_total()
            out, order = await self._run_round(s, groups, policy.mode, round_no, previous)
            responses += out
            previous = {r.agent: r.content for r in out if r.content is not None}
            round_ms.append(round((time.perf_counter() - t0) * 1000, 1))
            loads = self.manager.loads_total() - loads0
            schedule.append(RoundSchedule(round_no, order, policy.mode == NORMAL, loads))
        if s.errors and all(r.content is None for r in responses):
            raise s.errors[0]  # no agent answered at all: report why

        synthesis, synthesis_ms = None, None
        if run.synthesize:
            t0 = time.perf_counter()
            tier = self.settings.swarm.fallback_tier if policy.mode == DEGRADED else SYNTHESIS_TIER
            synthesis = await self._synthesize(tier, run, previous)
            synthesis_ms = round((time.perf_counter() - t0) * 1000, 1)
        return SwarmResult(
            policy=policy,
            groups=[SwarmGroup(g.tier, [a.name for a in g.agents]) for g in groups],
            responses=responses,
            synthesis=synthesis,
            schedule=schedule,
            timings_ms=SwarmTimings(
                policy=round((t_policy - t_start) * 1000, 1),
                rounds=round_ms,
                synthesis=synthesis_ms,
                total=round((time.perf_counter() - t_start) * 1000, 1),
            ),
        )

    async def _run_round(
        self,
        s: _Swarm,
        groups: list[AgentGroup],
        mode: str,
        round_no: int,
        previous: dict[str, str],
    ) -> tuple[list[AgentAnswer], list[str]]:
        """One round: every agent answers once. Returns the answers (in request order)
        and the order the groups ran in."""
        light = [g for g in groups if g.tier not in HEAVY_TIERS]
        # The heavy model already in the slot goes first: one load fewer per round.
        slot = self.manager.heavy_slot
        heavy = sorted((g for g in groups if g.tier in HEAVY_TIERS), key=lambda g: g.tier != slot)
        out: list[AgentAnswer] = []

        async def run_groups(gs: list[AgentGroup]) -> None:
            for g in gs:
                out.extend(await self._run_group(s, g, round_no, previous))

        if mode == NORMAL:
            # Light groups beside the heavy ones; heavy tiers still take turns in the slot.
            await asyncio.gather(*(run_groups([g]) for g in light), run_groups(heavy))
        else:
            await run_groups(light + heavy)
        position = {a.name: i for i, a in enumerate(s.run.agents)}
        out.sort(key=lambda r: position[r.agent])
        return out, [g.tier for g in light + heavy]

    async def _run_group(
        self, s: _Swarm, g: AgentGroup, round_no: int, previous: dict[str, str]
    ) -> list[AgentAnswer]:
        """Resolve the group's tier once (or the tier its chain falls back to) and hold it
        for the whole group: every agent's completion goes to that held worker."""

        def answer(a: Agent, tier: str | None, why: str | None = None) -> AgentAnswer:
            reasons = "; ".join(w for w in (s.notes.get(a.name), why) if w) or None
            return AgentAnswer(a.name, s.asked[a.name], tier, round_no, None, reasons)

        try:
            async with self.manager.use(g.tier) as res:

                async def one(a: Agent) -> AgentAnswer:
                    peers = [(n, c) for n, c in previous.items() if n != a.name]
                    system = f"You are {a.name}" + (f", {a.role}" if a.role else "") + "."
                    r = answer(a, res.tier, res.fallback_reason)
                    try:
                        r.content, r.peers_shown = await self._complete(res, s.run, system, peers)
                    except EdisonError as exc:  # this agent fails, the others go on
                        s.errors.append(exc)
                        r.error = AgentError(exc.code, exc.message)
                    return r

                return list(await asyncio.gather(*(one(a) for a in g.agents)))
        except EdisonError as exc:  # no tier of the chain could load
            s.errors.append(exc)
            failed = []
            for a in g.agents:
                r = answer(a, None)
                r.error = AgentError(exc.code, exc.message)
                failed.append(r)
            return failed

    async def _complete(
        self,
        res: Resolution,
        run: SwarmRun,
        system: str,
        peers: list[tuple[str, str]],
        *,
        heading: str = "Other agents answered:",
    ) -> tuple[str, int]:
        """One completion on the held tier: (content, peer answers shown).
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
                done = await self.chat.complete_on(res, body)
            except ContextLengthExceeded:
                if cut == 0 or not peers:
                    raise
                continue
            shown = len(peers) if cut > 0 else 0
            return _first_content(done.body), shown
        raise AssertionError("unreachable")  # the last cut is 0, which returns or raises

    async def _synthesize(
        self, tier: str, run: SwarmRun, answers: dict[str, str]
    ) -> Synthesis | None:
        if not answers:
            return None
        system = "Combine the agents' answers into one final answer to the prompt."
        try:
            async with self.manager.use(tier) as res:
                content, _ = await self._complete(
                    res, run, system, list(answers.items()), heading="The agents answered:"
                )
        except EdisonError as exc:  # the agents' answers still stand
            return Synthesis(tier, None, None, error=AgentError(exc.code, exc.message))
        return Synthesis(tier, res.tier, content, res.fallback_reason)


def _first_content(body: dict[str, Any]) -> str:
    """The text of an OpenAI chat answer's first choice ("" when it has none)."""
    choices = body.get("choices") or [{}]
    return (choices[0].get("message") or {}).get("content") or ""
