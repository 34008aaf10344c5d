"""How a load settles: replacing a worker's estimate in the ledger with what it really took.

A load reserves its estimate before the worker starts; once the worker is ready the
reservation is settled to the best evidence there is, and the loaded model says which
(``settled_from``):

1. ``nvml_process``: NVML lists the worker's pid (or a child's) with its memory. The
   exact figure, where Edison shares the host's PID namespace.
2. ``device_delta``: in a container NVML lists none of our pids, but the device's used
   figure (NVML, torch or nvidia-smi) still moves: what it grew by between just before the
   start and just after the worker was ready. Trusted only when nothing else Edison
   books on that device changed meanwhile, and the figure grew.
3. ``rss``: a worker without GPU layers (a CPU host, or a CPU rung on a GPU host): its
   resident memory, in RAM.
4. ``estimate``: no evidence; the reservation keeps the estimate.

Settling to 0 because NVML did not list the pid (what this replaced) made the ledger
count our own models as "other programs" and made every release wait return at once.
Blocking probes run in threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import anyio

from services.memory.ledger import CPU, MemoryLedger, Reservation
from services.memory.placement import Placement
from services.memory.probe import MemorySnapshot, rss_mb

SettledFrom = Literal["nvml_process", "device_delta", "rss", "estimate"]


def gpu_index(device: str) -> int:
    return int(device.split(":")[1])


@dataclass(frozen=True)
class BeforeLoad:
    """The devices' used figures just before a worker starts, and what Edison's other
    reservations held there then."""

    used_mb: dict[str, float]  # device -> the driver's used figure (absent: none)
    others_held_mb: dict[str, float]  # device -> the ledger's entries other than ours


@dataclass(frozen=True)
class Settlement:
    """What a load measured: one figure per reservation (in the order given), where the
    figures came from, and the GPU total measured (None: none)."""

    source: SettledFrom
    mb: tuple[float, ...]
    gpu_measured_mb: float | None = None
    rss_mb: float | None = None


def _others_held(ledger: MemoryLedger, device: str, ours: Sequence[Reservation]) -> float:
    return ledger.held_mb(device) - sum(r.mb for r in ours if r.device == device)


async def before_load(
    placement: Placement, devices: Sequence[str], ours: Sequence[Reservation]
) -> BeforeLoad:
    """Probe the GPUs a worker is about to take (``ours``: its reservations, already in
    the ledger). Nothing to probe on the CPU."""
    gpus = [d for d in devices if d != CPU]
    if not gpus:
        return BeforeLoad({}, {})
    snap = await placement.snapshot()
    used = _used(snap, gpus)
    held = {d: _others_held(placement.ledger, d, ours) for d in gpus}
    return BeforeLoad(used, held)


def _used(snap: MemorySnapshot, devices: Sequence[str]) -> dict[str, float]:
    out = {}
    for d in devices:
        g = snap.gpu(gpu_index(d))
        if g is not None and snap.vram_source not in ("none", ""):
            out[d] = g.used_mb
    return out


async def measure_load(
    placement: Placement,
    pid: int,
    devices: Sequence[str],
    ours: Sequence[Reservation],
    before: BeforeLoad,
    *,
    shares: Sequence[float] | None = None,
    on_gpu: bool,
) -> Settlement:
    """The best evidence of what the worker ``pid`` took on each of ``devices`` (one per
    reservation in ``ours``, same order), per the module docstring. Without GPU layers:
    its RSS only (``mb`` empty), which the caller books on its RAM reservation."""
    rss = rss_mb(pid)
    if not on_gpu:
        return Settlement("estimate" if rss is None else "rss", (), None, rss)
    listed = await anyio.to_thread.run_sync(placement.probe.process_vram_mb, [pid])
    if listed is not None and pid in listed:
        total = listed[pid]
        parts = (total,) if shares is None else tuple(total * s for s in shares)
        return Settlement("nvml_process", parts, total, rss)
    if before.used_mb:
        after = _used(await placement.snapshot(), devices)
        deltas = []
        for d in devices:
            if d not in before.used_mb or d not in after:
                break
            if abs(_others_held(placement.ledger, d, ours) - before.others_held_mb[d]) > 0.5:
                break  # another reservation moved meanwhile: the delta is not ours alone
            deltas.append(after[d] - before.used_mb[d])
        else:
            if deltas and deltas[0] > 0 and all(x >= 0 for x in deltas):
                return Settlement("device_delta", tuple(deltas), sum(deltas), rss)
    return Settlement("estimate", tuple(r.mb for r in ours), None, rss)


async def remeasure(
    placement: Placement, pid: int, source: SettledFrom, *, on_gpu: bool
) -> float | None:
    """A loaded worker's figure again, from the evidence it settled from at load (used
    once its vision projector has loaded); None where that evidence cannot be read again
    (a device delta is only ever true around the load)."""
    if source == "rss" and not on_gpu:
        return rss_mb(pid)
    if source == "nvml_process" and on_gpu:
        listed = await anyio.to_thread.run_sync(placement.probe.process_vram_mb, [pid])
        if listed is not None and pid in listed:
            return listed[pid]
    return None
