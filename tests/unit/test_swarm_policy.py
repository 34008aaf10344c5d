"""The swarm memory policy from numbers: a GPU that reports given figures stands for a
card that cannot exist on this machine; the decision logic and the placement are real."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest

from services.llm.manager import ModelManager
from services.memory.ledger import MemoryLedger
from services.memory.placement import Placement
from services.memory.probe import GpuMemory, MemorySnapshot
from services.swarm.policy import (
    DEGRADED,
    NORMAL,
    TIME_SLICE,
    Agent,
    SwarmMemoryPolicy,
    decide,
    group_agents_by_model,
    should_load_vision,
)
from tests.helpers import FakeGpuProbe, placement_for

# ---- the policy from numbers --------------------------------------------------------


@pytest.mark.parametrize(
    ("heavy", "free", "threshold", "mode"),
    [
        (2, 10000.1, 5000, NORMAL),  # just above 2 x threshold
        (2, 10000, 5000, TIME_SLICE),  # exactly 2 x threshold
        (2, 9999.9, 5000, TIME_SLICE),
        (2, 5000, 5000, TIME_SLICE),  # exactly the threshold
        (2, 4999.9, 5000, DEGRADED),
        (2, 0, 5000, DEGRADED),
        (4, 50000, 5000, NORMAL),
        (1, 0, 5000, NORMAL),  # one heavy model: normal whatever the memory
        (0, 0, 5000, NORMAL),
        (2, 0, 0, TIME_SLICE),  # threshold 0: 0 MB free is still "at the threshold"
        (2, 0.1, 0, NORMAL),
    ],
)
def test_decide_at_every_boundary(heavy: int, free: float, threshold: float, mode: str) -> None:
    got, reason = decide(heavy, free, threshold)
    assert got == mode
    assert reason


@pytest.mark.parametrize(
    ("heavy", "slots", "mode"),
    [(2, 2, NORMAL), (3, 2, DEGRADED), (2, 1, DEGRADED), (4, 4, NORMAL)],
)
def test_one_heavy_slot_per_device(heavy: int, slots: int, mode: str) -> None:
    """With a heavy slot per device, as many heavy tiers as devices run side by side."""
    got, reason = decide(heavy, 100, 5000, slots)
    assert got == mode
    assert ("heavy slots (one per device)" in reason) is (mode == NORMAL and slots > 1)


@pytest.mark.anyio
async def test_policy_reads_the_roomiest_of_several_devices(make_settings, tiny_dir) -> None:
    settings = make_settings(
        models={n: {"path": str(tiny_dir / f"{n}.gguf")} for n in ("fast", "medium", "deep")},
        memory={"devices": "auto", "reserve_vram_mb": 0},
        swarm={"degraded_threshold_mb": 5000},
    )
    probe = FakeGpuProbe(total_mb=24_000, gpus=3)
    probe.set_used(20_000, index=0)
    probe.set_used(16_000, index=2)
    placement = placement_for(settings, probe, reserve_vram_mb=0)
    policy = SwarmMemoryPolicy(settings, placement, ModelManager(settings, placement))
    agents = [Agent(f"a{i}", "", t) for i, t in enumerate(("medium", "deep", "reasoning"))]
    decision = await policy.assess(agents)
    assert (decision.device, decision.free_vram_mb, decision.heavy_slots) == ("cuda:1", 24_000, 3)
    assert decision.mode == NORMAL and "3 heavy slots" in decision.reason


class StubGpuProbe:
    """A GPU reporting given figures: a GPU cannot exist on this CPU-only machine."""

    def __init__(self, total_mb: float, free_mb: float) -> None:
        self.total_mb, self.free_mb = total_mb, free_mb

    def snapshot(self) -> MemorySnapshot:
        used = self.total_mb - self.free_mb
        gpu = GpuMemory(0, "stub", self.total_mb, used, self.free_mb)
        return MemorySnapshot(32000, 16000, 16000, (gpu,), "stub", time.time())


def resident() -> Any:
    return SimpleNamespace(worker=SimpleNamespace(alive=True))


@pytest.mark.parametrize(
    ("free", "held", "tiers", "loaded", "mode"),
    [
        (10001, 0, ["medium", "deep"], [], NORMAL),
        (10000, 0, ["medium", "deep"], [], TIME_SLICE),
        (5000, 0, ["medium", "deep", "medium"], [], TIME_SLICE),
        (4999, 0, ["medium", "deep"], [], DEGRADED),
        (12000, 2001, ["medium", "deep"], [], TIME_SLICE),  # the ledger's holdings count
        (12000, 7001, ["medium", "deep"], [], DEGRADED),
        (4999, 0, ["fast", "medium", "fast"], [], NORMAL),  # one heavy tier
        (4999, 0, ["medium", "deep"], ["deep"], DEGRADED),  # two heavy tiers, one loaded
        (4999, 0, ["deep", "deep"], ["deep"], NORMAL),  # one heavy tier: no swap
        (4999, 0, ["fast", "medium", "deep"], ["fast"], DEGRADED),  # fast is not heavy
    ],
)
@pytest.mark.anyio
async def test_policy_assess_from_memory_figures(
    make_settings, tiny_dir, caplog, free, held, tiers, loaded, mode
) -> None:
    settings = make_settings(
        models={n: {"path": str(tiny_dir / f"{n}.gguf")} for n in ("fast", "medium", "deep")},
        memory={"reserve_vram_mb": 0},
        swarm={"degraded_threshold_mb": 5000},
    )
    probe = StubGpuProbe(total_mb=free, free_mb=free)
    placement = Placement(settings, probe, MemoryLedger(reserve_vram_mb=0, reserve_ram_mb=0))
    if held:
        placement.ledger.reserve("cuda:0", held, "task:image", "task")
    manager = ModelManager(settings, placement)
    for name in loaded:
        manager.tiers[name].model = resident()
    policy = SwarmMemoryPolicy(settings, placement, manager)
    with caplog.at_level(logging.INFO, logger="edison.swarm"):
        decision = await policy.assess([Agent(f"a{i}", "", t) for i, t in enumerate(tiers)])
    assert decision.mode == mode
    assert decision.device == "cuda:0"
    assert decision.free_vram_mb == free - held
    assert f"Swarm policy: {mode} - " in caplog.text
    assert f"free={free - held:.0f}MB threshold=5000MB" in caplog.text


@pytest.mark.parametrize(
    ("images", "prompt", "expected"),
    [
        (True, "", True),
        (False, "Describe this image", True),
        (False, "LOOK AT the chart", True),
        (False, "What do you see?", True),
        (False, "a photo, please", True),
        (False, "imagine a cat", False),  # word boundary: not "image"
        (False, "who will oversee it", False),
        (False, "seen from above", False),
        (False, "Hello there", False),
    ],
)
def test_should_load_vision(images: bool, prompt: str, expected: bool) -> None:
    assert should_load_vision(images, prompt) is expected


def test_should_load_vision_reads_the_given_keywords() -> None:
    assert should_load_vision(False, "a Chart of sales", ["chart"])
    assert not should_load_vision(False, "Describe this image", ["chart"])


def test_groups_put_fast_first_then_heavy_in_order_of_appearance() -> None:
    agents = [Agent("m1", "", "medium"), Agent("f1", "", "fast"), Agent("d1", "", "deep")]
    agents += [Agent("m2", "", "medium"), Agent("f2", "", "fast")]
    groups = group_agents_by_model(agents)
    assert [(g.tier, [a.name for a in g.agents]) for g in groups] == [
        ("fast", ["f1", "f2"]),
        ("medium", ["m1", "m2"]),
        ("deep", ["d1"]),
    ]
