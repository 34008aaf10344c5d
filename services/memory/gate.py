"""MemoryGate: makes room before each heavy task (image, video, music) and runs them one
at a time on each device.

    async with gate.heavy_task(required_vram_mb, reason, kind=...) as task:
        ...run the pipeline...

is placed on a device (``Placement.place_task``), waits its turn in that device's bounded
FIFO line (``gate_queue.py``; a job takes its place there when it is submitted,
``take_place``, so a full line refuses it at once), asks placement for the task's need
once, holds
a reservation in the memory ledger for the task's whole life (so no model load can take
that memory meanwhile), makes room (``pre_heavy_task``: free memory on the task's device
-> unload idle pipelines -> unload the heavy slot -> unload all models -> wait for the
driver -> final check) and on every exit path releases the reservation and, in the
background, runs ``post_heavy_task`` (caches flushed, the light tiers it unloaded back).
Without a GPU the
same rules run on RAM. The figures come from ``placement.py``; this module acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import anyio

from services.errors import InsufficientMemory
from services.events import EventBus
from services.memory.devices import UnloadCost
from services.memory.gate_queue import Lane, Lanes, Place
from services.memory.gate_records import (
    GateDecision,
    GateState,
    HeavyTask,
    LaneState,
    QueueEntry,
)
from services.memory.gate_rungs import Ladder, RungRoom
from services.memory.ledger import Reservation
from services.memory.placement import (
    DeviceView,
    Placement,
    TaskNeed,
    TaskPlacement,
    ceiling_mb,
    flush_gpu_memory,
    task_need,
)
from services.settings import KINDS, Settings

__all__ = [
    "GateDecision",
    "GateState",
    "HeavyTask",
    "LaneState",
    "MemoryGate",
    "Place",
    "QueueEntry",
    "ceiling_mb",
]

if TYPE_CHECKING:
    from services.llm.records import UnloadResult

log = logging.getLogger("edison.gate")


class IdlePipelines(Protocol):
    """What the gate needs of the pipeline registry: unload those not running."""

    async def unload_idle(self, keep: str = "", device: str | None = None) -> list[str]: ...

    def loaded_on(self, kind: str, device: str) -> bool: ...


class GateModels(Protocol):
    """What the gate needs of the model manager: what unloading the LLM workers on a
    device would cost, unloading them (the heavy slot first), and bringing back the
    tiers it unloaded that stay resident (which ones is the manager's call)."""

    def heavy_slots(self) -> dict[str, str]: ...

    def unload_cost(self, device: str) -> UnloadCost: ...

    async def unload_heavy_slot(self, reason: str, device: str | None = None) -> UnloadResult: ...

    async def unload_all(self, reason: str, device: str | None = None) -> UnloadResult: ...

    def restore_soon(self, tiers: Iterable[str]) -> None: ...


class MemoryGate(RungRoom):
    """One per app: the only way a heavy task gets the GPU."""

    def __init__(
        self,
        settings: Settings,
        placement: Placement,
        models: GateModels,
        *,
        pipelines: IdlePipelines | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.settings = settings
        self.events = events
        self.placement = placement
        self.ledger = placement.ledger
        self.models = models
        self.pipelines = pipelines
        # One line (FIFO + heavy slot) per device, made on first use.
        self.lanes = Lanes(
            max_waiting=lambda: self.settings.queue.max_waiting,
            max_wait_s=lambda: self.settings.queue.max_wait_s,
            retry_after_s=self.retry_after_s,
            count=self._count,
        )
        self._placing = asyncio.Lock()
        self.decisions: deque[GateDecision] = deque(maxlen=20)
        self.outcomes: dict[str, int] = {}
        self._mean_task_s = 10.0
        self._unloaded: set[str] = set()  # tiers the gate unloaded, to restore after tasks
        self._collect_next = False
        self._background: set[asyncio.Task[None]] = set()
        # Seconds until the running and waiting tasks are done (set by the job service).
        self.queue_drain_s: Callable[[str | None], float] | None = None
        placement.heavy_tasks = self.tasks_on  # a tie-breaker of where loads go

    # ---- lines and views ---------------------------------------------------------
    def lane(self, device: str) -> Lane:
        """The line of ``device`` (created on first use)."""
        return self.lanes.get(device)

    def tasks_on(self, device: str) -> int:
        """Heavy tasks running or waiting on ``device``."""
        return self.lanes.tasks_on(device)

    @property
    def current(self) -> HeavyTask | None:
        """A running task (the first device's, when several run)."""
        return next(iter(self.lanes.running()), None)

    def running(self) -> list[HeavyTask]:
        """Every running task, one per busy device."""
        return self.lanes.running()

    @property
    def queue_length(self) -> int:
        return self.lanes.queue_length

    def queue(self) -> list[QueueEntry]:
        """Who waits, device by device, each in the order they will run there."""
        return self.lanes.queue()

    def lane_state(self, device: str) -> LaneState:
        """The line and heavy slot of ``device``."""
        return self.lanes.state(device, self.models.heavy_slots().get(device))

    def describe(self) -> GateState:
        return GateState(
            state="busy" if self.lanes.busy else "idle",
            current=self.current,
            queue_length=self.queue_length,
            queue=self.queue(),
            max_waiting=self.settings.queue.max_waiting,
            outcomes=dict(self.outcomes),
            last_decisions=list(self.decisions)[-10:],
            devices=[self.lane_state(d) for d in self.lanes.devices()],
        )

    @property
    def mean_task_s(self) -> float:
        """A running mean of how long heavy tasks held the gate (10 s before the first)."""
        return self._mean_task_s

    def retry_after_s(self, device: str | None = None) -> float:
        """When a place in line (``device``'s; any, when None) is likely to free up: the
        time that line needs to drain, predicted from measured run times when the job
        service gives it (else the running mean task time x tasks ahead)."""
        if self.queue_drain_s is not None:
            return max(1.0, self.queue_drain_s(device))
        ahead = self.queue_length if device is None else self.tasks_on(device)
        return max(1.0, self._mean_task_s * (ahead + 1))

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    # ---- placement -----------------------------------------------------------------
    async def _place(self, kind: str | None, need_of: Callable[[str], TaskNeed]) -> TaskPlacement:
        pinned = getattr(self.settings.generation, kind).device if kind in KINDS else "auto"
        pipes = self.pipelines

        def loaded(device: str) -> bool:
            return pipes is not None and kind is not None and pipes.loaded_on(kind, device)

        return await self.placement.place_task(
            pinned, need_of, queued=self.tasks_on, pipeline_loaded=loaded, cost=self._cost_on
        )

    def _cost_on(self, device: str) -> UnloadCost:
        """What making room on ``device`` could unload: the LLM workers holding memory there."""
        return self.models.unload_cost(device)

    # ---- the gate itself -----------------------------------------------------------
    async def pre_heavy_task(
        self,
        required_vram_mb: float,
        reason: str,
        *,
        required_ram_mb: float | None = None,
        keep_pipeline: str | None = None,
        device: str | None = None,
    ) -> GateDecision:
        """Make room for a task on ``device`` (default: the first; see the module
        docstring for the steps).

        The documented entry point for a caller that runs its own task; ``heavy_task``
        does this and more (queue, reservation, clean-up)."""
        view = await self.placement.view(device=device)
        need = task_need(view.device, required_vram_mb, required_ram_mb)
        return await self._make_room(need, reason, view, keep_pipeline=keep_pipeline)

    async def _make_room(
        self,
        need: TaskNeed,
        reason: str,
        view: DeviceView,
        *,
        own: Reservation | None = None,
        keep_pipeline: str | None = None,
        because: str = "the only device",
    ) -> GateDecision:
        """Unload, in order, what stands between the task and its need; decide.

        Each step unloads only while the need is still short, so a small task next to
        loaded models unloads nothing. A need above what unloading everything Edison holds
        could free is refused at once, unloading nothing."""
        t0 = time.perf_counter()
        before = budget = view.budget
        device = view.device  # every unload below is of what is placed on this device
        ceiling = ceiling_mb(before)
        actions: list[str] = []
        settling = False  # an unload whose memory the driver may not show back yet

        async def enough_after(action: str | None) -> bool:
            """Probe again (after an action, or while waiting) and compare."""
            nonlocal budget
            if action:
                actions.append(action)
            budget = (await self.placement.view(exclude=own, device=device)).budget
            return budget.usable_mb >= need.mb

        ok = budget.usable_mb >= need.mb
        if not ok and need.mb > ceiling:
            actions.append(
                f"unloaded nothing: {need.mb:.0f} MB cannot fit even with everything Edison "
                f"holds unloaded (at most {ceiling:.0f} MB)"
            )
        else:
            if not ok and self.pipelines is not None:
                freed = await self.pipelines.unload_idle(keep_pipeline or "", device=device)
                if freed:
                    ok = await enough_after(f"unloaded idle pipelines: {', '.join(freed)}")
            slot = self.models.heavy_slots().get(device)
            if not ok and slot is not None:
                out = await self.models.unload_heavy_slot(reason=f"gate: {reason}", device=device)
                settling = settling or out.settling
                ok = await enough_after(f"unloaded heavy slot: {', '.join(out.unloaded)}")
            if not ok and self.models.unload_cost(device).models:
                out = await self.models.unload_all(reason=f"gate: {reason}", device=device)
                settling = settling or out.settling
                self._unloaded.update(out.unloaded)
                ok = await enough_after(f"unloaded all models: {', '.join(out.unloaded)}")
        if not ok and settling:
            # The driver's figure lags behind freed memory (Ollama: 0.5-1.5 s) when an
            # unload's release could not be confirmed: poll. Confirmed unloads (a worker
            # NVML shows gone, a CPU worker, a pipeline) leave nothing to wait for.
            deadline = time.monotonic() + self.settings.memory.recovery_wait_s
            while not ok and time.monotonic() < deadline:
                await anyio.sleep(self.settings.memory.recovery_poll_s)
                ok = await enough_after(None)
        decision = GateDecision(
            ok=ok,
            reason=reason,
            device=need.device,
            required_mb=need.mb,
            need_source=need.source,
            need_detail=need.detail,
            usable_mb=round(budget.usable_mb, 1),
            freed_mb=round(max(0.0, budget.driver_free_mb - before.driver_free_mb), 1),
            waited_ms=round((time.perf_counter() - t0) * 1000, 1),
            actions=actions or (["enough memory"] if ok else ["nothing to unload"]),
            budget=budget,
            ceiling_mb=round(ceiling, 1),
            placed_because=because,
        )
        self._record(decision)
        return decision

    def _record(self, d: GateDecision) -> None:
        self._count("ok" if d.ok else "refused")
        log.log(logging.INFO if d.ok else logging.WARNING, "%s", d.log_line())
        self.decisions.append(d)
        if self.events is not None:
            self.events.publish("gate.decision", d)

    async def post_heavy_task(self) -> None:
        """Flush caches, and hand the tiers the gate unloaded back to the model manager,
        which reloads in the background those that stay resident. heavy_task runs this
        after releasing the gate, in the background: the response never waits for it."""
        collect, self._collect_next = self._collect_next, False
        await anyio.to_thread.run_sync(flush_gpu_memory, collect)
        # Only when no task took over: the next task's reservation would push a reloaded
        # model onto a CPU rung; the last task of a queue brings them back.
        if self._unloaded and not self.lanes.busy:
            tiers, self._unloaded = sorted(self._unloaded), set()
            self.models.restore_soon(tiers)

    async def recover_from_oom(
        self, kind: str, reason: str, *, device: str | None = None
    ) -> list[str]:
        """A ``kind`` run hit CUDA OOM (on ``device``): unload every model and every other
        pipeline there before its retry. Returns what was done."""
        actions = []
        if self.pipelines is not None:
            freed = await self.pipelines.unload_idle(kind, device=device)
            if freed:
                actions.append(f"unloaded pipelines: {', '.join(freed)}")
        out = await self.models.unload_all(reason=f"OOM in {reason}", device=device)
        if out.unloaded:
            self._unloaded.update(out.unloaded)
            actions.append(f"unloaded all models: {', '.join(out.unloaded)}")
        await anyio.to_thread.run_sync(flush_gpu_memory)
        self._collect_next = True  # the retry leaves garbage from the failed run too
        log.warning(
            "Memory gate: OOM during %r; %s", reason, "; ".join(actions) or "nothing to unload"
        )
        return actions

    async def take_place(
        self,
        need_of: Callable[[str], TaskNeed],
        reason: str,
        *,
        kind: str | None = None,
        ticket: str | None = None,
    ) -> Place:
        """Place a task on a device and take its place in that device's line now; raises
        QueueFull (503 with Retry-After) when the line is full. ``heavy_task(place=...)``
        then waits for the turn; a task that will not run calls ``place.abandon()``."""
        # Why a lock: placement probes in a thread; without it a later task could join a
        # line before an earlier one whose probe was slower. asyncio.Lock wakes in FIFO
        # order, so tasks join their lines in the order they arrived.
        async with self._placing:
            placed = await self._place(kind, need_of)
            lane = self.lane(placed.device)
            turn = lane.join(reason, kind, ticket)
        return Place(placed.device, placed.because, placed.snapshot, lane, turn)

    @contextlib.asynccontextmanager
    async def heavy_task(
        self,
        required_vram_mb: float,
        reason: str,
        *,
        required_ram_mb: float | None = None,
        kind: str | None = None,
        need_on: Callable[[str], TaskNeed] | None = None,
        ticket: str | None = None,
        place: Place | None = None,
        ladder_on: Callable[[str], Ladder] | None = None,
    ) -> AsyncIterator[HeavyTask]:
        """Hold the gate for one heavy task; raises QueueFull, QueueTimeout or
        InsufficientMemory (all 503 with Retry-After) when it cannot run.

        ``need_on(device)`` predicts the task's need on the device it will run on (a
        request-sized prediction); without it the given figures stand. ``place``: the
        place ``take_place`` took for it (else one is taken here). ``ladder_on(device)``:
        the request's placement rungs there; the gate then chooses the rung
        (``gate_rungs.py``) and the task carries the chosen option as ``rung``."""

        def need_of(device: str) -> TaskNeed:
            if need_on is not None:
                return need_on(device)
            return task_need(device, required_vram_mb, required_ram_mb)

        if place is None:
            place = await self.take_place(need_of, reason, kind=kind, ticket=ticket)
        place.take()
        device, because, snap, lane = place.device, place.because, place.snapshot, place.lane
        turn = place.turn
        waited = await lane.wait(turn) if turn is not None else None
        queued_ms = waited or 0.0
        res: Reservation | None = None
        t_start = time.monotonic()
        try:
            # A free lane decides on the snapshot placement took: one probe in all.
            if waited is None:
                view = self.placement.view_of(snap, device=device)
            else:
                view = await self.placement.view(device=device)
            need = need_of(device)
            if because != "the only device":
                log.info("Heavy task %r placed on %s because %s", reason, device, because)
            # Reserved before making room, so no model load can take the room we make.
            res = self.ledger.reserve(need.device, need.mb, f"task:{reason}", "task")
            chosen = None
            if ladder_on is not None:
                decision, chosen = await self._make_room_on_ladder(
                    ladder_on(device), reason, view, own=res, keep_pipeline=kind, because=because
                )
                self._record(decision)
                need = TaskNeed(
                    device, decision.required_mb, decision.need_source, decision.need_detail
                )
            else:
                decision = await self._make_room(
                    need, reason, view, own=res, keep_pipeline=kind, because=because
                )
            if not decision.ok:
                raise InsufficientMemory(
                    f"Not enough {need.memory} for {reason}: {need.mb:.0f} MB required "
                    f"({need.source}{': ' + need.detail if need.detail else ''}), "
                    f"{decision.usable_mb:.0f} MB usable; {decision.actions[-1]}",
                    retry_after_s=max(5.0, self._mean_task_s),
                    required_vram_mb=need.mb,
                    need_source=need.source,
                    free_vram_mb=decision.usable_mb,
                    freed_mb=decision.freed_mb,
                    device=need.device,
                )
            task = HeavyTask(
                reason,
                kind,
                need.device,
                need.mb,
                queued_ms,
                decision,
                reservation=res,
                rung=chosen,
            )
            lane.current = task
            try:
                yield task
            finally:
                lane.current = None
                elapsed = time.monotonic() - t_start
                self._mean_task_s = 0.8 * self._mean_task_s + 0.2 * elapsed
        finally:
            self.ledger.release(res)
            # Shielded: a cancelled request must still hand the slot on and clean up.
            lane.release()
            post = asyncio.create_task(
                self._flush_and_restore_quietly(), name="edison-post-heavy-task"
            )
            self._background.add(post)
            post.add_done_callback(self._background.discard)

    async def _flush_and_restore_quietly(self) -> None:
        try:
            await self.post_heavy_task()
        except Exception:  # noqa: BLE001 - cleanup must not fail anything
            log.exception("post_heavy_task failed")
