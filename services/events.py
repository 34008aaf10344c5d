"""The event bus: what happens in Edison, as it happens, for `GET /events` and the page.

Services publish typed payloads (a tier's view, a gate decision, a job); each subscriber
gets them in order through its own bounded queue. A payload is what was true when it was
published (a frozen copy such as ``JobState``, never a live object that keeps changing),
since a subscriber that is behind reads it later. A subscriber that does not keep up
loses events, counted, rather than slowing anyone: publishing never waits. Events are
published from the event loop; a worker thread hands them over with
:meth:`EventBus.from_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

QUEUE_SIZE = 256  # events kept for a subscriber that is behind; more are dropped


@dataclass(frozen=True)
class Event:
    seq: int
    type: str  # model.loading | model.loaded | model.failed | model.unloaded | gate.decision
    # | job.queued | job.started | job.progress | job.finished | memory.snapshot
    at: float
    payload: Any  # a service dataclass as it was then: TierView, GateDecision, JobState,
    # MemoryReport (app/report.py)


@dataclass(eq=False)  # hashed by identity: kept in a set
class Subscriber:
    # None in the queue: the bus closed (the server is shutting down); the stream ends.
    queue: asyncio.Queue[Event | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0


class EventBus:
    """One per app."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._subscribers: set[Subscriber] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.changed = asyncio.Event()  # set by every event; the snapshot task clears it
        self.published = 0
        self.closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, type_: str, payload: Any) -> None:
        """Hand an event to every subscriber; never waits (a full queue drops it)."""
        event = Event(next(self._seq), type_, time.time(), payload)
        self.published += 1
        if type_ != "memory.snapshot":
            self.changed.set()
        for sub in self._subscribers:
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.dropped += 1

    def close(self) -> None:
        """End every subscription: each event stream finishes, so a shutdown does not
        wait for clients that would otherwise stay connected."""
        self.closed = True
        for sub in self._subscribers:
            if sub.queue.full():
                sub.queue.get_nowait()
                sub.dropped += 1
            sub.queue.put_nowait(None)

    def from_thread(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` (which publishes) on the event loop, from a worker thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    @contextlib.contextmanager
    def subscription(self) -> Iterator[Subscriber]:
        """A subscriber for the block: events from now on, in order, in its queue."""
        sub = Subscriber()
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
