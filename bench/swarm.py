"""A time-sliced swarm against the naive order, same run, same prompts.

4 agents whose tiers alternate medium, deep, medium, deep answer over 2 rounds on tiny
GGUF models (CPU). The time-sliced swarm groups them by tier and holds each group's
model for the whole group; the naive order asks each agent's tier as the agent comes,
so the heavy slot swaps at every agent. Prints model loads and wall time of each and
the ratios (naive / time_slice). Each arm starts from nothing loaded.

    .venv/bin/python bench/swarm.py [--repeat 3] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.demo.assets import DEMO_TIERS  # noqa: E402
from services.demo.tiny_gguf import write_tiny_gguf  # noqa: E402
from services.llm.chat import ChatProxy  # noqa: E402
from services.llm.manager import ModelManager  # noqa: E402
from services.memory.ledger import MemoryLedger  # noqa: E402
from services.memory.placement import Placement  # noqa: E402
from services.memory.probe import MemoryProbe  # noqa: E402
from services.settings import Settings  # noqa: E402
from services.swarm.policy import TIME_SLICE, Agent, AgentGroup  # noqa: E402
from services.swarm.runner import SwarmRun, SwarmService, _Swarm  # noqa: E402

AGENTS = [Agent("m1", "", "medium"), Agent("d1", "", "deep")]
AGENTS += [Agent("m2", "", "medium"), Agent("d2", "", "deep")]


def settings_for(models: Path) -> Settings:
    tiers = {
        n: {"path": str(models / f"{n}.gguf"), "n_ctx": 256, "preload": False}
        for n in ("fast", "medium", "deep")
    }
    return Settings(
        models={**tiers, "n_threads": 1},
        memory={"reserve_ram_mb": 0},
        server={"log_level": "warning"},
    )


def build(settings: Settings) -> tuple[ModelManager, ChatProxy, SwarmService]:
    ledger = MemoryLedger(reserve_vram_mb=0, reserve_ram_mb=0)
    placement = Placement(settings, MemoryProbe(timeout_s=5), ledger)
    manager = ModelManager(settings, placement)
    chat = ChatProxy(manager)
    return manager, chat, SwarmService(settings, placement, manager, chat)


async def time_sliced(settings: Settings, run: SwarmRun) -> tuple[int, float]:
    manager, chat, service = build(settings)
    # Force time_slice from the figure the policy reads: usable in [threshold, 2 x threshold].
    usable = manager.placement.view_of(manager.probe.snapshot()).budget.usable_mb
    settings.swarm.degraded_threshold_mb = int(usable / 1.5)
    try:
        t0 = time.perf_counter()
        out = await service.run(run)
        wall = time.perf_counter() - t0
        assert out.policy.mode == TIME_SLICE, out.policy
        assert all(r.tier == r.model for r in out.responses)
        return manager.loads_total(), wall
    finally:
        await manager.unload_all()
        await chat.aclose()
        manager.probe.shutdown()


async def naive(settings: Settings, run: SwarmRun) -> tuple[int, float]:
    """Same prompts and answers per agent, but each agent's tier is taken as it comes:
    one group per agent, in request order."""
    manager, chat, service = build(settings)
    s = _Swarm(run, {a.name: a.model for a in run.agents}, {})
    try:
        t0 = time.perf_counter()
        previous: dict[str, str] = {}
        for round_no in range(1, run.rounds + 1):
            out = []
            for a in run.agents:
                out += await service._run_group(s, AgentGroup(a.model, [a]), round_no, previous)
            previous = {r.agent: r.content for r in out if r.content is not None}
            assert all(r.tier == r.model for r in out)
        return manager.loads_total(), time.perf_counter() - t0
    finally:
        await manager.unload_all()
        await chat.aclose()
        manager.probe.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of each arm")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        for i, (tier, shape) in enumerate(DEMO_TIERS.items()):
            write_tiny_gguf(models / f"{tier}.gguf", shape, seed=i)
        run = SwarmRun("Name a colour.", list(AGENTS), rounds=2, max_tokens=args.max_tokens)
        results: dict[str, list[tuple[int, float]]] = {"time_slice": [], "naive": []}
        # Alternate the arms so drift on a noisy machine hits both alike.
        for _ in range(args.repeat):
            results["time_slice"].append(
                asyncio.run(time_sliced(settings_for(models), dataclasses.replace(run)))
            )
            results["naive"].append(asyncio.run(naive(settings_for(models), run)))
    summary = {}
    for name, rows in results.items():
        loads = {n for n, _ in rows}
        wall = statistics.median(w for _, w in rows)
        summary[name] = (max(loads), wall)
        print(f"{name:>10}: model loads {sorted(loads)}, wall {wall:.2f} s (median of {len(rows)})")
    (ts_loads, ts_wall), (nv_loads, nv_wall) = summary["time_slice"], summary["naive"]
    print(
        f"naive / time_slice: loads {nv_loads / ts_loads:.2f}x, wall {nv_wall / ts_wall:.2f}x "
        "(4 agents alternating medium/deep, 2 rounds, tiny models on the CPU)"
    )


if __name__ == "__main__":
    main()
