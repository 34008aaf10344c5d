"""MemoryGate decisions and queue.

The decision table runs on a GPU that reports given numbers (FakeGpuProbe) and a model
manager double that frees given amounts: both stand for a card that cannot exist on
this machine. The queue tests run the real gate on this machine's real probe.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from services.errors import InsufficientMemory, QueueFull, QueueTimeout
from services.llm.manager import ModelManager
from services.llm.records import UnloadResult
from services.memory.devices import UnloadCost
from services.memory.gate import MemoryGate
from services.memory.learning import LearnedMemory
from services.memory.placement import TaskNeed
from services.memory.probe import MemoryProbe
from tests.helpers import FakeGpuProbe, placement_for, until

pytestmark = pytest.mark.anyio


class ScriptedModels:
    """Loaded models that free given MB of the fake card when unloaded.

    Like the real ModelManager they hold ledger entries while loaded. ``lag``: polls
    before the fake driver shows the memory back; such an unload reports ``settling``
    (its release was not confirmed), as one without NVML does.
    """

    def __init__(self, probe: FakeGpuProbe, heavy_mb: float, fast_mb: float, lag: int = 0):
        self.probe, self.heavy_mb, self.fast_mb, self.lag = probe, heavy_mb, fast_mb, lag
        self.heavy_slot = "medium" if heavy_mb else None
        self.fast = bool(fast_mb)
        self.calls: list[str] = []
        self.reloads: list[str] = []
        self.target = probe.used_mb  # what the card will show once the driver catches up
        self.held: dict[str, Any] = {}
        self.ledger: Any = None

    def attach(self, ledger: Any) -> None:
        self.ledger = ledger
        for name, mb in (("medium", self.heavy_mb), ("fast", self.fast_mb)):
            if mb:
                self.held[name] = ledger.reserve("cuda:0", mb, f"model:{name}", "model")

    def _drop(self, name: str) -> None:
        self.ledger.release(self.held.pop(name, None))

    def loaded_models(self) -> list[str]:
        return (["medium"] if self.heavy_slot else []) + (["fast"] if self.fast else [])

    def heavy_slots(self) -> dict[str, str]:
        return {"cuda:0": self.heavy_slot} if self.heavy_slot else {}

    def unload_cost(self, device: str) -> UnloadCost:
        if device != "cuda:0":
            return UnloadCost()
        held = {name: res.mb for name, res in self.held.items()}
        return UnloadCost("fast" in held, len(held), sum(held.values()))

    async def unload_heavy_slot(self, reason: str, device: str | None = None) -> UnloadResult:
        self.calls.append("heavy")
        self.target -= self.heavy_mb
        self.probe.set_used(self.target, self.lag)
        self.heavy_slot = None
        self._drop("medium")
        return UnloadResult(["medium"], 0, self.heavy_mb, settling=bool(self.lag))

    async def unload_all(self, reason: str, device: str | None = None) -> UnloadResult:
        self.calls.append("all")
        gone = self.loaded_models()
        freed = (self.heavy_mb if self.heavy_slot else 0) + (self.fast_mb if self.fast else 0)
        self.target -= freed
        self.probe.set_used(self.target, self.lag)
        self.heavy_slot, self.fast = None, False
        for name in gone:
            self._drop(name)
        return UnloadResult(gone, 0, freed, settling=bool(self.lag))

    def restore_soon(self, tiers: list[str]) -> None:
        self.reloads.extend(tiers)


def gate_for(make_settings, probe, models, **memory) -> MemoryGate:
    settings = make_settings(
        memory={"reserve_vram_mb": 1024, "recovery_wait_s": 2, "recovery_poll_s": 0.01, **memory}
    )
    placement = placement_for(settings, probe)
    if isinstance(models, ScriptedModels):
        models.attach(placement.ledger)
    return MemoryGate(settings, placement, models)


# (used by others, heavy MB, fast MB, lag polls, required) -> (ok, unload calls, freed)
CASES = [
    pytest.param(2000, 0, 0, 0, 4000, True, [], 0, id="enough-memory"),
    pytest.param(8000, 6000, 0, 0, 4000, True, ["heavy"], 6000, id="heavy-slot-is-enough"),
    pytest.param(10500, 2000, 2000, 0, 4000, True, ["heavy", "all"], 4000, id="needs-unload-all"),
    pytest.param(10500, 2000, 2000, 3, 4000, True, ["heavy", "all"], 4000, id="driver-lags"),
    pytest.param(11500, 0, 0, 0, 4000, False, [], 0, id="nothing-to-unload"),
    # 11800 used, 5000 of it Edison's models: at most 12288 - 6800 - 1024 = 4464 MB could
    # ever be usable, so 9000 MB is refused at once and nothing is unloaded for it.
    pytest.param(11800, 3000, 2000, 0, 9000, False, [], 0, id="beyond-what-unloading-frees"),
    pytest.param(11800, 3000, 2000, 0, 4464, True, ["heavy", "all"], 5000, id="just-fits-all-out"),
    pytest.param(7264, 0, 0, 0, 4000, True, [], 0, id="exactly-enough"),
    pytest.param(7265, 0, 0, 0, 4000, False, [], 0, id="one-mb-short"),
]


@pytest.mark.parametrize("used, heavy, fast, lag, required, ok, calls, freed", CASES)
async def test_pre_heavy_task_decisions(
    make_settings, caplog, used, heavy, fast, lag, required, ok, calls, freed
) -> None:
    probe = FakeGpuProbe(total_mb=12288, used_mb=used)
    models = ScriptedModels(probe, heavy, fast, lag)
    gate = gate_for(make_settings, probe, models)
    with caplog.at_level(logging.INFO, logger="edison.gate"):
        result = await gate.pre_heavy_task(required, "test")
    assert result.ok is ok
    assert models.calls == calls
    assert result.freed_mb == freed
    assert result.device == "cuda:0"
    held_after = heavy + fast - freed  # the models still loaded stay in the ledger
    assert result.usable_mb == max(0, min(12288 - (used - freed), 12288 - held_after) - 1024)
    assert f"Memory gate: ok={ok}, freed={freed}MB" in caplog.text
    assert result.required_mb == required and result.reason == "test"
    # The figures of the last check are the decision's own.
    assert result.budget.usable_mb == result.usable_mb
    assert result.budget.reserve_mb == 1024 and result.budget.capacity_mb == 12288
    assert gate.describe().last_decisions == [result]
    assert gate.outcomes == {"ok" if ok else "refused": 1}


async def test_other_reservations_count_against_the_task(make_settings) -> None:
    """A model load under way holds memory the driver does not show yet."""
    probe = FakeGpuProbe(total_mb=12288, used_mb=1000)
    gate = gate_for(make_settings, probe, ScriptedModels(probe, 0, 0))
    gate.ledger.reserve("cuda:0", 7500, "model:deep", "model")
    result = await gate.pre_heavy_task(4000, "image")
    assert not result.ok
    assert result.usable_mb == 12288 - 7500 - 1024


async def test_budget_caps_the_card(make_settings) -> None:
    probe = FakeGpuProbe(total_mb=143771, used_mb=1000, budget_mb=12288)
    gate = gate_for(make_settings, probe, ScriptedModels(probe, 0, 0))
    result = await gate.pre_heavy_task(12000, "video")
    assert not result.ok and result.usable_mb == 12288 - 1000 - 1024


async def test_heavy_task_refusal_is_insufficient_memory_and_releases(make_settings) -> None:
    probe = FakeGpuProbe(total_mb=12288, used_mb=11000)
    gate = gate_for(make_settings, probe, ScriptedModels(probe, 0, 0))
    with pytest.raises(InsufficientMemory) as err:
        async with gate.heavy_task(4000, "image: x"):
            pytest.fail("must not run")
    assert err.value.code == "insufficient_vram"
    assert err.value.details["required_vram_mb"] == 4000
    assert err.value.retry_after_s >= 1
    assert gate.ledger.entries() == [] and gate.describe().state == "idle"


async def test_heavy_task_takes_one_snapshot_when_memory_suffices(make_settings) -> None:
    """The task's need is computed once per decision: one probe, one reservation."""
    probe = FakeGpuProbe(total_mb=12288, used_mb=1000)
    gate = gate_for(make_settings, probe, ScriptedModels(probe, 0, 0))
    async with gate.heavy_task(4000, "image: x", required_ram_mb=64, kind="image") as task:
        assert probe.calls == 1
        assert task.decision.actions == ["enough memory"] and task.kind == "image"
        assert [(r.device, r.mb, r.kind) for r in gate.ledger.entries()] == [
            ("cuda:0", 4000, "task")
        ]
    assert gate.ledger.entries() == []


