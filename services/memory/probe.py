"""Memory snapshot: RAM from psutil, VRAM per GPU by the ladder NVML -> torch.cuda -> nvidia-smi.

No GPU is a normal state (``vram_source == "none"``), never an error. Each step is
bounded in time; the step that answered is tried first next time, and why each
earlier step failed is kept for ``edison doctor``.

Blocking: every method here may block (a hung driver, a slow nvidia-smi). Async code
calls them through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psutil

MB = 1024 * 1024
STEPS = ("nvml", "torch", "nvidia-smi")
SMI_QUERY = [
    "--query-gpu=index,name,memory.total,memory.used,memory.free",
    "--format=csv,noheader,nounits",
]
T = TypeVar("T")


class ProbeStepFailed(Exception):
    """One rung of the probe ladder could not answer; the message says why."""


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    total_mb: float
    used_mb: float
    free_mb: float
    budget_mb: float | None = None


@dataclass(frozen=True)
class MemorySnapshot:
    ram_total_mb: float
    ram_available_mb: float
    ram_used_mb: float
    gpus: tuple[GpuMemory, ...]
    vram_source: str
    timestamp: float
    probe_ms: float = 0.0

    def gpu(self, index: int) -> GpuMemory | None:
        """The GPU with this index, or None when it is absent."""
        return next((g for g in self.gpus if g.index == index), None)


@dataclass
class StepReport:
    """What one step of the ladder did the last time it ran."""

    ok: bool | None = None  # None: not tried
    reason: str = ""
    ms: float = 0.0


@dataclass
class ProbeReport:
    answered: str
    steps: dict[str, StepReport] = field(default_factory=dict)


def _bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run fn in a daemon thread and give up after timeout_s (the thread is left behind)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            box["error"] = exc

    t = threading.Thread(target=target, name=f"probe-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ProbeStepFailed(f"{what} did not answer within {timeout_s:g} s")
    if "error" in box:
        err = box["error"]
        if isinstance(err, ProbeStepFailed):
            raise err
        raise ProbeStepFailed(f"{type(err).__name__}: {err}") from err
    return box["value"]


def _apply_budget(gpus: Iterable[GpuMemory], budget_mb: float | None) -> tuple[GpuMemory, ...]:
    """Treat each card as if it had budget_mb: total capped, free never above budget - used."""
    if budget_mb is None:
        return tuple(gpus)
    out = []
    for g in gpus:
        total = min(g.total_mb, budget_mb)
        free = max(0.0, min(g.free_mb, total - g.used_mb))
        out.append(GpuMemory(g.index, g.name, total, g.used_mb, free, budget_mb))
    return tuple(out)


def parse_nvidia_smi(text: str) -> list[GpuMemory]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,memory.used,memory.free` CSV."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            raise ProbeStepFailed(f"nvidia-smi printed an unexpected line: {line[:80]!r}")
        try:
            index, total, used, free = int(parts[0]), *(float(p) for p in parts[2:])
        except ValueError as exc:
            raise ProbeStepFailed(f"nvidia-smi printed an unexpected line: {line[:80]!r}") from exc
        if min(total, used, free) < 0 or total <= 0:
            raise ProbeStepFailed(f"nvidia-smi printed impossible figures: {line[:80]!r}")
        gpus.append(GpuMemory(index, parts[1], total, used, free))
    if not gpus:
        raise ProbeStepFailed("nvidia-smi printed no GPU")
    return gpus


class MemoryProbe:
    """Takes memory snapshots. One per app; thread-safe."""

    def __init__(self, *, timeout_s: float = 2.0, vram_budget_mb: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.vram_budget_mb = vram_budget_mb
        # Why: the ladder state (which step answered, NVML handle) is shared by the
        # threads that probe concurrently; the lock keeps one consistent view of it.
        self._lock = threading.Lock()
        self._nvml: Any = None  # the pynvml module once nvmlInit succeeded
        self._nvml_error: str | None = None
        self._torch_error: str | None = None
        self._preferred: str | None = None
        self.report = ProbeReport(answered="none", steps={s: StepReport() for s in STEPS})

    # ---- ladder steps -------------------------------------------------------------
    def _nvml_module(self) -> Any:
        """pynvml, initialised once; a failed init is remembered and not retried."""
        with self._lock:
            if self._nvml is not None:
                return self._nvml
            if self._nvml_error is not None:
                raise ProbeStepFailed(self._nvml_error)
            try:
                import pynvml

                _bounded(pynvml.nvmlInit, self.timeout_s, "nvmlInit")
            except ImportError as exc:
                self._nvml_error = f"pynvml not installed ({exc})"
            except ProbeStepFailed as exc:
                self._nvml_error = str(exc)
            if self._nvml_error is not None:
                raise ProbeStepFailed(self._nvml_error)
            self._nvml = pynvml
            return pynvml

    def _probe_nvml(self) -> list[GpuMemory]:
        nv = self._nvml_module()

        def query() -> list[GpuMemory]:
            gpus = []
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                name = nv.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else name
                gpus.append(GpuMemory(i, name, mem.total / MB, mem.used / MB, mem.free / MB))
            return gpus

        return _bounded(query, self.timeout_s, "NVML")

    def _probe_torch(self) -> list[GpuMemory]:
        if self._torch_error is not None:
            raise ProbeStepFailed(self._torch_error)
        try:
            # Not bounded: a slow first import (seconds) is not a hung driver.
            import torch
        except ImportError as exc:
            self._torch_error = f"torch not installed ({exc})"
            raise ProbeStepFailed(self._torch_error) from exc

        def query() -> list[GpuMemory]:
            if not torch.cuda.is_available():
                # Why remembered: CUDA does not appear later in a running process.
                self._torch_error = f"torch {torch.__version__} sees no CUDA device"
                raise ProbeStepFailed(self._torch_error)
            gpus = []
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                name = torch.cuda.get_device_name(i)
                gpus.append(GpuMemory(i, name, total / MB, (total - free) / MB, free / MB))
            return gpus

        return _bounded(query, self.timeout_s, "torch.cuda")

    def _probe_smi(self) -> list[GpuMemory]:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            raise ProbeStepFailed("nvidia-smi not found on PATH")
        try:
            out = subprocess.run(
                [exe, *SMI_QUERY],
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ProbeStepFailed(f"nvidia-smi did not answer within {self.timeout_s:g} s") from exc
        except OSError as exc:
            raise ProbeStepFailed(f"nvidia-smi could not run: {exc}") from exc
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [""]
            raise ProbeStepFailed(f"nvidia-smi exited with status {out.returncode}: {tail[0]}")
        return parse_nvidia_smi(out.stdout)

    # ---- public API ---------------------------------------------------------------
    def probe_vram(self) -> tuple[str, list[GpuMemory]]:
        """Walk the ladder, preferred step first; ("none", []) when no step answers."""
        steps = {
            "nvml": self._probe_nvml,
            "torch": self._probe_torch,
            "nvidia-smi": self._probe_smi,
        }
        order = list(STEPS)
        if self._preferred in order:
            order.remove(self._preferred)
            order.insert(0, self._preferred)
        reports = {s: StepReport() for s in STEPS}
        for name in order:
            t0 = time.perf_counter()
            try:
                gpus = steps[name]()
            except ProbeStepFailed as exc:
                reports[name] = StepReport(False, str(exc), (time.perf_counter() - t0) * 1000)
                continue
            reports[name] = StepReport(
                True, f"{len(gpus)} GPU(s)", (time.perf_counter() - t0) * 1000
            )
            self._preferred = name
            self.report = ProbeReport(answered=name, steps=reports)
            return name, gpus
        self._preferred = None
        self.report = ProbeReport(answered="none", steps=reports)
        return "none", []

    def snapshot(self) -> MemorySnapshot:
        """RAM and VRAM now. Blocking: call from a thread in async code."""
        t0 = time.perf_counter()
        vm = psutil.virtual_memory()
        source, gpus = self.probe_vram()
        return MemorySnapshot(
            ram_total_mb=vm.total / MB,
            ram_available_mb=vm.available / MB,
            ram_used_mb=(vm.total - vm.available) / MB,
            gpus=_apply_budget(gpus, self.vram_budget_mb),
            vram_source=source,
            timestamp=time.time(),
            probe_ms=(time.perf_counter() - t0) * 1000,
        )

    def process_vram_mb(self, pids: Iterable[int]) -> dict[int, float] | None:
        """GPU memory held by each of these processes (and their children), from NVML.

        None when NVML is not available: per-process figures exist nowhere else.
        A pid holding no GPU memory maps to 0.
        """
        try:
            nv = self._nvml_module()
        except ProbeStepFailed:
            return None
        wanted = {}
        for pid in pids:
            wanted[pid] = pid
            try:
                for child in psutil.Process(pid).children(recursive=True):
                    wanted[child.pid] = pid
            except psutil.Error:
                pass

        def query() -> dict[int, float]:
            used = dict.fromkeys(set(wanted.values()), 0.0)
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    owner = wanted.get(p.pid)
                    if owner is not None and p.usedGpuMemory is not None:
                        used[owner] += p.usedGpuMemory / MB
            return used

        try:
            return _bounded(query, self.timeout_s, "NVML processes")
        except ProbeStepFailed:
            return None

    def shutdown(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass
                self._nvml = None


def rss_mb(pid: int | None = None) -> float | None:
    """Resident memory of a process and its children, in MB; None if it is gone."""
    try:
        p = psutil.Process(pid or os.getpid())
        procs = [p, *p.children(recursive=True)]
        return sum(q.memory_info().rss for q in procs) / MB
    except psutil.Error:
        return None
