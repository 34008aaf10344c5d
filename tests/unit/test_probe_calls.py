"""Probe calls into a hung driver: one bounded executor (at most MAX_PROBE_THREADS threads
left behind, however many calls hang), and a back-off for NVML's per-process query.

NVML is a test double here (a module object in place of pynvml whose calls block on an
event): a hung driver cannot be produced on this machine."""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Callable, Iterator

import pytest

from services.memory.probe import MemoryProbe, ProbeCalls, ProbeStepFailed


def probe_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("probe-") and t.is_alive()]


@pytest.fixture
def hang() -> Iterator[threading.Event]:
    """Set at the end of the test: every hung call returns then."""
    release = threading.Event()
    yield release
    release.set()


def test_hung_calls_leave_at_most_the_bound_behind(hang: threading.Event) -> None:
    calls = ProbeCalls(max_threads=2)
    started = []

    def stuck() -> None:
        started.append(1)
        hang.wait(30)

    for _ in range(6):
        with pytest.raises(ProbeStepFailed):
            calls.call(stuck, 0.05, "stuck")
    assert len(started) == 2  # the other four found no free thread and never ran
    # Counted by this test's own call name: other tests' probe threads may still be ending.
    assert len([t for t in probe_threads() if t.name == "probe-stuck"]) == 2
    assert calls.running == 2
    hang.set()
    deadline = time.monotonic() + 5
    while calls.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls.running == 0
    assert calls.call(lambda: 7, 1, "works again") == 7


class HungNvml(types.SimpleNamespace):
    """pynvml whose per-process query hangs until ``release`` is set."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release
        self.process_queries = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list:
        self.process_queries += 1
        self.release.wait(30)
        return []


def test_process_query_is_backed_off_after_a_hang(
    monkeypatch: pytest.MonkeyPatch,
    hang: threading.Event,
    new_probe: Callable[..., MemoryProbe],
) -> None:
    fake = HungNvml(hang)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = new_probe(timeout_s=0.2, backoff_s=60)
    before = len(probe_threads())
    t0 = time.monotonic()
    for _ in range(5):
        assert probe.process_vram_mb([1234]) is None
    # One query hung and timed out; the next four returned at once, backed off.
    assert fake.process_queries == 1
    assert time.monotonic() - t0 < 0.2 * 3
    assert len(probe_threads()) - before <= 1
    report = probe.process_report
    assert report.ok is False and report.backed_off and report.failures == 1
    assert "did not answer" in report.last_reason


def test_an_absent_pid_is_not_reported_as_zero(
    monkeypatch: pytest.MonkeyPatch, new_probe: Callable[..., MemoryProbe]
) -> None:
    """In a container NVML lists other pids, never ours: ours is absent, not 0 MB."""
    fake = HungNvml(threading.Event())
    fake.release.set()
    fake.nvmlDeviceGetComputeRunningProcesses = lambda h: [  # type: ignore[method-assign]
        types.SimpleNamespace(pid=999999, usedGpuMemory=700 * 2**20)
    ]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = new_probe(timeout_s=5)
    assert probe.process_vram_mb([1234]) == {}
    assert probe.process_vram_mb([999999]) == {999999: 700}
