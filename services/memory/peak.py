"""Measuring what one pipeline call really took: its peak working memory.

On CUDA: torch's allocator peak on the device (``reset_peak_memory_stats`` before the
call, ``max_memory_allocated`` after). On the CPU: the process's resident set. Linux
keeps a high-water mark of it (``VmHWM``) that writing ``5`` to ``/proc/self/clear_refs``
resets, so no short peak is missed; where that is not allowed, a thread samples
``VmRSS`` every few milliseconds instead. Free heap pages are handed back to the
system first (``malloc_trim``) so that the baseline is what is really live, and glibc's
mmap threshold is fixed at 1 MiB (``mallopt``) the first time: otherwise it grows as
blocks are freed, large tensors then come from per-thread heaps that fragment, and the
resident peak of the same request wandered between 38 and 148 MB where live memory was
22-48 MB (measured on the tiny image pipeline, 128-224 px).

A run can leave memory allocated for good (lazy initialisation on a pipeline's first
call): that part is ``persisted_mb`` and belongs to the pipeline's resident figure; the
rest of the peak above the baseline is ``working_mb``, what the request itself needed.

Blocking, and meant for the thread that runs the pipeline.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024
SAMPLE_S = 0.002
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class PeakReading:
    """One call's memory on its device, in MB."""

    working_mb: float  # peak above the baseline, less what stayed allocated
    persisted_mb: float  # what the call left allocated (grows the resident figure)
    baseline_mb: float  # allocated (CUDA) or resident (CPU) just before the call
    peak_mb: float  # the absolute peak during the call
    method: str  # cuda-allocator | rss-hwm | rss-sampled

    @property
    def sane(self) -> bool:
        """False for figures no run can produce (NaN, negative, a peak below the baseline)."""
        figures = (self.working_mb, self.persisted_mb, self.baseline_mb, self.peak_mb)
        return all(math.isfinite(x) and x >= 0 for x in figures) and (
            self.peak_mb >= self.baseline_mb
        )


class _Box:
    reading: PeakReading | None = None


def _status_mb(key: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


M_MMAP_THRESHOLD = -3
_allocator_ready = False


def _prepare_allocator() -> None:
    """Once per process: blocks of 1 MiB and more are mapped, so freeing one gives its
    pages back at once and the resident set follows what is live."""
    global _allocator_ready
    if not _allocator_ready and _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    _allocator_ready = True


def _trim() -> None:
    """Give free heap pages back to the system, so the resident set is what is live."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _reading(base: float, peak: float, after: float, method: str) -> PeakReading:
    persisted = max(0.0, after - base)
    working = max(0.0, peak - base - persisted) if peak >= base else float("nan")
    return PeakReading(working, persisted, base, peak, method)


@contextlib.contextmanager
def measure_cpu() -> Iterator[_Box]:
    """Measure the process's resident peak around the block (Linux)."""
    box = _Box()
    _prepare_allocator()
    _trim()
    base = _status_mb("VmRSS") or 0.0
    if _reset_hwm():
        yield box
        peak = _status_mb("VmHWM") or 0.0
        _trim()
        box.reading = _reading(base, peak, _status_mb("VmRSS") or 0.0, "rss-hwm")
        return
    highest = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            rss = _status_mb("VmRSS")
            if rss is not None and rss > highest[0]:
                highest[0] = rss

    sampler = threading.Thread(target=sample, name="edison-peak-sampler", daemon=True)
    sampler.start()
    try:
        yield box
    finally:
        stop.set()
        sampler.join()
    _trim()
    after = _status_mb("VmRSS") or 0.0
    box.reading = _reading(base, max(highest[0], after), after, "rss-sampled")


@contextlib.contextmanager
def measure_cuda(device: str) -> Iterator[_Box]:
    """Measure torch's allocator peak on ``device`` around the block."""
    import torch

    box = _Box()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) / MB
    yield box
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / MB
    after = torch.cuda.memory_allocated(device) / MB
    box.reading = _reading(base, peak, after, "cuda-allocator")


def measure(device: str) -> contextlib.AbstractContextManager[_Box]:
    """The meter for ``device``: ``with measure(dev) as m: ...; m.reading``."""
    return measure_cuda(device) if device.startswith("cuda") else measure_cpu()
