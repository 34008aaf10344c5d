"""The memory ledger: every consumer of device memory writes down what it holds.

This is the one place where Edison decides how much memory is free to hand out.
Model loads reserve their estimate before starting and settle to the measured
figure after; heavy tasks (image, video, music) reserve for their whole life. The
arithmetic follows Ollama and ComfyUI:

    usable = min(driver_free, capacity - ledger_held) - reserve

``driver_free`` lags behind allocations that are under way, ``capacity -
ledger_held`` does not see other programs; the smaller of the two is the honest
figure. ``capacity`` is the card's total, capped by ``memory.vram_budget_mb``.
On a host without a GPU the device is ``"cpu"`` and the same rule runs on RAM.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from services.memory.probe import MemorySnapshot

CPU = "cpu"
Kind = Literal["model", "task", "pipeline"]


@dataclass
class Reservation:
    id: int
    device: str
    owner: str
    kind: Kind
    mb: float
    settled: bool = False
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class DeviceBudget:
    """The figures one decision is taken on, all in MB."""

    device: str
    capacity_mb: float
    driver_free_mb: float
    held_mb: float
    reserve_mb: float

    @property
    def usable_mb(self) -> float:
        return max(0.0, min(self.driver_free_mb, self.capacity_mb - self.held_mb) - self.reserve_mb)


@dataclass(frozen=True)
class DeviceLimit:
    """One GPU's own reserve and cap, where they differ from every GPU's."""

    reserve_vram_mb: float | None = None
    vram_budget_mb: float | None = None


class MemoryLedger:
    """Thread-safe book of reservations per device. One per app."""

    def __init__(
        self,
        *,
        reserve_vram_mb: float,
        reserve_ram_mb: float,
        limits: dict[str, DeviceLimit] | None = None,
    ) -> None:
        self.reserve_vram_mb = reserve_vram_mb
        self.reserve_ram_mb = reserve_ram_mb
        self.limits = dict(limits or {})  # "cuda:1" -> its own reserve and cap
        # Why: loads run in threads and tasks in the event loop; all of them read and
        # write the book. The lock is held for dictionary updates only, never for I/O.
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._entries: dict[int, Reservation] = {}

    def reserve(self, device: str, mb: float, owner: str, kind: Kind) -> Reservation:
        res = Reservation(next(self._ids), device, owner, kind, max(0.0, float(mb)))
        with self._lock:
            self._entries[res.id] = res
        return res

    def settle(self, res: Reservation, measured_mb: float) -> None:
        """Replace an estimate with what was really measured."""
        with self._lock:
            if res.id in self._entries:
                res.mb = max(0.0, float(measured_mb))
                res.settled = True

    def release(self, res: Reservation | None) -> None:
        """Drop a reservation; releasing twice is harmless."""
        if res is None:
            return
        with self._lock:
            self._entries.pop(res.id, None)

    def held_mb(self, device: str, *, exclude: Reservation | None = None) -> float:
        with self._lock:
            return sum(
                r.mb for r in self._entries.values() if r.device == device and r is not exclude
            )

    def entries(self) -> list[Reservation]:
        with self._lock:
            return list(self._entries.values())

    def budget(
        self, snapshot: MemorySnapshot, device: str, *, exclude: Reservation | None = None
    ) -> DeviceBudget:
        """The figures for ``device`` in this snapshot, less what the ledger holds.

        ``exclude`` leaves one reservation out, so a holder can ask what it may use itself.
        """
        held = self.held_mb(device, exclude=exclude)
        if device == CPU:
            return DeviceBudget(
                CPU, snapshot.ram_total_mb, snapshot.ram_available_mb, held, self.reserve_ram_mb
            )
        limit = self.limits.get(device, DeviceLimit())
        reserve = self.reserve_vram_mb if limit.reserve_vram_mb is None else limit.reserve_vram_mb
        gpu = snapshot.gpu(int(device.split(":")[1]))
        if gpu is None:
            return DeviceBudget(device, 0.0, 0.0, held, reserve)
        total, free = gpu.total_mb, gpu.free_mb
        if limit.vram_budget_mb is not None and limit.vram_budget_mb < total:
            # As memory.vram_budget_mb does in the probe: the card as if it had this much.
            free = max(0.0, min(free, limit.vram_budget_mb - (total - free)))
            total = limit.vram_budget_mb
        return DeviceBudget(device, total, free, held, reserve)
