"""Many GPUs, decided from numbers: which device a load or a heavy task goes to, how a
model too big for one card is split, and when a young heavy model may be evicted.

The devices here are figures (a GPU reporting given numbers cannot exist on this
machine); the rules under test are the pure functions of services/memory/devices.py and
the Placement that feeds them.
"""

from __future__ import annotations

import pytest

from services.memory.devices import (
    LoadOption,
    Occupant,
    TaskOption,
    UnloadCost,
    choose_load_device,
    choose_task_device,
    residency_hold,
    split_plan,
)
from services.memory.ledger import DeviceLimit, MemoryLedger
from services.memory.placement import configured_gpus
from services.settings import Settings
from tests.helpers import FakeGpuProbe, placement_for

# ---- loads: best rung, then fewest heavy tasks, then most usable ---------------------

LOADS = [
    pytest.param(
        [LoadOption("cuda:0", 2, True, 3000), LoadOption("cuda:1", 0, True, 9000)],
        "cuda:1",
        "best rung",
        id="the-device-with-the-better-rung",
    ),
    pytest.param(
        [LoadOption("cuda:0", 0, True, 9000), LoadOption("cuda:1", 0, True, 9000, heavy_tasks=0)],
        "cuda:0",
        "most usable",
        id="full-tie-keeps-the-first",
    ),
    pytest.param(
        [
            LoadOption("cuda:0", 0, True, 20000, heavy_tasks=2),
            LoadOption("cuda:1", 0, True, 8000, heavy_tasks=0),
        ],
        "cuda:1",
        "fewest heavy tasks",
        id="same-rung-fewest-heavy-tasks-beats-more-memory",
    ),
    pytest.param(
        [LoadOption("cuda:0", 1, True, 7000), LoadOption("cuda:1", 1, True, 7500)],
        "cuda:1",
        "most usable memory (7500 MB)",
        id="same-rung-same-tasks-most-usable",
    ),
    pytest.param(
        [
            LoadOption("cuda:0", 0, True, 9000, evicts="deep"),
            LoadOption("cuda:1", 0, True, 6000),
        ],
        "cuda:1",
        "nothing to evict here",
        id="an-empty-slot-beats-evicting-for-the-same-rung",
    ),
    pytest.param(
        [
            LoadOption("cuda:0", 0, True, 9000, evicts="deep"),
            LoadOption("cuda:1", 3, True, 3000),
        ],
        "cuda:0",
        "evicts deep",
        id="a-better-rung-is-worth-an-eviction",
    ),
    pytest.param(
        [LoadOption("cuda:0", 4, False, 100), LoadOption("cuda:1", 4, False, 300)],
        "cuda:1",
        "CPU rung",
        id="nothing-fits-a-gpu-rung",
    ),
    pytest.param(
        [LoadOption("cuda:0", 4, False, 9000), LoadOption("cuda:1", 2, True, 300)],
        "cuda:1",
        "best rung",
        id="fitting-beats-not-fitting",
    ),
]


@pytest.mark.parametrize(("options", "device", "why"), LOADS)
def test_load_placement(options: list[LoadOption], device: str, why: str) -> None:
    choice = choose_load_device(options)
    assert choice.option.device == device
    assert why in choice.because


def test_one_device_is_the_only_choice() -> None:
    only = LoadOption("cuda:0", 3, False, 10)
    assert choose_load_device([only]) == choose_load_device([only])
    assert choose_load_device([only]).because == "the only device"
    with pytest.raises(ValueError, match="no device"):
        choose_load_device([])


# ---- split across GPUs -----------------------------------------------------------


def test_a_split_shares_layers_by_room_beyond_each_cards_overhead() -> None:
    plan = split_plan({"cuda:0": 10_500, "cuda:1": 5_500}, model_mb=12_000, overhead_mb=500)
    assert plan is not None
    assert plan.devices == ("cuda:0", "cuda:1")
    assert plan.shares == pytest.approx((10_000 / 15_000, 5_000 / 15_000))
    assert sum(plan.shares) == pytest.approx(1.0)
    # Each card holds its share of the model plus its own worker overhead.
    assert plan.need_mb == pytest.approx((12_000 * 2 / 3 + 500, 12_000 / 3 + 500))
    assert all(n <= u for n, u in zip(plan.need_mb, (10_500, 5_500), strict=True))