async def test_fast_model_comes_back_after_the_gate_unloaded_it(make_settings) -> None:
    probe = FakeGpuProbe(total_mb=12288, used_mb=10000)
    models = ScriptedModels(probe, 0, 4000)
    gate = gate_for(make_settings, probe, models)
    async with gate.heavy_task(4000, "image: x") as task:
        assert task.decision.ok and models.calls == ["all"]
        assert models.reloads == []  # not while the task runs
    await until(lambda: models.reloads == ["fast"], timeout=10)


# ---- the queue, on the real probe of this machine ------------------------------------


def real_gate(make_settings, **queue) -> MemoryGate:
    settings = make_settings(queue=queue, memory={"reserve_ram_mb": 0})
    placement = placement_for(settings, MemoryProbe(timeout_s=5))
    return MemoryGate(settings, placement, ModelManager(settings, placement))


async def test_real_probe_gate_checks_ram_without_a_gpu(make_settings) -> None:
    gate = real_gate(make_settings)
    snap = gate.placement.probe.snapshot()
    if snap.gpus:
        pytest.skip("this machine has a GPU")
    ok = await gate.pre_heavy_task(4000, "music", required_ram_mb=64)
    assert ok.ok and ok.device == "cpu"
    too_much = await gate.pre_heavy_task(4000, "music", required_ram_mb=snap.ram_total_mb * 4)
    assert not too_much.ok and too_much.device == "cpu"
    assert too_much.required_mb == snap.ram_total_mb * 4
    assert too_much.actions[0].startswith("unloaded nothing: ")


