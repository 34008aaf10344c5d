"""Memory snapshot: RAM from psutil, VRAM per GPU by the ladder NVML -> torch.cuda -> nvidia-smi.

No GPU is a normal state (``vram_source == "none"``), never an error. Each step is
bounded in time; the step that answered is tried first next time, and why each
earlier step failed is kept for ``edison doctor``.

A step that times out or fails is backed off: snapshots skip it (``backoff_s``, doubled
at each new failure up to ``backoff_max_s``) while a daemon thread retries it. A failure
that cannot heal in a running process (no NVML, no CUDA device) is remembered for good
instead (``ProbeStepUnavailable``) and never retried. NVML's per-process query
(:meth:`MemoryProbe.process_vram_mb`) is backed off the same way, without a retrier:
the next call after the back-off tries again.

Every call into a driver (nvmlInit, NVML, torch.cuda) runs through one
:class:`ProbeCalls` per probe: a thread per call with a time limit, at most
``MAX_PROBE_THREADS`` at once. A call that hangs keeps its thread (nothing can stop it)
and its slot, so hung calls leave at most that many threads behind, not one per call.

Blocking: every method here may block (a hung driver, a slow nvidia-smi). Async code
calls them through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

import psutil

from services.memory.snapshot import (
    MB,
    GpuMemory,
    MemorySnapshot,
    ProbeReport,
    ProbeStepFailed,
    ProbeStepUnavailable,
    StepReport,
    _apply_budget,
    _StepState,
    parse_nvidia_smi,
    rss_mb,
)

__all__ = [
    "GpuMemory",
    "MemoryProbe",
    "MemorySnapshot",
    "ProbeReport",
    "ProbeStepFailed",
    "ProbeStepUnavailable",
    "StepReport",
    "_apply_budget",
    "parse_nvidia_smi",
    "rss_mb",
]

log = logging.getLogger("edison.memory")

STEPS = ("nvml", "torch", "nvidia-smi")
MAX_PROBE_THREADS = 4
T = TypeVar("T")


class ProbeCalls:
    """The probe's bounded executor: each call in a daemon thread, given up after a time
    limit, at most ``max_threads`` calls in flight.

    Why not a thread pool: a hung driver call can never be stopped, and a pool's worker
    threads are joined at interpreter exit (a hung one would keep Edison from exiting).
    Why bounded: without it, every call into a hung driver left one more thread behind.
    A call that finds every slot taken waits for one up to its own time limit, then fails.
    """

    def __init__(self, max_threads: int = MAX_PROBE_THREADS) -> None:
        self.max_threads = max_threads
        # Why: a slot is held from a call's start until its thread ends (not until its
        # caller gives up), so a hung call keeps its slot and the total stays bounded.
        self._slots = threading.BoundedSemaphore(max_threads)
        self._lock = threading.Lock()
        self.running = 0  # threads of calls not ended yet (hung ones included)

    def call(self, fn: Callable[[], T], timeout_s: float, what: str) -> T:
        """``fn()`` in a thread; ProbeStepFailed if it raises or does not answer in time."""
        if not self._slots.acquire(timeout=timeout_s):
            raise ProbeStepFailed(
                f"{what}: no probe thread free within {timeout_s:g} s "
                f"({self.max_threads} earlier calls still running)"
            )
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                box["error"] = exc
            finally:
                with self._lock:
                    self.running -= 1
                self._slots.release()

        with self._lock:
            self.running += 1
        t = threading.Thread(target=target, name=f"probe-{what}", daemon=True)
        try:
            t.start()
        except BaseException:
            with self._lock:
                self.running -= 1
            self._slots.release()
            raise
        t.join(timeout_s)
        if t.is_alive():
            raise ProbeStepFailed(f"{what} did not answer within {timeout_s:g} s")
        if "error" in box:
            err = box["error"]
            if isinstance(err, ProbeStepFailed):
                raise err
            raise ProbeStepFailed(f"{type(err).__name__}: {err}") from err
        return box["value"]


SMI_QUERY = [
    "--query-gpu=index,name,memory.total,memory.used,memory.free",
    "--format=csv,noheader,nounits",
]


class MemoryProbe:
    """Takes memory snapshots. One per app; thread-safe."""

    def __init__(
        self,
        *,
        timeout_s: float = 2.0,
        vram_budget_mb: float | None = None,
        backoff_s: float = 5.0,
        backoff_max_s: float = 300.0,
    ) -> None:
        self.timeout_s = timeout_s
        self.vram_budget_mb = vram_budget_mb
        self.backoff_s = backoff_s
        self.backoff_max_s = max(backoff_max_s, backoff_s)
        # Why: the NVML handle is shared by the threads that probe concurrently; the lock
        # is held across nvmlInit so that it runs once.
        self._lock = threading.Lock()
        self._nvml: Any = None  # the pynvml module once nvmlInit succeeded
        self._nvml_error: str | None = None
        self._torch_error: str | None = None
        # Why a second lock: the ladder's state (which step answered, each step's
        # back-off, the report) is read by every snapshot, and is never held across a
        # step, so a snapshot that finds a step backed off never waits on a hung one.
        self._state_lock = threading.Lock()
        self._preferred: str | None = None
        self._state = {s: _StepState() for s in STEPS}
        self._closed = False
        self._stop = threading.Event()
        self.calls = ProbeCalls()
        # The per-process query's back-off (read and written under _state_lock), and its
        # last outcome with the back-off fields (for logs and `edison doctor`).
        self._processes = _StepState()
        self.process_report = StepReport()
        self.report = ProbeReport(answered="none", steps={s: StepReport() for s in STEPS})

    # ---- ladder steps -------------------------------------------------------------
    def _nvml_module(self) -> Any:
        """pynvml, initialised once; a failed init is remembered and not retried."""
        with self._lock:
            if self._nvml is not None:
                return self._nvml
            if self._nvml_error is not None:
                raise ProbeStepUnavailable(self._nvml_error)
            try:
                import pynvml

                self.calls.call(pynvml.nvmlInit, self.timeout_s, "nvmlInit")
            except ImportError as exc:
                self._nvml_error = f"pynvml not installed ({exc})"
            except ProbeStepFailed as exc:
                self._nvml_error = str(exc)
            if self._nvml_error is not None:
                raise ProbeStepUnavailable(self._nvml_error)
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

        return self.calls.call(query, self.timeout_s, "NVML")

    def _probe_torch(self) -> list[GpuMemory]:
        if self._torch_error is not None:
            raise ProbeStepUnavailable(self._torch_error)
        try:
            # Not bounded: a slow first import (seconds) is not a hung driver.
            import torch
        except ImportError as exc:
            self._torch_error = f"torch not installed ({exc})"
            raise ProbeStepUnavailable(self._torch_error) from exc

        def query() -> list[GpuMemory]:
            if not torch.cuda.is_available():
                # Why remembered: CUDA does not appear later in a running process.
                self._torch_error = f"torch {torch.__version__} sees no CUDA device"
                raise ProbeStepUnavailable(self._torch_error)
            gpus = []
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                name = torch.cuda.get_device_name(i)
                gpus.append(GpuMemory(i, name, total / MB, (total - free) / MB, free / MB))
            return gpus

        return self.calls.call(query, self.timeout_s, "torch.cuda")

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

    def _run_step(self, name: str) -> list[GpuMemory]:
        method = {"nvml": "_probe_nvml", "torch": "_probe_torch", "nvidia-smi": "_probe_smi"}
        return getattr(self, method[name])()

    # ---- back-off -----------------------------------------------------------------
    def _failed(self, name: str, exc: ProbeStepFailed, *, retry: bool) -> None:
        """Record a failure: permanent, or back off (doubling) and make sure a retrier runs."""
        with self._state_lock:
            st = self._state[name]
            st.last_reason = str(exc)
            if isinstance(exc, ProbeStepUnavailable):
                st.clear()
                st.permanent = True
                return
            # After shutdown nothing retries, so nothing is skipped. A caller failing while
            # the step is backed off started before the back-off: not a new failure.
            if self._closed or (st.failures and not retry):
                return
            st.backoff_s = (
                self.backoff_s if st.failures == 0 else min(st.backoff_s * 2, self.backoff_max_s)
            )
            st.failures += 1
            st.due = time.monotonic() + st.backoff_s
            st.until = time.time() + st.backoff_s
            if not st.retrier:
                st.retrier = True
                threading.Thread(
                    target=self._retry_loop, args=(name,), name=f"probe-retry-{name}", daemon=True
                ).start()

    def _succeeded(self, name: str) -> None:
        with self._state_lock:
            st = self._state[name]
            st.clear()
            st.last_reason, st.permanent = "", False

    def _retry_loop(self, name: str) -> None:
        """The one background retrier of a backed-off step; ends when it answers again."""
        while True:
            with self._state_lock:
                st = self._state[name]
                if self._closed or st.failures == 0:
                    # Decided under the lock with retrier, so no back-off is left unowned.
                    st.clear()
                    st.retrier = False
                    return
                wait = st.due - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            t0 = time.perf_counter()
            try:
                gpus = self._run_step(name)
            except Exception as exc:  # noqa: BLE001 - this thread must outlive any failure
                err = exc if isinstance(exc, ProbeStepFailed) else ProbeStepFailed(repr(exc))
                self._failed(name, err, retry=True)
                done = StepReport(False, f"background retry: {err}")
            else:
                self._succeeded(name)
                done = StepReport(True, f"background retry: {len(gpus)} GPU(s)")
            done.ms = (time.perf_counter() - t0) * 1000
            with self._state_lock:
                if not self._closed:
                    steps = {**self.report.steps, name: self._with_state(done, name)}
                    self.report = ProbeReport(self.report.answered, steps)

    def _with_state(self, report: StepReport, name: str) -> StepReport:
        """The step's report with its back-off fields; call under _state_lock."""
        st = self._state[name]
        return replace(
            report,
            permanent=st.permanent,
            backed_off=st.failures > 0,
            backed_off_until=st.until,
            backoff_s=st.backoff_s,
            failures=st.failures,
            last_reason=st.last_reason,
        )

    # ---- public API ---------------------------------------------------------------
    def probe_vram(self) -> tuple[str, list[GpuMemory]]:
        """Walk the ladder, preferred step first, backed-off steps skipped; ("none", []) when
        no step answers."""
        with self._state_lock:
            order = list(STEPS)
            if self._preferred in order:
                order.remove(self._preferred)
                order.insert(0, self._preferred)
        reports = {s: StepReport() for s in STEPS}
        answered, gpus = "none", []
        for name in order:
            with self._state_lock:
                st = self._state[name]
                if st.failures:
                    reports[name] = StepReport(False, f"skipped while backed off: {st.last_reason}")
                    continue
            t0 = time.perf_counter()
            try:
                gpus = self._run_step(name)
            except ProbeStepFailed as exc:
                reports[name] = StepReport(False, str(exc), (time.perf_counter() - t0) * 1000)
                self._failed(name, exc, retry=False)
                continue
            reports[name] = StepReport(
                True, f"{len(gpus)} GPU(s)", (time.perf_counter() - t0) * 1000
            )
            self._succeeded(name)
            answered = name
            break
        with self._state_lock:
            self._preferred = None if answered == "none" else answered
            steps = {s: self._with_state(reports[s], s) for s in STEPS}
            self.report = ProbeReport(answered=answered, steps=steps)
        return answered, gpus

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

        A pid appears only when NVML lists it or one of its children: in a container
        without the host's PID namespace NVML lists none of ours, and an absent pid says
        "not seen", never "holds 0 MB". None when NVML is not available or the query is
        backed off after a failure: per-process figures exist nowhere else.
        """
        with self._state_lock:
            st = self._processes
            if st.failures and time.monotonic() < st.due:
                return None
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
            used: dict[int, float] = {}
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    owner = wanted.get(p.pid)
                    if owner is not None:
                        mb = (p.usedGpuMemory or 0) / MB  # None: not reported (some vGPUs)
                        used[owner] = used.get(owner, 0.0) + mb
            return used

        t0 = time.perf_counter()
        try:
            used = self.calls.call(query, self.timeout_s, "NVML processes")
        except ProbeStepFailed as exc:
            self._process_query_failed(exc, (time.perf_counter() - t0) * 1000)
            return None
        with self._state_lock:
            self._processes.clear()
            self._processes.last_reason = ""
            listed = f"{len(used)} of {len(set(wanted.values()))} pid(s) listed"
            self.process_report = StepReport(True, listed, (time.perf_counter() - t0) * 1000)
        return used

    def _process_query_failed(self, exc: ProbeStepFailed, ms: float) -> None:
        """Back the per-process query off (doubling, as the ladder's steps): calls return
        None at once until it is due again, so a hung NVML costs one time limit per
        back-off period, not one per call."""
        with self._state_lock:
            st = self._processes
            st.backoff_s = (
                self.backoff_s if st.failures == 0 else min(st.backoff_s * 2, self.backoff_max_s)
            )
            st.failures += 1
            st.due = time.monotonic() + st.backoff_s
            st.until = time.time() + st.backoff_s
            st.last_reason = str(exc)
            self.process_report = StepReport(
                False,
                str(exc),
                ms,
                backed_off=True,
                backed_off_until=st.until,
                backoff_s=st.backoff_s,
                failures=st.failures,
                last_reason=str(exc),
            )
        log.warning("NVML's per-process query failed (%s): skipped for %.0f s", exc, st.backoff_s)

    def shutdown(self) -> None:
        """Stop the background retries (later snapshots walk the whole ladder); release NVML."""
        with self._state_lock:
            self._closed = True
        self._stop.set()
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass
                self._nvml = None
