"""The memory probe on this machine as it is, with fake nvidia-smi programs, and with an
NVML double (a GPU reporting given numbers: the one thing that cannot exist here)."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from services.memory.probe import (
    MemoryProbe,
    parse_nvidia_smi,
)
from tests.helpers import NO_GPU_HERE, fake_smi, without_nvml


@pytest.mark.skipif(not NO_GPU_HERE, reason="this machine has a GPU")
def test_no_gpu_is_a_normal_state_with_reasons(new_probe: Callable[..., MemoryProbe]) -> None:
    probe = new_probe(timeout_s=30)
    snap = probe.snapshot()
    assert snap.vram_source == "none"
    assert snap.gpus == ()
    vm = psutil.virtual_memory()
    assert abs(snap.ram_total_mb - vm.total / 2**20) < 1
    assert 0 < snap.ram_available_mb <= snap.ram_total_mb
    steps = probe.report.steps
    assert probe.report.answered == "none"
    assert all(s.ok is False for s in steps.values())
    assert "NVML" in steps["nvml"].reason or "nvml" in steps["nvml"].reason.lower()
    assert "no CUDA" in steps["torch"].reason
    assert "not found on PATH" in steps["nvidia-smi"].reason


def test_nvidia_smi_two_gpus(smi_path: Path, new_probe: Callable[..., MemoryProbe]) -> None:
    fake_smi(
        smi_path,
        'echo "0, NVIDIA H200, 143771, 615, 143156"\n'
        'echo "1, NVIDIA RTX 4090, 24564, 4000, 20564"\n',
    )
    probe = new_probe(timeout_s=30)
    snap = probe.snapshot()
    if probe.report.steps["nvml"].ok:
        pytest.skip("a real NVML answered first")
    assert snap.vram_source == "nvidia-smi"
    assert [g.index for g in snap.gpus] == [0, 1]
    assert snap.gpus[0].name == "NVIDIA H200"
    assert (snap.gpus[0].total_mb, snap.gpus[0].used_mb, snap.gpus[0].free_mb) == (
        143771,
        615,
        143156,
    )
    assert snap.gpu(1).free_mb == 20564
    # The step that answered is tried first next time.
    probe.snapshot()
    assert probe.report.steps["nvml"].ok is None
    assert probe.report.steps["nvidia-smi"].ok is True


def test_budget_caps_what_is_usable(smi_path: Path, new_probe: Callable[..., MemoryProbe]) -> None:
    fake_smi(smi_path, 'echo "0, NVIDIA H200, 143771, 1000, 142771"\n')
    snap = new_probe(timeout_s=30, vram_budget_mb=12288).snapshot()
    if snap.vram_source != "nvidia-smi":
        pytest.skip("a real GPU answered first")
    g = snap.gpus[0]
    assert (g.total_mb, g.used_mb, g.free_mb, g.budget_mb) == (12288, 1000, 11288, 12288)


def test_hanging_nvidia_smi_is_given_up_and_killed(
    smi_path: Path, tmp_path: Path, new_probe: Callable[..., MemoryProbe]
) -> None:
    pidfile = tmp_path / "pid"
    fake_smi(smi_path, f'echo $$ > "{pidfile}"\nexec sleep 60\n')
    probe = new_probe(timeout_s=0.5)
    snap = probe.snapshot()
    if snap.vram_source != "none":
        pytest.skip("a real GPU answered first")
    assert snap.gpus == ()
    assert "did not answer within 0.5 s" in probe.report.steps["nvidia-smi"].reason
    pid = int(pidfile.read_text())
    # Given up means the hung program was killed, not left running.
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize(
    "output, reason",
    [
        ('echo "this is not csv"', "unexpected line"),
        ('echo "0, GPU, lots, 1, 2"', "unexpected line"),
        ('echo "0, GPU, -5, 1, 2"', "impossible"),
        ("true", "no GPU"),
        ('echo "NVIDIA-SMI has failed" >&2; exit 9', "status 9"),
    ],
)
def test_garbage_from_nvidia_smi_degrades_to_none(
    smi_path: Path, output: str, reason: str, new_probe: Callable[..., MemoryProbe]
) -> None:
    fake_smi(smi_path, output + "\n")
    probe = new_probe(timeout_s=30)
    snap = probe.snapshot()
    if probe.report.steps["nvml"].ok:
        pytest.skip("a real NVML answered first")
    assert snap.vram_source == "none"
    assert reason in probe.report.steps["nvidia-smi"].reason


def test_parse_nvidia_smi_handles_spaces_in_names() -> None:
    gpus = parse_nvidia_smi("0, NVIDIA GeForce RTX 3090, 24576, 1, 24575\n")
    assert gpus[0].name == "NVIDIA GeForce RTX 3090"


class FakeNvml(types.ModuleType):
    """A GPU that reports given numbers (NVML cannot run on this machine)."""

    MiB = 2**20

    def __init__(self, processes: list[tuple[int, int]]) -> None:
        super().__init__("pynvml")
        self.init_calls = 0
        self.processes = processes

    def nvmlInit(self) -> None:
        self.init_calls += 1

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"Fake 24GB"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            total=24576 * self.MiB, used=4096 * self.MiB, free=20480 * self.MiB
        )

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[types.SimpleNamespace]:
        return [
            types.SimpleNamespace(pid=p, usedGpuMemory=mb * self.MiB) for p, mb in self.processes
        ]


def test_nvml_initialised_once_and_per_process_memory(
    monkeypatch: pytest.MonkeyPatch, new_probe: Callable[..., MemoryProbe]
) -> None:
    me = os.getpid()
    fake = FakeNvml([(me, 1500), (999999, 700)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = new_probe(timeout_s=5)
    for _ in range(3):
        snap = probe.snapshot()
    assert fake.init_calls == 1
    assert snap.vram_source == "nvml"
    assert snap.gpus[0].free_mb == 20480
    assert probe.process_vram_mb([me]) == {me: 1500}


def test_per_process_memory_is_none_without_nvml(
    monkeypatch: pytest.MonkeyPatch, new_probe: Callable[..., MemoryProbe]
) -> None:
    without_nvml(monkeypatch)
    probe = new_probe(timeout_s=5)
    assert probe.process_vram_mb([os.getpid()]) is None
    probe.snapshot()
    assert "Not Found" in probe.report.steps["nvml"].reason
