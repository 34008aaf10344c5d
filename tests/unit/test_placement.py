"""Placement decisions from numbers: where a load starts, what a task needs, and waiting
for a dead worker's memory. The GPU figures are given (a GPU cannot exist here); the
functions under test are the ones production calls."""

from __future__ import annotations

import os

import pytest

from services.errors import InsufficientMemory
from services.memory.gguf_estimate import estimate
from services.memory.placement import (
    WORKER_RAM_MB,
    load_need_mb,
    load_rungs,
    start_rung,
    task_need,
    wait_gpu_memory_released,
)
from services.memory.probe import MemoryProbe
from services.settings import LadderSettings
from tests.unit.test_gguf_estimate import BIG, BIG_RUNGS

# BIG's VRAM estimates per rung (test_gguf_estimate.test_estimates_of_the_round_model):
# 34864, 34088, 17481, 16945, 0, 0 MB; a GPU rung with layers adds the worker's overhead.
CTX = 400.0


@pytest.mark.parametrize(
    ("usable_mb", "index", "fits"),
    [
        (80_000, 0, True),
        (34_864.01 + CTX, 0, True),
        (34_864 + CTX - 1, 1, True),  # the CUDA context counts: one MB short of rung 0
        (34_500 + CTX, 1, True),  # shorter context first
        (20_000 + CTX, 2, True),  # then fewer layers, at the full context again
        (17_000 + CTX, 3, True),
        (16_000 + CTX, 4, True),  # the CPU rung needs no VRAM, not even a context
        (-5, 4, False),  # nothing fits, not even the CPU rung: it is still where to start
    ],
)
def test_start_rung_on_a_gpu(usable_mb: float, index: int, fits: bool) -> None:
    got = start_rung(BIG, BIG_RUNGS, usable_mb, "cuda:0", overhead_mb=CTX)
    assert (got.index, got.fits) == (index, fits)
    est = estimate(BIG, *BIG_RUNGS[index])
    assert got.need_mb == pytest.approx(load_need_mb(est, "cuda:0", CTX))


def test_start_rung_without_a_cpu_rung_answers_the_last() -> None:
    rungs = [(33, 8192), (16, 4096)]
    assert start_rung(BIG, rungs, 100, "cuda:0", overhead_mb=CTX).index == 1
    assert start_rung(BIG, rungs, 40_000, "cuda:0", overhead_mb=CTX).index == 0


def test_start_rung_passes_the_estimate_options_on() -> None:
    # A 1-byte KV cache halves the KV: (33, 8192) drops by 32 x 16 MiB = 512 MiB.
    assert start_rung(BIG, BIG_RUNGS, 34_400 + CTX, "cuda:0", overhead_mb=CTX).index == 1
    one_byte = start_rung(
        BIG, BIG_RUNGS, 34_400 + CTX, "cuda:0", overhead_mb=CTX, kv_bytes_per_elem=1
    )
    assert one_byte.index == 0


def test_start_rung_on_the_cpu_counts_ram_and_refuses_what_cannot_fit() -> None:
    rungs = load_rungs(-1, 8192, LadderSettings(gpu_layers=[16], context=[4096]), BIG, "cpu")
    assert rungs == [(0, 8192), (0, 4096)]
    needs = [load_need_mb(estimate(BIG, *r), "cpu", WORKER_RAM_MB) for r in rungs]
    assert needs[0] > needs[1] > WORKER_RAM_MB
    assert start_rung(BIG, rungs, needs[0], "cpu", overhead_mb=WORKER_RAM_MB).index == 0
    assert start_rung(BIG, rungs, needs[0] - 1, "cpu", overhead_mb=WORKER_RAM_MB).index == 1
    with pytest.raises(InsufficientMemory) as err:
        start_rung(BIG, rungs, needs[1] - 1, "cpu", overhead_mb=WORKER_RAM_MB, what="deep")
    assert err.value.code == "insufficient_ram"
    assert err.value.details["required_mb"] == round(needs[1])


def test_load_need_counts_the_overhead_only_with_layers_on_the_gpu() -> None:
    gpu = estimate(BIG, 16, 4096)
    cpu_rung = estimate(BIG, 0, 4096)
    assert load_need_mb(gpu, "cuda:0", 512) == pytest.approx(gpu.vram_mb + 512)
    assert load_need_mb(cpu_rung, "cuda:0", 512) == 0
    assert load_need_mb(cpu_rung, "cpu", 80) == pytest.approx(cpu_rung.ram_mb + 80)


@pytest.mark.parametrize(
    ("device", "vram", "ram", "need"),
    [
        ("cuda:0", 4000, 2000, 4000),
        ("cuda:1", 4000, None, 4000),
        ("cpu", 4000, 2000, 2000),
        ("cpu", 4000, None, 4000),  # no RAM figure: the VRAM one stands in
        ("cpu", 4000, 0, 0),
    ],
)
def test_task_need(device: str, vram: float, ram: float | None, need: float) -> None:
    got = task_need(device, vram, ram)
    assert (got.device, got.mb) == (device, need)
    assert got.memory == ("RAM" if device == "cpu" else "VRAM")


class FakeProbe:
    def __init__(self, answers: list[dict[int, float] | None]) -> None:
        self.answers = answers
        self.calls = 0

    def process_vram_mb(self, pids: list[int]) -> dict[int, float] | None:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answers", "released", "calls"),
    [
        ([None], None, 1),  # no NVML: nothing to wait on, nothing confirmed
        ([{7: 0.0}], True, 1),
        ([{}], True, 1),  # the pid is absent from the figures
        ([{7: 900.0}, {7: 300.0}, {7: 0.0}], True, 3),
        ([{7: 900.0}], False, None),  # never released within the timeout
    ],
)
async def test_wait_gpu_memory_released(answers, released: bool, calls: int | None) -> None:
    probe = FakeProbe(answers)
    assert await wait_gpu_memory_released(probe, 7, timeout_s=0.3, poll_s=0.01) is released
    if calls is not None:
        assert probe.calls == calls
    else:
        assert probe.calls >= 2


@pytest.mark.anyio
async def test_wait_gpu_memory_released_with_the_real_probe() -> None:
    probe = MemoryProbe(timeout_s=2)
    if probe.process_vram_mb([os.getpid()]) is not None:
        pytest.skip("NVML is available here: covered by the GPU validation")
    assert await wait_gpu_memory_released(probe, os.getpid(), timeout_s=1, poll_s=0.1) is None
