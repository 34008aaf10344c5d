"""Many GPUs: which device a load or a heavy task goes to, decided from numbers.

Pure functions over figures that ``placement.py`` gathers (one snapshot, the ledger, the
gate's queues, the loaded models); each returns its choice with a ``because`` that the
logs and ``/system/memory`` show. With one device every choice is that device.

- **Loads** (:func:`choose_load_device`): the device where the model's best rung fits
  now (most GPU layers, then the largest context); ties go to the device with the fewest
  heavy tasks, then the most usable memory. A device whose heavy slot must be emptied
  first loses to one with an empty slot offering the same rung.
- **Split loads** (:func:`split_plan`): when no single GPU holds the best GPU rung and the
  tier allows it, the layers are shared across GPUs in proportion to what each can give.
- **Heavy tasks** (:func:`choose_task_device`): an idle device before a busy one (a task
  never waits in one card's queue while another card is free); then the device that
  already holds the pipeline, then one with free room, then the one where unloading
  costs least (never the fast tier if another choice exists, then fewest models, then
  fewest MB).
- **Residency** (:func:`residency_hold`): a heavy model younger than
  ``models.min_residency_s`` is not evicted by a chat for another heavy tier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# ---- loads ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadOption:
    """One device a load could go to, and what it would get there."""

    device: str
    rung: int  # index of the first fitting rung on the ladder (lower: more layers/context)
    fits: bool  # False: only a CPU rung (no VRAM) is left on this device
    usable_mb: float  # what the load may use there (after evicting ``evicts``)
    heavy_tasks: int = 0  # image/video/music tasks running or queued on the device
    evicts: str | None = None  # the heavy tier that must leave this device first


@dataclass(frozen=True)
class LoadChoice:
    option: LoadOption
    because: str


def choose_load_device(options: Sequence[LoadOption]) -> LoadChoice:
    """The device where the best rung fits now; ties as the module docstring says."""
    if not options:
        raise ValueError("no device to place the load on")
    best = min(
        options,
        key=lambda o: (not o.fits, o.rung, o.evicts is not None, o.heavy_tasks, -o.usable_mb),
    )
    if len(options) == 1:
        return LoadChoice(best, "the only device")
    rivals = [o for o in options if o is not best]
    if not best.fits:
        why = "no device fits a GPU rung; CPU rung"
    elif all(o.fits and o.rung == best.rung for o in rivals):
        if any(o.evicts != best.evicts for o in rivals):
            why = "same rung elsewhere, and nothing to evict here"
        elif any(o.heavy_tasks != best.heavy_tasks for o in rivals):
            why = f"same rung elsewhere; fewest heavy tasks ({best.heavy_tasks})"
        else:
            why = f"same rung elsewhere; most usable memory ({best.usable_mb:.0f} MB)"
    else:
        why = f"best rung that fits (rung {best.rung})"
    if best.evicts:
        why += f"; evicts {best.evicts}"
    return LoadChoice(best, why)


@dataclass(frozen=True)
class SplitPlan:
    """A model's layers shared across GPUs: the devices and each one's share."""

    devices: tuple[str, ...]
    shares: tuple[float, ...]  # sums to 1, in the order of ``devices``
    need_mb: tuple[float, ...]  # what each device holds: its share of the model + overhead


def split_plan(
    usable_mb: dict[str, float], model_mb: float, overhead_mb: float
) -> SplitPlan | None:
    """Share ``model_mb`` across the GPUs in ``usable_mb`` in proportion to the room each
    has beyond one worker overhead (each card gets a CUDA context), using the fewest
    cards, the roomiest first. None when even all of them together cannot hold it."""
    room = sorted(
        ((d, mb - overhead_mb) for d, mb in usable_mb.items() if mb > overhead_mb),
        key=lambda x: -x[1],
    )
    for k in range(2, len(room) + 1):
        chosen = room[:k]
        total = sum(r for _, r in chosen)
        if total >= model_mb:
            shares = tuple(r / total for _, r in chosen)
            needs = tuple(model_mb * s + overhead_mb for s in shares)
            return SplitPlan(tuple(d for d, _ in chosen), shares, needs)
    return None


# ---- heavy tasks ------------------------------------------------------------------


@dataclass(frozen=True)
class UnloadCost:
    """What making room on a device would unload (its LLM workers holding memory there)."""

    fast: bool = False  # the fast tier is among them
    models: int = 0
    mb: float = 0.0
    reload_s: float = 0.0  # what loading them again took (their measured load times)


@dataclass(frozen=True)
class TaskOption:
    """One device a heavy task could run on."""

    device: str
    need_mb: float  # the task's predicted need there
    usable_mb: float  # usable now
    ceiling_mb: float  # usable if Edison unloaded everything it holds there
    queued: int = 0  # tasks running or waiting on the device's gate
    pipeline_loaded: bool = False  # this kind's pipeline is loaded there
    cost: UnloadCost = UnloadCost()


@dataclass(frozen=True)
class TaskChoice:
    option: TaskOption
    because: str


def _room_class(o: TaskOption) -> int:
    if o.pipeline_loaded and o.need_mb <= o.usable_mb:
        return 0
    if o.need_mb <= o.usable_mb:
        return 1
    return 2


def choose_task_device(options: Sequence[TaskOption]) -> TaskChoice:
    """The device for a heavy task (rules in the module docstring). Devices that could
    never hold the need are left out unless none could: then the first, to be refused
    there with the figures."""
    if not options:
        raise ValueError("no device to place the task on")
    possible = [o for o in options if o.need_mb <= max(o.ceiling_mb, o.usable_mb)]
    if not possible:
        return TaskChoice(options[0], "no device could hold the need")
    best = min(
        possible,
        key=lambda o: (
            o.queued,
            _room_class(o),
            o.cost.fast if _room_class(o) == 2 else False,
            o.cost.models if _room_class(o) == 2 else 0,
            o.cost.mb if _room_class(o) == 2 else 0.0,
            -o.usable_mb,
        ),
    )
    if len(options) == 1:
        return TaskChoice(best, "the only device")
    busier = all(o.queued > best.queued for o in possible if o is not best)
    cls = _room_class(best)
    if cls == 0:
        why = "pipeline already loaded there"
    elif cls == 1:
        why = f"free room ({best.usable_mb:.0f} MB usable)"
    elif best.cost.models:
        fast = ", fast tier included" if best.cost.fast else ""
        why = f"least to unload ({best.cost.models} model(s), {best.cost.mb:.0f} MB{fast})"
    else:
        why = "least to unload (idle pipelines only)"
    if busier and len(possible) > 1:
        why = f"idle gate ({best.queued} ahead, others busier); {why}"
    return TaskChoice(best, why)


# ---- residency --------------------------------------------------------------------


@dataclass(frozen=True)
class Occupant:
    """The heavy model in one device's heavy slot."""

    device: str
    tier: str
    loaded_at: float


@dataclass(frozen=True)
class ResidencyCheck:
    """Which occupied devices a chat may evict now, and how long until the others may."""

    evictable: tuple[str, ...]
    held: tuple[str, ...]  # devices whose occupant is still within its residency
    wait_s: float  # until the first held occupant may be evicted (0 when none is held)


def residency_hold(
    occupants: Sequence[Occupant], now: float, min_residency_s: float
) -> ResidencyCheck:
    """Split occupied devices into those a chat may evict and those it may not yet."""
    evictable, held, waits = [], [], []
    for o in occupants:
        age = now - o.loaded_at
        if age >= min_residency_s:
            evictable.append(o.device)
        else:
            held.append(o.device)
            waits.append(min_residency_s - age)
    return ResidencyCheck(tuple(evictable), tuple(held), min(waits) if waits else 0.0)
