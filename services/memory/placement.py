"""Placement: where work runs and how much memory it needs. The one place memory is decided.

Every consumer asks here, and nowhere else:

- **the device** work runs on (``cuda:<memory.device>`` when that GPU exists, else ``cpu``)
  and its budget (:class:`DeviceView`: one snapshot and the ledger's figures on it);
- **a load's start rung**: the first (GPU layers, context) pair of the ladder whose
  GGUF-header estimate, plus the per-worker overhead, fits what is usable now
  (:func:`start_rung`; the ModelManager walks down from there);
- **a heavy task's need** (:class:`TaskNeed`: VRAM on a GPU, RAM on the CPU), predicted
  per request from measured runs (``learning.py``) and reserved by the gate for the task's
  whole life;
- **what an LLM worker costs** beyond its GGUF estimate, learned per device from loads;
- **how memory is given back**: :func:`flush_gpu_memory` (gc, torch's cache) and
  :func:`wait_gpu_memory_released` (NVML, or the device's used figure in a container,
  shows a dead worker's memory back).

The gate (``gate.py``) acts on these figures; the swarm policy and ``/system/memory``
read the very same ones.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from services.errors import InsufficientMemory
from services.memory.devices import TaskOption, UnloadCost, choose_task_device
from services.memory.gguf_estimate import Estimate, GGUFInfo, estimate, ladder
from services.memory.learning import LearnedMemory, WorkerOverheadView
from services.memory.ledger import CPU, DeviceBudget, DeviceLimit, MemoryLedger, Reservation
from services.memory.probe import MemorySnapshot
from services.settings import LadderSettings, Settings

# Priors of what a worker costs beyond its GGUF estimate, until a load on the device is
# measured (LearnedMemory.worker_overhead_mb). RAM: a llama_cpp.server process with a
# tiny model measured 80 MB RSS here. VRAM: memory.worker_overhead_prior_mb (a CUDA
# context and runtime: 522 MB measured per worker on an H100, docs/gpu-validation.md).
WORKER_RAM_MB = 80.0


DEFAULT_BACKEND = "llama-cpp-python"


def overhead_key(device: str, backend: str) -> str:
    """Where a backend's learned worker overhead on a device is kept: the device alone for
    llama-cpp-python (as state files before the llama-server backend have it)."""
    return device if backend == DEFAULT_BACKEND else f"{device}|{backend}"


def configured_gpus(settings: Settings, snapshot: MemorySnapshot) -> list[int]:
    """The GPU indices Edison places work on that this snapshot sees, in order."""
    mem = settings.memory
    if mem.devices == "auto":
        return [g.index for g in snapshot.gpus]
    wanted = mem.devices if mem.devices is not None else [mem.device]
    return [i for i in wanted if snapshot.gpu(i) is not None]


def device_limits(settings: Settings) -> dict[str, DeviceLimit]:
    """``memory.per_device`` as the ledger reads it."""
    return {
        f"cuda:{i}": DeviceLimit(lim.reserve_vram_mb, lim.vram_budget_mb)
        for i, lim in settings.memory.per_device.items()
    }


def ledger_for(settings: Settings) -> MemoryLedger:
    """The app's ledger: the reserves and per-device limits of ``settings.memory``."""
    mem = settings.memory
    return MemoryLedger(
        reserve_vram_mb=mem.reserve_vram_mb,
        reserve_ram_mb=mem.reserve_ram_mb,
        limits=device_limits(settings),
    )


@dataclass(frozen=True)
class DeviceView:
    """One snapshot and the ledger's budget on the work device: what a decision sees."""

    snapshot: MemorySnapshot
    budget: DeviceBudget

    @property
    def device(self) -> str:
        return self.budget.device


