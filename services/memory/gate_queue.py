"""One device's line for the memory gate: a bounded FIFO and the heavy slot it guards.

Each device Edison places heavy tasks on has one lane, so a task on cuda:1 never waits
behind one on cuda:0. The gate (``gate.py``) decides which lane a task joins and what
room it makes; a lane only hands out turns in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.errors import QueueFull, QueueTimeout
from services.memory.gate_records import HeavyTask, LaneState, QueueEntry
from services.memory.snapshot import MemorySnapshot


@dataclass(frozen=True)
class _Waiting:
    reason: str
    kind: str | None
    ticket: str | None
    queued_at: float


class Lane:
    """The FIFO of one device. Event-loop only: no thread touches it."""

    def __init__(
        self,
        device: str,
        *,
        max_waiting: Callable[[], int],
        max_wait_s: Callable[[], float],
        retry_after_s: Callable[[], float],
        count: Callable[[str], None],
    ) -> None:
        self.device = device
        self._max_waiting = max_waiting
        self._max_wait_s = max_wait_s
        self._retry_after_s = retry_after_s
        self._count = count
        # Why a hand-made FIFO and not asyncio.Lock: the queue must be bounded
        # (queue.max_waiting -> 503), observable (/system/memory shows its length) and
        # hand the slot over in arrival order even when a waiter times out or is cancelled.
        self.busy = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._entries: dict[asyncio.Future[None], _Waiting] = {}
        self.current: HeavyTask | None = None

    @property
    def queue_length(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    @property
    def load(self) -> int:
        """Tasks running or waiting here: what task placement weighs."""
        return self.queue_length + (1 if self.busy else 0)

    def queue(self) -> list[QueueEntry]:
        """Who waits here, in the order they will run (position 1 is next)."""
        waiting = [self._entries[f] for f in self._waiters if not f.done() and f in self._entries]
        return [
            QueueEntry(i, w.reason, w.kind, w.ticket, w.queued_at, self.device)
            for i, w in enumerate(waiting, start=1)
        ]

    def join(
        self, reason: str = "", kind: str | None = None, ticket: str | None = None
    ) -> asyncio.Future[None] | None:
        """Take the lane when it is free (None), else a place at the end of its line (a
        future that :meth:`wait` awaits). Synchronous, so joins keep the callers' order."""
        if not self.busy and not self.queue_length:
            self.busy = True
            return None
        if self.queue_length >= self._max_waiting():
            self._count("queue_full")
            raise QueueFull(
                f"The heavy-task queue of {self.device} is full ({self.queue_length} waiting)",
                retry_after_s=self._retry_after_s(),
                queue_length=self.queue_length,
                max_waiting=self._max_waiting(),
                device=self.device,
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._entries[fut] = _Waiting(reason, kind, ticket, time.time())
        return fut

    async def wait(self, fut: asyncio.Future[None]) -> float:
        """Wait for the turn :meth:`join` gave; return the ms waited."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self._max_wait_s()):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us as we gave up: pass it on
            else:
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            self._entries.pop(fut, None)
            if isinstance(exc, TimeoutError):
                self._count("queue_timeout")
                raise QueueTimeout(
                    f"Waited {self._max_wait_s():g} s for {self.device} without a turn",
                    retry_after_s=self._retry_after_s(),
                    queue_length=self.queue_length,
                    device=self.device,
                ) from None
            raise
        self._entries.pop(fut, None)
        return (time.perf_counter() - t0) * 1000

    def leave(self, fut: asyncio.Future[None] | None) -> None:
        """Give up what :meth:`join` gave without waiting for it: the lane itself (None)
        or a place in line (a turn handed over meanwhile is passed on)."""
        if fut is None or (fut.done() and not fut.cancelled()):
            self.release()
        else:
            fut.cancel()
        if fut is not None:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            self._entries.pop(fut, None)

    def release(self) -> None:
        """Hand the lane to the next waiter, or mark it free."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand over: busy stays True
                return
        self.busy = False


@dataclass(eq=False)
class Place:
    """A task's place in one device's line, taken when the task is submitted, so that a
    full line refuses it before anyone was told it was queued (``MemoryGate.take_place``).

    ``turn`` is None when the lane was free and is now the task's. The task's
    ``heavy_task`` takes the place over; one that never runs must :meth:`abandon` it."""

    device: str
    because: str  # why placement chose this device
    snapshot: MemorySnapshot  # the snapshot placement decided on
    lane: Lane
    turn: asyncio.Future[None] | None
    taken: bool = False  # heavy_task took it over (and will hand the lane on)

    def take(self) -> None:
        if self.taken:
            raise RuntimeError(f"the place on {self.device} was already taken over")
        self.taken = True

    def abandon(self) -> None:
        """Leave the line (or hand the lane on) unless heavy_task took the place; safe twice."""
        if not self.taken:
            self.taken = True
            self.lane.leave(self.turn)


class Lanes:
    """Every device's line, made on first use; what the gate and its readers ask of them."""

    def __init__(
        self,
        *,
        max_waiting: Callable[[], int],
        max_wait_s: Callable[[], float],
        retry_after_s: Callable[[str], float],
        count: Callable[[str], None],
    ) -> None:
        self._max_waiting, self._max_wait_s = max_waiting, max_wait_s
        self._retry_after_s, self._count = retry_after_s, count
        self._lanes: dict[str, Lane] = {}

    def __len__(self) -> int:
        return len(self._lanes)

    def devices(self) -> list[str]:
        return sorted(self._lanes)

    def get(self, device: str) -> Lane:
        lane = self._lanes.get(device)
        if lane is None:
            lane = self._lanes[device] = Lane(
                device,
                max_waiting=self._max_waiting,
                max_wait_s=self._max_wait_s,
                retry_after_s=lambda: self._retry_after_s(device),
                count=self._count,
            )
        return lane

    def tasks_on(self, device: str) -> int:
        """Heavy tasks running or waiting on ``device``."""
        lane = self._lanes.get(device)
        return lane.load if lane is not None else 0

    @property
    def busy(self) -> bool:
        return any(lane.busy for lane in self._lanes.values())

    def running(self) -> list[HeavyTask]:
        """Every running task, one per busy device."""
        return [ln.current for ln in self._lanes.values() if ln.current is not None]

    @property
    def queue_length(self) -> int:
        return sum(lane.queue_length for lane in self._lanes.values())

    def queue(self) -> list[QueueEntry]:
        """Who waits, device by device, each in the order they will run there."""
        return [e for lane in self._lanes.values() for e in lane.queue()]

    def state(self, device: str, heavy_slot: str | None) -> LaneState:
        """The line of ``device`` (idle and empty before its first task)."""
        lane = self._lanes.get(device)
        if lane is None:
            return LaneState(device, "idle", None, 0, heavy_slot)
        busy = "busy" if lane.busy else "idle"
        return LaneState(device, busy, lane.current, lane.queue_length, heavy_slot)
