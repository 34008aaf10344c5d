"""The gate's choice of a placement rung: making room for a request that has a ladder.

A generation request comes with its placements, fastest first (the pipeline registry's
``RungLadder``: each option's need on the device and in host RAM, and its seconds per
step). The gate takes the fastest option whose need fits what is usable now, and makes
room for a faster one only where that is worth it, in the seed's order:

1. idle pipelines are unloaded while a faster rung than the one that fits now could fit
   with everything unloaded (a pipeline costs its own reload only if asked again);
2. chat models (the heavy slot, then all) are unloaded only when no rung fits without
   them, or when the faster rung they buy saves more time over this request's steps
   than reloading them costs (their measured load times): ``worth_unloading``.

What the gate decided, the rung and why go into the decision (the job's ``gate``, the
``Memory gate:`` log line, /system/memory). A request that fits no rung even with
everything Edison holds unloaded (or whose smallest rung needs more RAM than there is)
is refused at once with the figures, unloading nothing.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from services.memory.gate_records import GateDecision
from services.memory.ledger import CPU, Reservation
from services.memory.placement import DeviceView, ceiling_mb

if TYPE_CHECKING:
    from services.memory.gate import GateModels, IdlePipelines
    from services.memory.placement import Placement
    from services.settings import Settings


class RungOptionLike(Protocol):
    rung: str
    label: str
    need_mb: float
    host_mb: float
    step_s: float
    source: str
    detail: str


class RungChoiceLike(Protocol):
    option: Any  # a RungOptionLike, or None when no rung fits
    because: str


class Ladder(Protocol):
    """What the gate needs of a request's placements (``placement_ladder.RungLadder``)."""

    @property
    def least(self) -> Any: ...

    def choose(self, usable_mb: float, host_usable_mb: float) -> RungChoiceLike: ...

    def worth_unloading(
        self, now: Any, then: Any, reload_s: float, what: str
    ) -> tuple[bool, str]: ...


def _slower(now: RungChoiceLike, target: RungChoiceLike) -> bool:
    """True while ``now`` is worse than ``target``: nothing fits yet, or only slower."""
    if target.option is None:
        return False
    return now.option is None or now.option.step_s > target.option.step_s


class RungRoom:
    """The MemoryGate's making room on a ladder. A mixin: the gate sets the attributes."""

    settings: Settings
    placement: Placement
    models: GateModels
    pipelines: IdlePipelines | None
    _unloaded: set[str]

    async def _make_room_on_ladder(
        self,
        ladder: Ladder,
        reason: str,
        view: DeviceView,
        *,
        own: Reservation | None = None,
        keep_pipeline: str | None = None,
        because: str = "the only device",
    ) -> tuple[GateDecision, Any]:
        """Choose the request's rung, unloading what the module docstring allows; the
        decision and the chosen option (None when refused). ``own``, the task's ledger
        entry, is settled to the chosen option's need."""
        t0 = time.perf_counter()
        before = budget = view.budget
        device = view.device
        ceiling = ceiling_mb(before)
        host = (
            math.inf
            if device == CPU
            else self.placement.view_of(view.snapshot, device=CPU).budget.usable_mb
        )
        actions: list[str] = []
        settling = False
        now = ladder.choose(budget.usable_mb, host)
        best = ladder.choose(max(ceiling, budget.usable_mb), host)

        async def probe(action: str | None) -> None:
            nonlocal budget, now
            if action:
                actions.append(action)
            budget = (await self.placement.view(exclude=own, device=device)).budget
            now = ladder.choose(budget.usable_mb, host)

        if best.option is None:
            actions.append(
                f"unloaded nothing: {best.because} (at most {ceiling:.0f} MB with everything "
                "Edison holds unloaded)"
            )
        else:
            if _slower(now, best) and self.pipelines is not None:
                freed = await self.pipelines.unload_idle(keep_pipeline or "", device=device)
                if freed:
                    await probe(f"unloaded idle pipelines: {', '.join(freed)}")
            cost = self.models.unload_cost(device)
            if _slower(now, best) and cost.models:
                then = ladder.choose(budget.usable_mb + cost.mb, host)
                what = f"{cost.models} chat model(s) ({cost.mb:.0f} MB)"
                go, why = ladder.worth_unloading(now.option, then.option, cost.reload_s, what)
                if not go:
                    actions.append(why)
                else:
                    target = then if then.option is not None else best
                    if self.models.heavy_slots().get(device) is not None:
                        out = await self.models.unload_heavy_slot(
                            reason=f"gate: {reason}", device=device
                        )
                        settling = settling or out.settling
                        await probe(f"unloaded heavy slot: {', '.join(out.unloaded)} ({why})")
                    if _slower(now, target) and self.models.unload_cost(device).models:
                        out = await self.models.unload_all(reason=f"gate: {reason}", device=device)
                        settling = settling or out.settling
                        self._unloaded.update(out.unloaded)
                        await probe(f"unloaded all models: {', '.join(out.unloaded)} ({why})")
        if now.option is None and settling:
            # The driver's figure lags behind freed memory (see _make_room): poll.
            deadline = time.monotonic() + self.settings.memory.recovery_wait_s
            while now.option is None and time.monotonic() < deadline:
                await anyio.sleep(self.settings.memory.recovery_poll_s)
                await probe(None)
        chosen = now.option
        shown = chosen or ladder.least
        if chosen is not None and own is not None:
            self.placement.ledger.settle(own, chosen.need_mb)
        decision = GateDecision(
            ok=chosen is not None,
            reason=reason,
            device=device,
            required_mb=shown.need_mb if shown is not None else 0.0,
            need_source=shown.source if shown is not None else "estimated",
            need_detail=shown.detail if shown is not None else "",
            usable_mb=round(budget.usable_mb, 1),
            freed_mb=round(max(0.0, budget.driver_free_mb - before.driver_free_mb), 1),
            waited_ms=round((time.perf_counter() - t0) * 1000, 1),
            actions=actions or (["enough memory"] if chosen else ["nothing to unload"]),
            budget=budget,
            ceiling_mb=round(ceiling, 1),
            placed_because=because,
            rung=chosen.rung if chosen is not None else None,
            rung_because=now.because if chosen is not None else best.because,
        )
        return decision, chosen
