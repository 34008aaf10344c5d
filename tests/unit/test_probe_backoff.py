"""The memory probe's back-off: a hung or failing step is skipped by snapshots and
retried in the background (fake nvidia-smi programs, and steps that fail on cue: a GPU
cannot exist on this machine)."""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.doctor import (
    BackendChoice,
    DoctorReport,
    LlamaCppInfo,
    LlamaServerInfo,
    TorchInfo,
    format_report,
)
from services.memory.probe import (
    GpuMemory,
    MemoryProbe,
    ProbeStepFailed,
    ProbeStepUnavailable,
)
from tests.helpers import NO_GPU_HERE, fake_smi, wait_until, without_nvml

# ---- back-off: a hung or failing step is skipped and retried in the background -------


def smi_only(probe: MemoryProbe, smi: Callable[[], list[GpuMemory]] | None = None) -> MemoryProbe:
    """NVML and torch.cuda absent for good (as without a driver), on any machine: the
    nvidia-smi step (the fake on PATH, or ``smi``) answers or not on its own."""

    def absent(what: str) -> Callable[[], list[GpuMemory]]:
        def step() -> list[GpuMemory]:
            raise ProbeStepUnavailable(f"{what} absent in this test")

        return step

    probe._probe_nvml = absent("NVML")  # type: ignore[method-assign]
    probe._probe_torch = absent("torch.cuda")  # type: ignore[method-assign]
    if smi is not None:
        probe._probe_smi = smi  # type: ignore[method-assign]
    return probe