async def test_tasks_run_one_at_a_time_in_fifo_order(make_settings) -> None:
    gate = real_gate(make_settings, max_waiting=10)
    order: list[int] = []
    running = {"now": 0, "most": 0}

    async def task(i: int) -> None:
        async with gate.heavy_task(0, f"t{i}", required_ram_mb=1) as held:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            order.append(i)
            assert gate.describe().current is held and gate.describe().state == "busy"
            await anyio.sleep(0.01)
            running["now"] -= 1

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(task, i)
            await anyio.lowlevel.checkpoint()  # arrive in order
    assert order == list(range(6))
    assert running["most"] == 1
    assert gate.ledger.entries() == [] and gate.describe().state == "idle"


async def test_queue_full_and_queue_timeout(make_settings) -> None:
    gate = real_gate(make_settings, max_waiting=1, max_wait_s=0.3)
    hold = anyio.Event()
    errors: list[Exception] = []

    async def holder() -> None:
        async with gate.heavy_task(0, "holder", required_ram_mb=1):
            await hold.wait()

    async def waiter() -> None:
        try:
            async with gate.heavy_task(0, "waiter", required_ram_mb=1):
                pass
        except QueueTimeout as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await until(lambda: gate.describe().state == "busy", what="the holder runs")
        tg.start_soon(waiter)
        await until(lambda: gate.queue_length == 1, what="the waiter joined the line")
        with pytest.raises(QueueFull) as full:
            async with gate.heavy_task(0, "third", required_ram_mb=1):
                pass
        assert full.value.retry_after_s >= 1
        await until(lambda: errors, timeout=10)
        hold.set()
    assert isinstance(errors[0], QueueTimeout)
    assert gate.queue_length == 0 and gate.describe().state == "idle"
    assert gate.outcomes["queue_full"] == 1 and gate.outcomes["queue_timeout"] == 1