def test_a_split_uses_the_fewest_cards_roomiest_first() -> None:
    usable = {"cuda:0": 3_000, "cuda:1": 9_000, "cuda:2": 8_000, "cuda:3": 500}
    plan = split_plan(usable, model_mb=12_000, overhead_mb=500)
    assert plan is not None and plan.devices == ("cuda:1", "cuda:2")


@pytest.mark.parametrize(
    ("usable", "model_mb"),
    [
        ({"cuda:0": 6_000, "cuda:1": 6_000}, 11_500),  # 11,000 of room beyond two overheads
        ({"cuda:0": 400, "cuda:1": 300}, 10),  # no card has room beyond its overhead
        ({"cuda:0": 90_000}, 10),  # one card is not a split
    ],
)
def test_no_split_when_the_cards_cannot_hold_it_together(
    usable: dict[str, float], model_mb: float
) -> None:
    assert split_plan(usable, model_mb, overhead_mb=500) is None


# ---- heavy tasks -----------------------------------------------------------------


def task(device: str, **kw: object) -> TaskOption:
    base: dict[str, object] = {"need_mb": 4000, "usable_mb": 2000, "ceiling_mb": 20000}
    base.update(kw)
    return TaskOption(device, **base)  # type: ignore[arg-type]


TASKS = [
    pytest.param(
        [task("cuda:0", usable_mb=9000), task("cuda:1", usable_mb=9000, pipeline_loaded=True)],
        "cuda:1",
        "pipeline already loaded",
        id="the-device-that-holds-the-pipeline",
    ),
    pytest.param(
        [
            task("cuda:0", pipeline_loaded=True, usable_mb=3000),
            task("cuda:1", usable_mb=5000),
        ],
        "cuda:1",
        "free room",
        id="a-loaded-pipeline-without-room-loses-to-free-room",
    ),
    pytest.param(
        [task("cuda:0", usable_mb=4500), task("cuda:1", usable_mb=12000)],
        "cuda:1",
        "free room (12000 MB usable)",
        id="free-room-on-both-most-usable",
    ),
    pytest.param(
        [
            task("cuda:0", cost=UnloadCost(fast=True, models=1, mb=800)),
            task("cuda:1", cost=UnloadCost(fast=False, models=2, mb=9000)),
        ],
        "cuda:1",
        "least to unload (2 model(s), 9000 MB)",
        id="never-the-fast-tier-if-another-choice",
    ),
    pytest.param(
        [
            task("cuda:0", cost=UnloadCost(models=2, mb=3000)),
            task("cuda:1", cost=UnloadCost(models=1, mb=7000)),
        ],
        "cuda:1",
        "1 model(s)",
        id="fewest-models",
    ),
    pytest.param(
        [
            task("cuda:0", cost=UnloadCost(models=1, mb=7000)),
            task("cuda:1", cost=UnloadCost(models=1, mb=3000)),
        ],
        "cuda:1",
        "3000 MB",
        id="then-fewest-mb",
    ),
    pytest.param(
        [
            task("cuda:0", cost=UnloadCost(fast=True, models=1, mb=800)),
            task("cuda:1", ceiling_mb=3000),
        ],
        "cuda:0",
        "fast tier included",
        id="the-fast-tier-when-the-other-device-can-never-hold-it",
    ),
    pytest.param(
        [task("cuda:0", usable_mb=9000, queued=1), task("cuda:1", usable_mb=2000)],
        "cuda:1",
        "idle gate",
        id="an-idle-device-before-a-busy-one",
    ),
    pytest.param(
        [
            task("cuda:0", usable_mb=9000, queued=2, pipeline_loaded=True),
            task("cuda:1", usable_mb=9000, queued=1),
        ],
        "cuda:1",
        "idle gate (1 ahead",
        id="the-shorter-line-before-the-loaded-pipeline",
    ),
    pytest.param(
        [task("cuda:0", ceiling_mb=100), task("cuda:1", ceiling_mb=200)],
        "cuda:0",
        "no device could hold the need",
        id="nowhere-can-hold-it-refused-on-the-first",
    ),
]


@pytest.mark.parametrize(("options", "device", "why"), TASKS)
def test_task_placement(options: list[TaskOption], device: str, why: str) -> None:
    choice = choose_task_device(options)
    assert choice.option.device == device
    assert why in choice.because


