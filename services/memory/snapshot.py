"""What a memory probe gives: snapshots of RAM and VRAM, and its report on each step of
the ladder (see ``probe.py``, which takes them). Also the helpers the steps share: a
time limit around a call, the nvidia-smi parser, the VRAM budget, a process's RSS."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psutil

MB = 1024 * 1024
T = TypeVar("T")


class ProbeStepFailed(Exception):
    """One rung of the probe ladder could not answer; the message says why."""


class ProbeStepUnavailable(ProbeStepFailed):
    """A failure remembered for good (no library, no CUDA device): not backed off, not retried."""


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    total_mb: float
    used_mb: float
    free_mb: float
    budget_mb: float | None = None


@dataclass(frozen=True)
class MemorySnapshot:
    ram_total_mb: float
    ram_available_mb: float
    ram_used_mb: float
    gpus: tuple[GpuMemory, ...]
    vram_source: str
    timestamp: float
    probe_ms: float = 0.0

    def gpu(self, index: int) -> GpuMemory | None:
        """The GPU with this index, or None when it is absent."""
        return next((g for g in self.gpus if g.index == index), None)


@dataclass
class StepReport:
    """What one step of the ladder did the last time it ran, and whether it is backed off."""

    ok: bool | None = None  # None: not tried
    reason: str = ""
    ms: float = 0.0
    permanent: bool = False  # the failure is remembered for good: never retried
    backed_off: bool = False  # snapshots skip it until a background retry succeeds
    backed_off_until: float | None = None  # unix time of the next background retry
    backoff_s: float = 0.0  # the current back-off period
    failures: int = 0  # transient failures in a row
    last_reason: str = ""  # why it failed the last time (while backed off or permanent)


@dataclass
class _StepState:
    """One step's back-off; read and written under MemoryProbe._state_lock only."""

    failures: int = 0  # > 0: backed off
    backoff_s: float = 0.0
    due: float = 0.0  # time.monotonic() of the next retry
    until: float | None = None  # the same as unix time, for the report
    last_reason: str = ""
    permanent: bool = False
    retrier: bool = False  # a background thread owns this step's retries

    def clear(self) -> None:
        self.failures, self.backoff_s, self.until = 0, 0.0, None


@dataclass
class ProbeReport:
    answered: str
    steps: dict[str, StepReport] = field(default_factory=dict)


def _bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run fn in a daemon thread and give up after timeout_s (the thread is left behind)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            box["error"] = exc

    t = threading.Thread(target=target, name=f"probe-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ProbeStepFailed(f"{what} did not answer within {timeout_s:g} s")
    if "error" in box:
        err = box["error"]
        if isinstance(err, ProbeStepFailed):
            raise err
        raise ProbeStepFailed(f"{type(err).__name__}: {err}") from err
    return box["value"]


def _apply_budget(gpus: Iterable[GpuMemory], budget_mb: float | None) -> tuple[GpuMemory, ...]:
    """Treat each card as if it had budget_mb: total capped, free never above budget - used."""
    if budget_mb is None:
        return tuple(gpus)
    out = []
    for g in gpus:
        total = min(g.total_mb, budget_mb)
        free = max(0.0, min(g.free_mb, total - g.used_mb))
        out.append(GpuMemory(g.index, g.name, total, g.used_mb, free, budget_mb))
    return tuple(out)


def parse_nvidia_smi(text: str) -> list[GpuMemory]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,memory.used,memory.free` CSV."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            raise ProbeStepFailed(f"nvidia-smi printed an unexpected line: {line[:80]!r}")
        try:
            index, total, used, free = int(parts[0]), *(float(p) for p in parts[2:])
        except ValueError as exc:
            raise ProbeStepFailed(f"nvidia-smi printed an unexpected line: {line[:80]!r}") from exc
        if min(total, used, free) < 0 or total <= 0:
            raise ProbeStepFailed(f"nvidia-smi printed impossible figures: {line[:80]!r}")
        gpus.append(GpuMemory(index, parts[1], total, used, free))
    if not gpus:
        raise ProbeStepFailed("nvidia-smi printed no GPU")
    return gpus


def rss_mb(pid: int | None = None) -> float | None:
    """Resident memory of a process and its children, in MB; None if it is gone."""
    try:
        p = psutil.Process(pid or os.getpid())
        procs = [p, *p.children(recursive=True)]
        return sum(q.memory_info().rss for q in procs) / MB
    except psutil.Error:
        return None