async def test_cancelled_waiter_and_cancelled_holder_release(make_settings) -> None:
    gate = real_gate(make_settings, max_waiting=5)
    ran: list[str] = []

    async def run(name: str, forever: bool = False) -> None:
        async with gate.heavy_task(0, name, required_ram_mb=1):
            ran.append(name)
            if forever:
                await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "holder", True)
        await until(lambda: ran == ["holder"], what="the holder runs")
        async with anyio.create_task_group() as inner:
            inner.start_soon(run, "cancelled-waiter")
            await until(lambda: gate.queue_length == 1, what="the waiter joined the line")
            inner.cancel_scope.cancel()
        assert gate.queue_length == 0  # the cancelled waiter left the line
        tg.start_soon(run, "last")
        await until(lambda: gate.queue_length == 1, what="the last task joined the line")
        assert ran == ["holder"]
        tg.cancel_scope.cancel()  # cancels the holder mid-task and "last" gets nothing
    assert gate.ledger.entries() == []
    assert gate.describe().state == "idle" and gate.queue_length == 0


# ---- request-sized needs (learned from numbers) -------------------------------------


def linear_memory() -> LearnedMemory:
    """A pipeline whose measured working memory is exactly 1 MB per unit of size."""
    mem = LearnedMemory(None, learn_after=3, margin_factor=1.0)
    for size in (1000, 5000, 12000):  # the requests below stay inside the measured range
        mem.record_run("p", "latent elements", size, size, predicted_mb=None, resident_mb=0)
    return mem


@pytest.mark.parametrize(
    ("size", "calls", "ok"),
    [
        (4000, [], True),  # 4400 MB fits the 5264 MB usable beside the loaded models
        (6000, ["heavy"], True),  # 6600 MB: the heavy slot (3000 MB) is enough
        (8500, ["heavy", "all"], True),  # 9350 MB: everything must go
        (10000, [], False),  # 11000 MB > 10264 MB, the most unloading could give: at once
    ],
    ids=["small-unloads-nothing", "large-heavy-only", "larger-everything", "beyond-the-card"],
)
async def test_a_learned_need_unloads_exactly_what_it_needs(
    make_settings, size: float, calls: list[str], ok: bool
) -> None:
    # 12288 MB card: 1000 MB other programs, medium 3000 + fast 2000 loaded, 1024 reserve.
    probe = FakeGpuProbe(total_mb=12288, used_mb=6000)
    models = ScriptedModels(probe, 3000, 2000)
    gate = gate_for(make_settings, probe, models)
    mem = linear_memory()

    def need_on(device: str) -> TaskNeed:
        p = mem.predict("p", "latent elements", size, prior_mb=4000, resident_mb=0)
        return TaskNeed(device, p.need_mb, p.source, f"size {size}")

    if ok:
        async with gate.heavy_task(4000, "image", need_on=need_on) as task:
            decision = task.decision
            assert [(r.owner, r.mb) for r in gate.ledger.entries() if r.kind == "task"] == [
                ("task:image", pytest.approx(size * 1.1))
            ]
    else:
        with pytest.raises(InsufficientMemory) as err:
            async with gate.heavy_task(4000, "image", need_on=need_on):
                pytest.fail("must not run")
        assert "learned" in err.value.message and err.value.details["need_source"] == "learned"
        decision = gate.describe().last_decisions[-1]
        assert decision.ceiling_mb == 10264
    assert models.calls == calls
    assert decision.ok is ok and decision.need_source == "learned"
    assert decision.required_mb == pytest.approx(size * 1.1)


@pytest.mark.parametrize(("lag", "polled"), [(0, False), (3, True)], ids=["confirmed", "lagging"])
async def test_the_gate_waits_only_for_unloads_still_settling(
    make_settings, lag: int, polled: bool
) -> None:
    """Every unload confirmed and still short: refused at once, no polling for recovery.
    An unconfirmed unload (no NVML) is waited for, as the driver may lag."""
    probe = FakeGpuProbe(total_mb=12288, used_mb=11000)
    models = ScriptedModels(probe, 0, 2000, lag=lag)
    gate = gate_for(make_settings, probe, models, recovery_wait_s=0.5)
    # A load under way elsewhere holds 3000 MB in the ledger that no unload frees.
    gate.ledger.reserve("cuda:0", 3000, "model:other", "model")
    result = await gate.pre_heavy_task(4000, "image")
    assert not result.ok and models.calls == ["all"]
    if polled:
        assert probe.calls > 10  # polled every recovery_poll_s until recovery_wait_s
    else:
        assert probe.calls == 2  # the first view and the check after the unload
