"""MemoryGate: makes room before each heavy task (image, video, music) and runs them one
at a time.

    async with gate.heavy_task(required_vram_mb, required_ram_mb, reason) as task:
        ...run the pipeline...

waits its turn in a bounded FIFO queue, holds a reservation in the memory ledger for
the task's whole life (so no model load can take that memory meanwhile), runs
``pre_heavy_task`` (free memory on the task's device -> unload idle pipelines -> unload
the heavy slot -> unload all models -> wait for the driver -> final check) and on every
exit path releases the reservation and, in the background, runs ``post_heavy_task``
(fast model back, caches flushed). Without a GPU the same rules run on RAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from services.errors import InsufficientMemory, QueueFull, QueueTimeout
from services.memory_ledger import CPU, MemoryLedger, Reservation, device_name
from services.memory_probe import MemoryProbe, MemorySnapshot
from services.model_manager import ModelManager, flush_gpu_memory
from services.settings import Settings

log = logging.getLogger("edison.gate")

Unloader = Callable[[str], Awaitable[list[str]]]  # frees idle pipelines except the named kind


@dataclass
class GateResult:
    ok: bool
    freed_mb: float
    snapshot: MemorySnapshot
    device: str
    actions: list[str]
    waited_ms: float
    required_mb: float
    usable_mb: float
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "freed_mb": round(self.freed_mb, 1),
            "device": self.device,
            "actions": self.actions,
            "waited_ms": round(self.waited_ms, 1),
            "required_mb": self.required_mb,
            "usable_mb": round(self.usable_mb, 1),
            "error": self.error,
        }


@dataclass
class HeavyTask:
    """One heavy task holding the gate."""

    reason: str
    device: str
    required_mb: float
    reservation: Reservation
    queued_ms: float
    gate: GateResult | None = None
    started_at: float = field(default_factory=time.time)


class MemoryGate:
    """One per app: the only way a heavy task gets the GPU."""

    def __init__(
        self,
        settings: Settings,
        probe: MemoryProbe,
        ledger: MemoryLedger,
        models: ModelManager,
        *,
        unload_pipelines: Unloader | None = None,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.ledger = ledger
        self.models = models
        self.unload_pipelines = unload_pipelines
        # Why a hand-made FIFO and not asyncio.Lock: the queue must be bounded
        # (queue.max_waiting -> 503), observable (/system/memory shows its length) and
        # hand the slot over in arrival order even when a waiter times out or is cancelled.
        self._busy = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.current: HeavyTask | None = None
        self.decisions: deque[dict[str, Any]] = deque(maxlen=20)
        self.running = 0
        self.max_running_seen = 0  # instrumentation: must never exceed 1
        self.outcomes: dict[str, int] = {}
        self._mean_task_s = 10.0
        self._unloaded_fast = False
        self._collect_next = False
        self._background: set[asyncio.Task[None]] = set()

    # ---- views ---------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def describe(self) -> dict[str, Any]:
        cur = self.current
        return {
            "state": "busy" if self._busy else "idle",
            "current": None
            if cur is None
            else {
                "reason": cur.reason,
                "device": cur.device,
                "required_mb": cur.required_mb,
                "running_s": round(time.time() - cur.started_at, 2),
            },
            "queue_length": self.queue_length,
            "max_waiting": self.settings.queue.max_waiting,
            "last_decisions": list(self.decisions)[-10:],
        }

    def retry_after_s(self) -> float:
        """A guess at when a slot frees up: mean task time x tasks ahead."""
        return max(1.0, self._mean_task_s * (self.queue_length + 1))

    # ---- queue ---------------------------------------------------------------------
    async def _acquire(self) -> float:
        """Wait for the gate in FIFO order; return the ms waited."""
        t0 = time.perf_counter()
        if not self._busy and not self.queue_length:
            self._busy = True
            return 0.0
        if self.queue_length >= self.settings.queue.max_waiting:
            self._count("queue_full")
            raise QueueFull(
                f"The heavy-task queue is full ({self.queue_length} waiting)",
                retry_after_s=self.retry_after_s(),
                queue_length=self.queue_length,
                max_waiting=self.settings.queue.max_waiting,
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.settings.queue.max_wait_s):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._release()  # the slot was handed to us as we gave up: pass it on
            else:
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                self._count("queue_timeout")
                raise QueueTimeout(
                    f"Waited {self.settings.queue.max_wait_s:g} s for the GPU without a turn",
                    retry_after_s=self.retry_after_s(),
                    queue_length=self.queue_length,
                ) from None
            raise
        return (time.perf_counter() - t0) * 1000

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand over: _busy stays True
                return
        self._busy = False

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    # ---- the gate itself -----------------------------------------------------------
    async def _snapshot(self) -> tuple[MemorySnapshot, str]:
        snap = await anyio.to_thread.run_sync(self.probe.snapshot)
        return snap, device_name(snap, self.settings.memory.device)

    def required_for(self, device: str, required_vram_mb: float, required_ram_mb: float) -> float:
        return required_ram_mb if device == CPU else required_vram_mb

    async def pre_heavy_task(
        self,
        required_vram_mb: float,
        reason: str,
        *,
        required_ram_mb: float | None = None,
        own: Reservation | None = None,
        keep_pipeline: str | None = None,
    ) -> GateResult:
        """Make room for a task on its device; see the module docstring for the steps."""
        t0 = time.perf_counter()
        snap, device = await self._snapshot()
        required = self.required_for(
            device,
            required_vram_mb,
            required_vram_mb if required_ram_mb is None else required_ram_mb,
        )
        before = self.ledger.budget(snap, device, exclude=own)
        budget, actions = before, []

        async def check(action: str | None) -> bool:
            """Probe again (after an action, or while waiting) and compare."""
            nonlocal snap, budget
            if action:
                actions.append(action)
            snap, _ = await self._snapshot()
            budget = self.ledger.budget(snap, device, exclude=own)
            return budget.usable_mb >= required

        ok = budget.usable_mb >= required
        if not ok and self.unload_pipelines is not None:
            freed = await self.unload_pipelines(keep_pipeline or "")
            if freed:
                ok = await check(f"unloaded idle pipelines: {', '.join(freed)}")
        if not ok and self.models.heavy_slot is not None:
            out = await self.models.unload_heavy_slot(reason=f"gate: {reason}")
            ok = await check(f"unloaded heavy slot: {', '.join(out['unloaded'])}")
        if not ok and self.models.loaded_info():
            out = await self.models.unload_all(reason=f"gate: {reason}")
            self._unloaded_fast = self._unloaded_fast or "fast" in out["unloaded"]
            ok = await check(f"unloaded all models: {', '.join(out['unloaded'])}")
        if not ok and len(actions):
            # The driver's figure lags behind freed memory (Ollama: 0.5-1.5 s): poll.
            deadline = time.monotonic() + self.settings.memory.recovery_wait_s
            while not ok and time.monotonic() < deadline:
                await anyio.sleep(self.settings.memory.recovery_poll_s)
                ok = await check(None)
        freed = max(0.0, budget.driver_free_mb - before.driver_free_mb)
        result = GateResult(
            ok=ok,
            freed_mb=freed,
            snapshot=snap,
            device=device,
            actions=actions or (["enough memory"] if ok else ["nothing to unload"]),
            waited_ms=(time.perf_counter() - t0) * 1000,
            required_mb=required,
            usable_mb=budget.usable_mb,
        )
        if not ok:
            result.error = {
                "required_mb": required,
                "free_mb": round(budget.usable_mb, 1),
                "freed_mb": round(freed, 1),
                "device": device,
            }
        self._record(result, reason, budget.to_dict())
        return result

    def _record(self, r: GateResult, reason: str, figures: dict[str, Any]) -> None:
        self._count("ok" if r.ok else "refused")
        log.log(
            logging.INFO if r.ok else logging.WARNING,
            "Memory gate: ok=%s, freed=%.0fMB reason=%r device=%s required=%.0fMB usable=%.0fMB "
            "driver_free=%.0fMB held=%.0fMB reserve=%.0fMB actions=%s",
            r.ok,
            r.freed_mb,
            reason,
            r.device,
            r.required_mb,
            figures["usable_mb"],
            figures["driver_free_mb"],
            figures["held_mb"],
            figures["reserve_mb"],
            "; ".join(r.actions),
        )
        self.decisions.append({"at": time.time(), "reason": reason, **r.to_dict()})

    async def post_heavy_task(self) -> None:
        """Flush caches, and bring the fast model back in the background if the gate
        unloaded it. heavy_task runs this after releasing the gate, in the background:
        the response never waits for it."""
        collect, self._collect_next = self._collect_next, False
        await anyio.to_thread.run_sync(flush_gpu_memory, collect)
        # Only when no task took over: the next task's reservation would push the fast
        # model onto a CPU rung; the last task of a queue brings it back.
        if self._unloaded_fast and not self._busy:
            self._unloaded_fast = False
            self.models.ensure_loaded_soon("fast")

    async def recover_from_oom(self, reason: str) -> list[str]:
        """A run hit CUDA OOM: unload every model and other pipeline before the retry."""
        actions = []
        if self.unload_pipelines is not None:
            freed = await self.unload_pipelines(reason.split(":")[0])
            if freed:
                actions.append(f"unloaded pipelines: {', '.join(freed)}")
        out = await self.models.unload_all(reason=f"OOM in {reason}")
        if out["unloaded"]:
            self._unloaded_fast = self._unloaded_fast or "fast" in out["unloaded"]
            actions.append(f"unloaded all models: {', '.join(out['unloaded'])}")
        await anyio.to_thread.run_sync(flush_gpu_memory)
        self._collect_next = True  # the retry leaves garbage from the failed run too
        log.warning(
            "Memory gate: OOM during %r; %s", reason, "; ".join(actions) or "nothing to unload"
        )
        return actions

    @contextlib.asynccontextmanager
    async def heavy_task(
        self,
        required_vram_mb: float,
        reason: str,
        *,
        required_ram_mb: float | None = None,
        kind: str | None = None,
    ) -> AsyncIterator[HeavyTask]:
        """Hold the gate for one heavy task; raises QueueFull, QueueTimeout or
        InsufficientMemory (all 503 with Retry-After) when it cannot run."""
        queued_ms = await self._acquire()
        res: Reservation | None = None
        t_start = time.monotonic()
        try:
            snap, device = await self._snapshot()
            ram = required_vram_mb if required_ram_mb is None else required_ram_mb
            required = self.required_for(device, required_vram_mb, ram)
            # Reserved before making room, so no model load can take the room we make.
            res = self.ledger.reserve(device, required, f"task:{reason}", "task")
            gate = await self.pre_heavy_task(
                required_vram_mb, reason, required_ram_mb=ram, own=res, keep_pipeline=kind
            )
            if not gate.ok:
                raise InsufficientMemory(
                    f"Not enough {'RAM' if device == CPU else 'VRAM'} for {reason}: "
                    f"{gate.required_mb:.0f} MB required, {gate.usable_mb:.0f} MB usable after "
                    "unloading every model",
                    retry_after_s=max(5.0, self._mean_task_s),
                    required_vram_mb=gate.required_mb,
                    free_vram_mb=round(gate.usable_mb, 1),
                    freed_mb=round(gate.freed_mb, 1),
                    device=device,
                )
            task = HeavyTask(reason, device, required, res, queued_ms, gate)
            self.current = task
            self.running += 1
            self.max_running_seen = max(self.max_running_seen, self.running)
            try:
                yield task
            finally:
                self.running -= 1
                self.current = None
                elapsed = time.monotonic() - t_start
                self._mean_task_s = 0.8 * self._mean_task_s + 0.2 * elapsed
        finally:
            self.ledger.release(res)
            # Shielded: a cancelled request must still hand the slot on and clean up.
            self._release()
            post = asyncio.create_task(self._post_quietly(), name="edison-post-heavy-task")
            self._background.add(post)
            post.add_done_callback(self._background.discard)

    async def _post_quietly(self) -> None:
        try:
            await self.post_heavy_task()
        except Exception:  # noqa: BLE001 - cleanup must not fail anything
            log.exception("post_heavy_task failed")