# ---- residency ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ages", "evictable", "held", "wait"),
    [
        ({"cuda:0": 31.0, "cuda:1": 45.0}, ("cuda:0", "cuda:1"), (), 0.0),
        ({"cuda:0": 5.0, "cuda:1": 45.0}, ("cuda:1",), ("cuda:0",), 25.0),
        ({"cuda:0": 5.0, "cuda:1": 12.0}, (), ("cuda:0", "cuda:1"), 18.0),
        ({"cuda:0": 30.0}, ("cuda:0",), (), 0.0),  # exactly the residency: evictable
    ],
)
def test_residency_from_a_clock_we_control(
    ages: dict[str, float], evictable: tuple[str, ...], held: tuple[str, ...], wait: float
) -> None:
    now = 10_000.0
    occupants = [Occupant(d, f"tier-{d}", now - age) for d, age in ages.items()]
    check = residency_hold(occupants, now, min_residency_s=30)
    assert check.evictable == evictable
    assert check.held == held
    assert check.wait_s == pytest.approx(wait)
    # After that wait one more occupant may go; after the longest, every one.
    later = residency_hold(occupants, now + wait, min_residency_s=30)
    assert len(later.evictable) == min(len(ages), len(evictable) + 1)
    oldest_young = max(30 - age for age in ages.values())
    latest = residency_hold(occupants, now + oldest_young, min_residency_s=30)
    assert latest.held == () and set(latest.evictable) == set(ages)


def test_residency_zero_never_holds() -> None:
    check = residency_hold([Occupant("cuda:0", "deep", 99.9)], 100.0, 0)
    assert check.evictable == ("cuda:0",) and check.wait_s == 0


# ---- devices from settings ---------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "gpus", "expected"),
    [
        ({}, 2, [0]),  # the short form's default: GPU 0 only
        ({"device": 1}, 2, [1]),
        ({"devices": "auto"}, 3, [0, 1, 2]),
        ({"devices": [1, 0]}, 2, [1, 0]),  # the order given is the order kept
        ({"devices": [0, 3]}, 2, [0]),  # a GPU the probe does not see is left out
        ({"devices": "auto", "device": 1}, 2, [0, 1]),  # devices wins over device
    ],
)
def test_devices_from_settings(memory: dict, gpus: int, expected: list[int]) -> None:
    settings = Settings(memory=memory)
    snap = FakeGpuProbe(gpus=gpus).snapshot()
    assert configured_gpus(settings, snap) == expected
    placement = placement_for(settings, FakeGpuProbe(gpus=gpus))
    assert placement.devices(snap) == [f"cuda:{i}" for i in expected]


def test_without_a_configured_gpu_work_goes_to_the_cpu() -> None:
    settings = Settings(memory={"devices": [4]})
    probe = FakeGpuProbe(gpus=2)
    placement = placement_for(settings, probe)
    assert placement.devices(probe.snapshot()) == ["cpu"]


def test_a_pin_names_one_gpu_and_falls_back_to_all_when_absent() -> None:
    settings = Settings(memory={"devices": "auto"})
    probe = FakeGpuProbe(gpus=2)
    placement = placement_for(settings, probe)
    snap = probe.snapshot()
    assert placement.allowed(snap, 1) == ["cuda:1"]
    assert placement.allowed(snap, "auto") == ["cuda:0", "cuda:1"]
    assert placement.allowed(snap, 7) == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("devices", [[], [0, 0]])
def test_bad_device_lists_are_refused(devices: list[int]) -> None:
    with pytest.raises(ValueError, match="devices"):
        Settings(memory={"devices": devices})


def test_per_device_reserve_and_budget() -> None:
    ledger = MemoryLedger(
        reserve_vram_mb=1024,
        reserve_ram_mb=0,
        limits={"cuda:1": DeviceLimit(reserve_vram_mb=2048, vram_budget_mb=8000)},
    )
    probe = FakeGpuProbe(total_mb=24_000, gpus=2)
    probe.set_used(1_000, index=1)
    snap = probe.snapshot()
    first, second = ledger.budget(snap, "cuda:0"), ledger.budget(snap, "cuda:1")
    assert (first.capacity_mb, first.reserve_mb, first.usable_mb) == (24_000, 1024, 22_976)
    # cuda:1 is treated as an 8000 MB card with 1000 MB used, and keeps 2048 back.
    assert (second.capacity_mb, second.driver_free_mb, second.reserve_mb) == (8000, 7000, 2048)
    assert second.usable_mb == 7000 - 2048
    ledger.reserve("cuda:1", 3000, "model:deep", "model")
    assert ledger.budget(snap, "cuda:1").usable_mb == 8000 - 3000 - 2048
    assert ledger.budget(snap, "cuda:0").usable_mb == first.usable_mb  # other cards untouched
