"""Fixtures for tests that run real workers, pipelines and servers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.families_fixture import tiny_family_dir  # noqa: F401 - one session fixture
from tests.helpers import wait_until


class StepGate:
    """Holds every real pipeline run at the end of its step ``at`` until released.

    Tests that need a run in flight (cancel, disconnect, queueing) use this instead of a
    long run and a sleep: the tiny pipeline really runs, and waits at that step for the
    test. ``max_in_flight`` counts runs that overlapped, measured around each run.
    A run that is cancelled while held stops waiting and cancels at that step.
    """

    def __init__(self, at: int = 1) -> None:
        self.at = at
        self._open = threading.Event()
        self._permits = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.held = 0  # runs waiting at the gate now
        self.in_flight = 0
        self.max_in_flight = 0
        self.runs = 0

    def release(self) -> None:
        """Let every held run (and every later one) go on."""
        self._open.set()

    def release_one(self) -> None:
        """Let one held run (the next to arrive, if none is held) go on."""
        self._permits.release()

    def wait_held(self, n: int = 1, timeout: float = 60) -> None:
        wait_until(lambda: self.held >= n, timeout=timeout, what=f"{n} run(s) held at a step")

    def _hold(self, should_cancel: Any) -> None:
        with self._lock:
            self.held += 1
        try:
            while not self._open.wait(0.01):
                if self._permits.acquire(blocking=False):
                    return
                if should_cancel is not None and should_cancel():
                    return
        finally:
            with self._lock:
                self.held -= 1

    def wrap(self, run: Any) -> Any:
        gate = self

        def held_run(host: Any, params: Any, *, on_step=None, should_cancel=None, **kw: Any):  # noqa: ANN001, ANN202
            def step(done: int, total: int) -> None:
                if on_step is not None:
                    on_step(done, total)
                if done == gate.at:
                    gate._hold(should_cancel)

            with gate._lock:
                gate.in_flight += 1
                gate.runs += 1
                gate.max_in_flight = max(gate.max_in_flight, gate.in_flight)
            try:
                return run(host, params, on_step=step, should_cancel=should_cancel, **kw)
            finally:
                with gate._lock:
                    gate.in_flight -= 1

        return held_run


@pytest.fixture
def step_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[StepGate]:
    """Every PipelineHost.run in this test holds at its first step until released."""
    from services.generation.pipelines import PipelineHost

    gate = StepGate(at=1)
    monkeypatch.setattr(PipelineHost, "run", gate.wrap(PipelineHost.run))
    yield gate
    gate.release()