def runs_of(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_hanging_nvidia_smi_is_backed_off_and_not_run_again(
    smi_path: Path, tmp_path: Path, new_probe: Callable[..., MemoryProbe]
) -> None:
    runs = tmp_path / "runs"
    fake_smi(smi_path, f'echo run >> "{runs}"\nexec sleep 30\n')
    probe = smi_only(new_probe(timeout_s=0.5, backoff_s=60, backoff_max_s=600))
    before = time.time()
    assert probe.snapshot().vram_source == "none"
    assert runs_of(runs) == 1
    step = probe.report.steps["nvidia-smi"]
    assert step.ok is False and "did not answer within 0.5 s" in step.reason
    assert step.backed_off and step.failures == 1 and step.backoff_s == 60
    assert "did not answer within 0.5 s" in step.last_reason
    assert step.backed_off_until is not None and step.backed_off_until >= before + 60
    assert not step.permanent
    for _ in range(3):
        snap = probe.snapshot()
        assert snap.vram_source == "none" and snap.gpus == ()
        step = probe.report.steps["nvidia-smi"]
        # Skipped, not run: a run would have appended to the file before hanging.
        assert step.reason == "skipped while backed off: nvidia-smi did not answer within 0.5 s"
        assert step.ms == 0.0 and step.backed_off and step.failures == 1
    assert runs_of(runs) == 1


def test_failing_nvidia_smi_is_retried_in_the_background_until_it_works(
    smi_path: Path, tmp_path: Path, new_probe: Callable[..., MemoryProbe]
) -> None:
    fake_smi(smi_path, 'echo "NVIDIA-SMI has failed" >&2\nexit 9\n')
    probe = smi_only(new_probe(timeout_s=5, backoff_s=0.2, backoff_max_s=0.2))
    assert probe.snapshot().vram_source == "none"
    assert probe.report.steps["nvidia-smi"].backed_off
    assert "status 9" in probe.report.steps["nvidia-smi"].last_reason
    # The repaired program replaces the broken one at once (a retry never reads half a file).
    fixed = fake_smi(tmp_path / "fixed", 'echo "0, NVIDIA L4, 23034, 300, 22734"\n')
    os.replace(fixed, smi_path / "nvidia-smi")
    # No snapshot runs meanwhile: only the background retry can find it working.
    wait_until(
        lambda: not probe.report.steps["nvidia-smi"].backed_off,
        timeout=10,
        what="the background retry found nvidia-smi working",
    )
    step = probe.report.steps["nvidia-smi"]
    assert step.ok is True and step.reason == "background retry: 1 GPU(s)"
    assert (step.failures, step.backoff_s, step.backed_off_until) == (0, 0.0, None)
    snap = probe.snapshot()
    assert snap.vram_source == "nvidia-smi" and snap.gpu(0).free_mb == 22734
    assert probe.report.steps["nvidia-smi"].ok is True


class HeldStep:
    """A nvidia-smi step that waits, in whichever thread runs it, for the test to say
    whether it fails or answers; it records who ran it and how many ran at once."""

    def __init__(self) -> None:
        self.entered: queue.Queue[threading.Thread] = queue.Queue()
        self.verdicts: queue.Queue[bool] = queue.Queue()
        self._lock = threading.Lock()
        self.running = self.most_at_once = 0

    def __call__(self) -> list[GpuMemory]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.entered.put(threading.current_thread())
        try:
            if not self.verdicts.get(timeout=10):
                raise ProbeStepFailed("held step failed")
            return [GpuMemory(0, "Fake", 1000, 100, 900)]
        finally:
            with self._lock:
                self.running -= 1

    def next_run(self) -> threading.Thread:
        """The thread of the next run, once it has started (and waits for a verdict)."""
        return self.entered.get(timeout=5)


def test_backoff_doubles_is_capped_and_reset_by_a_success(
    new_probe: Callable[..., MemoryProbe],
) -> None:
    held = HeldStep()
    probe = smi_only(new_probe(backoff_s=0.05, backoff_max_s=0.2), held)
    report = lambda: probe.report.steps["nvidia-smi"]  # noqa: E731
    held.verdicts.put(False)
    probe.snapshot()
    assert held.next_run() is threading.current_thread()  # the first failure: a caller's
    assert (report().failures, report().backoff_s, report().backed_off) == (1, 0.05, True)
    for failures, backoff_s in [(2, 0.1), (3, 0.2), (4, 0.2), (5, 0.2)]:
        retry = held.next_run()
        assert retry is not threading.current_thread() and retry.daemon
        assert retry.name == "probe-retry-nvidia-smi"
        held.verdicts.put(False)
        wait_until(lambda n=failures: report().failures == n, timeout=5, what=f"failure {failures}")
        assert (report().backoff_s, report().backed_off) == (backoff_s, True)
        assert report().reason == "background retry: held step failed"
    assert held.next_run().name == "probe-retry-nvidia-smi"
    held.verdicts.put(True)
    wait_until(lambda: not report().backed_off, timeout=5, what="the retry succeeded")
    assert (report().failures, report().backoff_s, report().last_reason) == (0, 0.0, "")
    # A success resets the back-off: the next failure starts again from backoff_s.
    held.verdicts.put(False)
    probe.snapshot()
    assert held.next_run() is threading.current_thread()
    assert (report().failures, report().backoff_s) == (1, 0.05)
    assert held.most_at_once == 1
    probe.shutdown()
    held.verdicts.put(False)  # let a retry that had already started finish


def test_snapshots_skip_a_step_being_retried_and_retries_never_overlap(
    new_probe: Callable[..., MemoryProbe],
) -> None:
    held = HeldStep()
    probe = smi_only(new_probe(backoff_s=0.01, backoff_max_s=0.01), held)
    held.verdicts.put(False)
    probe.snapshot()
    held.next_run()
    retry = held.next_run()  # the background retry, held in the middle of the step
    answers: list[str] = []

    def snapshots() -> None:
        answers.extend(probe.snapshot().vram_source for _ in range(20))

    threads = [threading.Thread(target=snapshots) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads), "a snapshot waited on the held step"
    assert answers == ["none"] * 160
    assert held.entered.empty() and held.most_at_once == 1
    step = probe.report.steps["nvidia-smi"]
    assert step.backed_off and step.reason == "skipped while backed off: held step failed"
    held.verdicts.put(True)
    wait_until(lambda: not probe.report.steps["nvidia-smi"].backed_off, timeout=5, what="retry")
    held.verdicts.put(True)
    assert probe.snapshot().vram_source == "nvidia-smi"
    assert held.next_run() is threading.current_thread()
    assert held.most_at_once == 1 and retry.name == "probe-retry-nvidia-smi"


def waiting_on_an_event(thread: threading.Thread) -> bool:
    """The thread sleeps in threading.Event.wait (a retrier waiting for its retry)."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_code.co_filename == threading.__file__:
            return True
        frame = frame.f_back
    return False


def test_callers_failing_together_count_as_one_failure(
    new_probe: Callable[..., MemoryProbe],
) -> None:
    held = HeldStep()
    probe = smi_only(new_probe(backoff_s=60, backoff_max_s=600), held)
    callers = [threading.Thread(target=probe.snapshot) for _ in range(2)]
    for t in callers:
        t.start()
        held.next_run()  # both are inside the step before either fails
    held.verdicts.put(False)
    held.verdicts.put(False)
    for t in callers:
        t.join(5)
    probe.snapshot()  # skips the step; reports its back-off now
    step = probe.report.steps["nvidia-smi"]
    assert (step.failures, step.backoff_s, step.backed_off) == (1, 60, True)
    assert held.entered.empty()


def test_shutdown_stops_the_retries(new_probe: Callable[..., MemoryProbe]) -> None:
    held = HeldStep()
    probe = smi_only(new_probe(backoff_s=60, backoff_max_s=60), held)
    before = set(threading.enumerate())
    held.verdicts.put(False)
    probe.snapshot()
    held.next_run()
    (retrier,) = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert retrier.name == "probe-retry-nvidia-smi" and retrier.daemon
    assert probe.report.steps["nvidia-smi"].backed_off
    wait_until(lambda: waiting_on_an_event(retrier), timeout=5, what="the retrier waits")
    probe.shutdown()
    retrier.join(5)  # it waits 60 s for its retry unless shutdown wakes it
    assert not retrier.is_alive()
    # Nothing retries after shutdown, so nothing is skipped: snapshots run the step.
    held.verdicts.put(True)
    assert probe.snapshot().vram_source == "nvidia-smi"
    assert held.next_run() is threading.current_thread()
    held.verdicts.put(False)
    probe.snapshot()
    assert held.next_run() is threading.current_thread()
    step = probe.report.steps["nvidia-smi"]
    assert step.ok is False and not step.backed_off and step.last_reason == "held step failed"
    assert [t for t in threading.enumerate() if t not in before and t.is_alive()] == []


@pytest.mark.skipif(not NO_GPU_HERE, reason="this machine has a GPU")
def test_no_nvml_and_no_cuda_are_permanent_not_backed_off(
    monkeypatch: pytest.MonkeyPatch, new_probe: Callable[..., MemoryProbe]
) -> None:
    without_nvml(monkeypatch)
    probe = new_probe(timeout_s=30, backoff_s=60)
    before = set(threading.enumerate())
    for _ in range(2):
        probe.snapshot()
        steps = probe.report.steps
        for name, why in [("nvml", "Not Found"), ("torch", "no CUDA")]:
            assert steps[name].permanent and not steps[name].backed_off, name
            assert steps[name].ok is False and why in steps[name].reason
            assert steps[name].failures == 0 and steps[name].backed_off_until is None
        assert steps["nvidia-smi"].backed_off and not steps["nvidia-smi"].permanent
    # One retrier, for nvidia-smi (not found on PATH); none for the permanent failures.
    retriers = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert retriers == ["probe-retry-nvidia-smi"]


def test_doctor_shows_a_backed_off_step_and_why(
    smi_path: Path, new_probe: Callable[..., MemoryProbe]
) -> None:
    fake_smi(smi_path, 'echo "NVIDIA-SMI has failed" >&2\nexit 9\n')
    probe = smi_only(new_probe(timeout_s=5, backoff_s=60, backoff_max_s=600))
    not_here = (
        TorchInfo(False, reason="not here"),
        LlamaCppInfo(False, reason="not here"),
        LlamaServerInfo("/nowhere", False, reason="not here"),
        BackendChoice("llama-cpp-python"),
    )
    for _ in range(2):
        snap = probe.snapshot()
        text = format_report(DoctorReport(snap, probe.report, *not_here))
        step = probe.report.steps["nvidia-smi"]
        assert step.backed_off_until is not None
        at = time.strftime("%H:%M:%S", time.localtime(step.backed_off_until))
        assert (
            "backed off (1 failure in a row, back-off 60 s): skipped by snapshots, retried in "
            f"the background at {at}; last failure: nvidia-smi exited with status 9: "
            "NVIDIA-SMI has failed"
        ) in text
        assert "(permanent: not retried)" in text.splitlines()[4]  # the nvml line
    assert "failed        0.0 ms  skipped while backed off: nvidia-smi exited" in text
