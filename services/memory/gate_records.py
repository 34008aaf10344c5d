"""What the memory gate decides and holds: its decisions, the task holding it, who waits,
and its state as /system/memory shows it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from services.memory.ledger import DeviceBudget, Reservation


@dataclass
class GateDecision:
    """One decision of the gate: did the task get its memory, what was done, on what figures."""

    ok: bool
    reason: str
    device: str
    required_mb: float
    need_source: str  # given | prior (configured) | learned (predicted from measured runs)
    need_detail: str  # what the need is of: "1 x 512x512 image"
    usable_mb: float
    freed_mb: float  # driver-free memory gained on the device while making room, measured
    waited_ms: float
    actions: list[str]
    budget: DeviceBudget  # the figures of the last check: capacity, driver free, held, reserve
    ceiling_mb: float  # the most that unloading everything Edison holds could make usable
    at: float = field(default_factory=time.time)
    placed_because: str = "the only device"  # why the task went to this device
    rung: str | None = None  # the placement rung chosen (generation requests with a ladder)
    rung_because: str = ""  # why that rung: its need against usable, the faster ones' needs

    def log_line(self) -> str:
        """The decision as the log says it: every figure it was taken on."""
        detail = f": {self.need_detail}" if self.need_detail else ""
        b = self.budget
        return (
            f"Memory gate: ok={self.ok}, freed={self.freed_mb:.0f}MB reason={self.reason!r} "
            f"device={self.device} required={self.required_mb:.0f}MB "
            f"({self.need_source}{detail}) usable={self.usable_mb:.0f}MB "
            f"driver_free={b.driver_free_mb:.0f}MB held={b.held_mb:.0f}MB "
            f"reserve={b.reserve_mb:.0f}MB actions={'; '.join(self.actions)}; "
            f"placed on {self.device} because {self.placed_because}"
            + (f"; rung={self.rung} because {self.rung_because}" if self.rung_because else "")
        )


@dataclass
class HeavyTask:
    """One heavy task holding the gate."""

    reason: str
    kind: str | None
    device: str
    required_mb: float
    queued_ms: float
    decision: GateDecision
    started_at: float = field(default_factory=time.time)
    reservation: Reservation | None = field(default=None, repr=False)
    rung: Any = field(default=None, repr=False)  # the ladder option the gate chose, if any

    @property
    def running_s(self) -> float:
        return time.time() - self.started_at


@dataclass(frozen=True)
class QueueEntry:
    """A heavy task waiting for the gate."""

    position: int  # 1 is next
    reason: str
    kind: str | None
    ticket: str | None  # the job id, when a job waits
    queued_at: float
    device: str = ""  # the device whose line it waits in


@dataclass(frozen=True)
class LaneState:
    """One device's line and heavy slot, as /system/memory shows them."""

    device: str
    state: str  # idle | busy
    current: HeavyTask | None
    queue_length: int
    heavy_slot: str | None  # the heavy LLM tier loaded on this device


@dataclass
class GateState:
    """What the gate is doing now, for /system/memory and the metrics."""

    state: str  # idle | busy
    current: HeavyTask | None
    queue_length: int
    queue: list[QueueEntry]  # in the order they will run
    max_waiting: int
    outcomes: dict[str, int]  # decisions and refusals since start, by outcome
    last_decisions: list[GateDecision]
    devices: list[LaneState] = field(default_factory=list)  # one line per device
