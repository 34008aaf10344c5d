"""Test helpers: waiting for a state, a real uvicorn server, a GPU that reports given numbers."""

from __future__ import annotations

import shutil
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import uvicorn

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Fails the test with ``what`` when ``timeout`` passes first. For states reached by
    real processes and threads, which offer no event to wait on.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:g} s: {what or predicate}")
        time.sleep(interval)


async def until(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 30.0,
    interval: float = 0.01,
    what: str = "",
) -> T:
    """:func:`wait_until` for async tests: sleeps on the event loop between polls."""
    try:
        with anyio.fail_after(timeout):
            while True:
                value = predicate()
                if isinstance(value, Awaitable):
                    value = await value
                if value:
                    return value  # type: ignore[return-value]
                await anyio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"not reached within {timeout:g} s: {what or predicate}") from None


def wait_ready(client: Any) -> None:
    """Poll a TestClient's /ready until start-up work (eager loads) is done."""
    wait_until(
        lambda: client.get("/ready").status_code == 200, timeout=60, what="the app became ready"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


class LiveServer:
    """A real uvicorn server on a loopback port, in a thread of the test process."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(
            lambda: self.server.started or not self.thread.is_alive(), what="uvicorn started"
        )
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _absent() -> list[Any]:
    from services.memory.probe import ProbeStepUnavailable

    raise ProbeStepUnavailable("not probed: this GPU reports given numbers")


class FakeGpuProbe:
    """A GPU that reports given numbers: the one thing that cannot exist on this machine.

    ``used_mb`` is what other programs and Edison's own allocations occupy; tests move it
    to play the driver. ``lag`` snapshots pass before a change of ``used_mb`` shows.
    RAM figures are this machine's real ones.
    """

    def __init__(
        self,
        total_mb: float = 12288,
        used_mb: float = 0,
        budget_mb: float | None = None,
        *,
        gpus: int = 1,
    ) -> None:
        from services.memory.probe import MemoryProbe

        self.total_mb = total_mb
        self.budget_mb = budget_mb
        self._used = [float(used_mb)] * gpus  # per GPU index
        self._pending: list[tuple[int, float, int]] = []
        self.calls = 0
        # RAM comes from the real probe; its GPU steps are marked absent (permanent), so it
        # starts no background retrier that could outlive the test and run another test's
        # fake nvidia-smi.
        self._real = MemoryProbe(timeout_s=5)
        for step in ("_probe_nvml", "_probe_torch", "_probe_smi"):
            setattr(self._real, step, _absent)

    @property
    def used_mb(self) -> float:
        return self._used[0]

    def used_on(self, index: int) -> float:
        return self._used[index]

    def set_used(self, used_mb: float, lag: int = 0, *, index: int = 0) -> None:
        if lag:
            self._pending.append((self.calls + lag, used_mb, index))
        else:
            self._used[index] = used_mb

    def snapshot(self):  # noqa: ANN201
        from services.memory.probe import GpuMemory, MemorySnapshot, _apply_budget

        self.calls += 1
        for due, value, index in list(self._pending):
            if self.calls >= due:
                self._used[index] = value
                self._pending.remove((due, value, index))
        gpus = [
            GpuMemory(i, f"Fake {self.total_mb:.0f}MB", self.total_mb, u, self.total_mb - u)
            for i, u in enumerate(self._used)
        ]
        ram = self._real.snapshot()
        gpus = _apply_budget(gpus, self.budget_mb)
        return MemorySnapshot(
            ram.ram_total_mb, ram.ram_available_mb, ram.ram_used_mb, gpus, "fake", time.time()
        )

    @property
    def report(self):  # noqa: ANN201 - the real probe's report: RAM is this machine's
        return self._real.report

    def process_vram_mb(self, pids):  # noqa: ANN001, ANN201
        return None

    def shutdown(self) -> None:
        self._real.shutdown()


def placement_for(settings: Any, probe: Any, *, reserve_vram_mb: float = 1024) -> Any:
    """A Placement over ``probe`` with a fresh ledger (reserve RAM from the settings)."""
    from services.memory.ledger import MemoryLedger
    from services.memory.placement import Placement, device_limits

    ledger = MemoryLedger(
        reserve_vram_mb=reserve_vram_mb,
        reserve_ram_mb=settings.memory.reserve_ram_mb,
        limits=device_limits(settings),
    )
    return Placement(settings, probe, ledger)


NO_GPU_HERE = shutil.which("nvidia-smi") is None and not Path("/dev/nvidiactl").exists()


def fake_smi(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def cuda_oom_first(monkeypatch: Any, cls: type, times: int = 1) -> dict[str, int]:
    """Make ``cls.__call__`` (a diffusers pipeline class) raise torch's CUDA out-of-memory
    error on its first ``times`` calls, as a full card would (this CPU machine cannot run
    out of GPU memory); later calls run the real pipeline. Returns the call counter."""
    import functools

    import torch

    original = cls.__call__
    calls = {"n": 0}

    @functools.wraps(original)  # keeps the signature the host filters arguments by
    def oom_first(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] <= times:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", oom_first)
    return calls


def without_nvml(monkeypatch: Any) -> None:
    """A pynvml whose nvmlInit fails as it does where the NVIDIA library is missing."""
    import sys
    import types

    broken = types.ModuleType("pynvml")

    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