class Placement:
    """One per app: reads memory for every decision (gate, loads, swarm, /system/memory)."""

    def __init__(
        self,
        settings: Settings,
        probe: Any,
        ledger: MemoryLedger,
        *,
        learned: LearnedMemory | None = None,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.ledger = ledger
        mem = settings.memory
        self.learned = learned or LearnedMemory(
            mem.state_dir,
            learn_after=mem.learn_after,
            margin_factor=mem.margin_factor,
            overhead_prior_mb=mem.worker_overhead_prior_mb,
        )

        # Heavy tasks running or queued per device (the gate sets it): a tie-breaker of
        # load placement.
        self.heavy_tasks: Callable[[str], int] = lambda device: 0

    async def snapshot(self) -> MemorySnapshot:
        """One probe, in a thread (NVML or nvidia-smi may block)."""
        return await anyio.to_thread.run_sync(self.probe.snapshot)

    async def view(
        self, *, exclude: Reservation | None = None, device: str | None = None
    ) -> DeviceView:
        """Probe and budget ``device`` (default: the first device Edison places on).

        ``exclude`` leaves one reservation out, so its holder sees what it may use.
        """
        return self.view_of(await self.snapshot(), exclude=exclude, device=device)

    def view_of(
        self,
        snap: MemorySnapshot,
        *,
        exclude: Reservation | None = None,
        device: str | None = None,
    ) -> DeviceView:
        device = device or self.devices(snap)[0]
        return DeviceView(snap, self.ledger.budget(snap, device, exclude=exclude))

    def views_of(self, snap: MemorySnapshot) -> list[DeviceView]:
        """Every device Edison places on, budgeted from one snapshot."""
        return [DeviceView(snap, self.ledger.budget(snap, d)) for d in self.devices(snap)]

    def devices(self, snap: MemorySnapshot) -> list[str]:
        """The devices work may go to: the configured GPUs this snapshot sees, else the CPU."""
        return [f"cuda:{i}" for i in configured_gpus(self.settings, snap)] or [CPU]

    def allowed(self, snap: MemorySnapshot, pinned: int | str) -> list[str]:
        """The devices a tier or pipeline pinned to ``pinned`` (an index or ``auto``) may
        use: that GPU when the snapshot sees it, else every device (a config written for
        another host still runs)."""
        every = self.devices(snap)
        if isinstance(pinned, int) and snap.gpu(pinned) is not None:
            return [f"cuda:{pinned}"]
        return every

    def worker_overhead_mb(self, device: str, backend: str = DEFAULT_BACKEND) -> float:
        """What an LLM worker of ``backend`` needs on ``device`` beyond its GGUF estimate:
        learned from measured loads, else the prior (the worker process on the CPU, a CUDA
        context and runtime on a GPU)."""
        return self.worker_overhead(device, backend).mb

    def worker_overhead(self, device: str, backend: str = DEFAULT_BACKEND) -> WorkerOverheadView:
        key = overhead_key(device, backend)
        samples = self.learned.overhead_samples(key)
        if samples:
            mb = self.learned.worker_overhead_mb(key)
            return WorkerOverheadView(device, round(mb, 1), samples, "learned", backend)
        prior = WORKER_RAM_MB if device == CPU else self.settings.memory.worker_overhead_prior_mb
        return WorkerOverheadView(device, prior, 0, "prior", backend)

    async def place_task(
        self,
        pinned: int | str,
        need_of: Callable[[str], TaskNeed],
        *,
        queued: Callable[[str], int],
        pipeline_loaded: Callable[[str], bool],
        cost: Callable[[str], UnloadCost],
    ) -> TaskPlacement:
        """The device a heavy task goes to (``devices.choose_task_device``), on one
        snapshot: ``queued`` (tasks in each device's line), ``pipeline_loaded`` and
        ``cost`` (what unloading there would take) come from the gate."""
        snap = await self.snapshot()
        devices = self.allowed(snap, pinned)
        if len(devices) == 1:
            return TaskPlacement(devices[0], "the only device", snap)
        options = []
        for d in devices:
            budget = self.view_of(snap, device=d).budget
            options.append(
                TaskOption(
                    d,
                    need_of(d).mb,
                    budget.usable_mb,
                    ceiling_mb(budget),
                    queued(d),
                    pipeline_loaded(d),
                    cost(d),
                )
            )
        choice = choose_task_device(options)
        return TaskPlacement(choice.option.device, choice.because, snap)


# ---- heavy tasks ------------------------------------------------------------------


@dataclass(frozen=True)
class TaskPlacement:
    """Where a heavy task goes, why, and the snapshot that was decided on."""

    device: str
    because: str
    snapshot: MemorySnapshot


def ceiling_mb(budget: DeviceBudget) -> float:
    """The most that could be usable on the device if Edison unloaded everything it holds
    in the ledger: what other programs use (the driver's used memory beyond the ledger)
    stays, and so does the reserve."""
    others = max(0.0, budget.capacity_mb - budget.driver_free_mb - budget.held_mb)
    return max(0.0, budget.capacity_mb - others - budget.reserve_mb)


@dataclass(frozen=True)
class TaskNeed:
    """What one heavy task needs on its device, in MB (VRAM on a GPU, RAM on the CPU)."""

    device: str
    mb: float
    source: str = "given"  # given (a caller's figure) | prior (configured) | learned
    detail: str = ""  # what the figure is of, for logs: "1 x 512x512 image"

    @property
    def memory(self) -> str:
        return "RAM" if self.device == CPU else "VRAM"


def task_need(device: str, required_vram_mb: float, required_ram_mb: float | None) -> TaskNeed:
    """A given need on ``device``: its VRAM figure on a GPU, its RAM figure on the CPU
    (the VRAM figure when no RAM figure is given)."""
    if device == CPU:
        return TaskNeed(device, required_vram_mb if required_ram_mb is None else required_ram_mb)
    return TaskNeed(device, required_vram_mb)


# ---- model loads ------------------------------------------------------------------


def estimate_on(est: Estimate, device: str) -> float:
    """The GGUF estimate of a load on ``device``, without the worker's overhead: all of
    it in RAM on the CPU, the VRAM part on a GPU."""
    return est.ram_mb + est.vram_mb if device == CPU else est.vram_mb


def load_need_mb(est: Estimate, device: str, overhead_mb: float) -> float:
    """What a load at this rung takes from ``device``'s budget, the worker's overhead
    included (on a GPU only when a layer is offloaded: a worker without one is hidden
    from the GPU and holds nothing there)."""
    if device != CPU and not est.n_gpu_layers:
        return 0.0
    return estimate_on(est, device) + overhead_mb


def load_ram_need_mb(est: Estimate, device: str, *, extra_mb: float = 0.0) -> float:
    """What a load on a GPU host takes from RAM, booked on the ledger's ``cpu`` device
    beside its VRAM: the weights, KV and compute buffer left on the CPU (all of them on a
    CPU rung), the worker process, and ``extra_mb`` (llama-server's prompt cache; a
    vision projector on a CPU rung). On a CPU host a load's need (:func:`load_need_mb`)
    already is RAM: 0 here, so nothing is booked twice."""
    if device == CPU:
        return 0.0
    return est.ram_mb + WORKER_RAM_MB + extra_mb


def load_rungs(
    n_gpu_layers: int, n_ctx: int, lad: LadderSettings, info: GGUFInfo, device: str
) -> list[tuple[int, int]]:
    """The (GPU layers, context) rungs a load may try on ``device``, in order."""
    rungs = ladder(n_gpu_layers, n_ctx, lad.gpu_layers, lad.context, info.n_layer, info.n_ctx_train)
    if device == CPU:
        # Without a GPU only the context matters: every layer count is the same load.
        contexts = dict.fromkeys(ctx for _, ctx in rungs)
        rungs = [(0, c) for c in contexts]
    return rungs


@dataclass(frozen=True)
class StartRung:
    """Where a load starts on the ladder, and why."""

    index: int
    need_mb: float  # what that rung is estimated to take, overheads included
    usable_mb: float
    fits: bool  # False: nothing fits on the GPU; the first CPU rung (needs no VRAM) is next


def start_rung(
    info: GGUFInfo,
    rungs: Sequence[tuple[int, int]],
    usable_mb: float,
    device: str,
    *,
    overhead_mb: float,
    what: str = "the model",
    **estimate_kw: Any,
) -> StartRung:
    """The first rung whose need (estimate + overhead) fits ``usable_mb`` on ``device``.

    When none fits on a GPU: the first CPU rung (0 GPU layers), or the last rung if there
    is none. When none fits on the CPU: InsufficientMemory naming the smallest need.
    ``estimate_kw`` goes to :func:`estimate` (kv_bytes_per_elem, n_batch).
    """
    if not rungs:
        raise ValueError("no rungs to choose from")
    needs = [
        load_need_mb(estimate(info, n, c, **estimate_kw), device, overhead_mb) for n, c in rungs
    ]
    for i, need in enumerate(needs):
        if need <= usable_mb:
            return StartRung(i, need, usable_mb, True)
    if device == CPU:
        raise InsufficientMemory(
            f"Not enough RAM to load {what}: needs {needs[-1]:.0f} MB, {usable_mb:.0f} MB usable",
            device=CPU,
            required_mb=round(needs[-1]),
            free_mb=round(usable_mb),
            tier=what,
        )
    i = next((i for i, (n, _) in enumerate(rungs) if n == 0), len(rungs) - 1)
    return StartRung(i, needs[i], usable_mb, False)


# ---- giving memory back -----------------------------------------------------------


def flush_gpu_memory(collect: bool = True) -> None:
    """The seed's _flush_gpu_memory: gc, then torch's cache where CUDA is in use.

    torch.cuda.empty_cache() frees only torch's own cache (pipelines); llama.cpp memory
    is given back by ending its worker process. ``collect=False`` skips the full gc: with
    torch and diffusers imported it costs about 0.24 s of held GIL (docs/benchmarks.md),
    worth paying only when objects were just dropped (an unloaded pipeline, an OOM).
    Blocking: call it from a thread in async code.
    """
    if collect:
        gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class DeviceDrop:
    """How a release shows on a device when NVML does not list the worker's pid (a
    container): the device's used figure before the worker ended, and what it held."""

    index: int  # the GPU's index
    used_before_mb: float
    held_mb: float

    def seen(self, used_mb: float) -> bool:
        """True once the used figure fell by half of what the worker held or more: a
        process's memory goes back at once when its context ends, so half is "it
        happened", with room for other programs moving meanwhile."""
        return used_mb <= self.used_before_mb - 0.5 * self.held_mb


async def wait_gpu_memory_released(
    probe: Any,
    pid: int,
    timeout_s: float = 5.0,
    poll_s: float = 0.25,
    *,
    drop: DeviceDrop | None = None,
) -> bool | None:
    """Poll until ``pid``'s GPU memory is back: True once seen, False if not seen after
    timeout_s, None at once when nothing can show it (no NVML and no ``drop``).

    With ``drop`` (the load settled from the device's figure, not NVML's per-process
    one) the device's used figure is polled instead: in a container NVML never lists our
    pid, so "pid absent" would say "released" before anything was released.
    ``probe`` is a MemoryProbe; its calls may block, so they run in a thread.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if drop is not None:
            snap = await anyio.to_thread.run_sync(probe.snapshot)
            gpu = snap.gpu(drop.index)
            if gpu is None or snap.vram_source == "none":
                return None
            if drop.seen(gpu.used_mb):
                return True
        else:
            used = await anyio.to_thread.run_sync(probe.process_vram_mb, [pid])
            if used is None:
                return None
            if used.get(pid, 0.0) <= 0:
                return True
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(poll_s)
