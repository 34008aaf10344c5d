"""Heavy slots, one per device: who holds each, and where a heavy tier may load now.

A heavy tier (medium, deep, reasoning, vision) takes one device's heavy slot. Loading it
on a device whose slot holds another heavy model evicts that model, except that a chat
may not evict one younger than ``models.min_residency_s`` on a host with several devices
(no thrashing): it goes to another device, waits, or falls back (ResidencyHold says how
long). The ModelManager acts on these answers under its load lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from services.errors import ResidencyHold
from services.llm.planner import DeviceCandidate
from services.llm.records import TierState
from services.memory.devices import Occupant, residency_hold


def heavy_slots(tiers: Iterable[TierState]) -> dict[str, str]:
    """device -> the heavy tier loaded there (a split model holds every card it is on)."""
    slots: dict[str, str] = {}
    for t in tiers:
        if t.heavy and t.model is not None and t.alias_of is None:
            for d in t.model.devices or (t.model.device,):
                slots[d] = t.name
    return slots


@dataclass(frozen=True)
class Candidates:
    """Where a tier may load now, and the hold on the devices it may not evict yet."""

    devices: list[DeviceCandidate]
    hold: ResidencyHold | None = None  # set when some device is held for residency


def load_candidates(
    tier: TierState,
    tiers: Mapping[str, TierState],
    allowed: Sequence[str],
    *,
    now: float,
    min_residency_s: float,
    residency: bool,
) -> Candidates:
    """The devices ``tier`` may load on now, with what each would evict.

    A device whose heavy slot holds another heavy model is a candidate that evicts it,
    unless ``residency`` (a chat on a host with several devices) and that model is
    younger than ``min_residency_s``: that device is held, and ``hold`` says until when.
    With every allowed device so held, raises the hold.
    """
    if not tier.heavy:
        return Candidates([DeviceCandidate(d) for d in allowed])
    slots = heavy_slots(tiers.values())
    occupied = {d: tiers[t] for d, t in slots.items() if d in allowed and t != tier.name}
    check = residency_hold(
        [Occupant(d, t.name, t.model.loaded_at) for d, t in occupied.items() if t.model],
        now,
        min_residency_s if residency else 0.0,
    )
    out = []
    for d in allowed:
        occupant = occupied.get(d)
        if occupant is None:
            out.append(DeviceCandidate(d))
        elif d in check.evictable and occupant.model is not None:
            held = sum(r.mb for r in occupant.model.reservations if r.device == d)
            out.append(DeviceCandidate(d, held, occupant.name))
    hold = None
    if check.held:
        young = ", ".join(f"{occupied[d].name} on {d}" for d in check.held)
        hold = ResidencyHold(
            f"{tier.name}: heavy slots hold {young}, loaded less than {min_residency_s:g} s "
            f"ago; {check.wait_s:.1f} s to wait",
            tier=tier.name,
            wait_s=check.wait_s,
        )
    if not out:
        assert hold is not None
        raise hold
    return Candidates(out, hold)
