"""Shared fixtures: tiny models generated once, settings builders, a real uvicorn server."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from services.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tier GGUF files (fast, medium, deep, reasoning), written once per run."""
    from services.demo_assets import DEMO_TIERS
    from services.tiny_gguf import write_tiny_gguf

    out = tmp_path_factory.mktemp("tiny")
    for i, (tier, shape) in enumerate(DEMO_TIERS.items()):
        write_tiny_gguf(out / f"{tier}.gguf", shape, seed=i)
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a test: no models unless given, outputs in tmp_path."""

    def build(**sections: Any) -> Settings:
        data = deep_merge(
            {
                "server": {"outputs_dir": str(tmp_path / "outputs"), "log_level": "debug"},
                "memory": {"reserve_ram_mb": 0},
            },
            sections,
        )
        return Settings(**data)

    return build


def wait_ready(client: Any) -> None:
    """Poll a TestClient's /ready until start-up work (eager loads) is done."""
    for _ in range(1200):
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the app never became ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a loopback port, in a thread of the test process."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def live_server() -> Iterator[Callable[[Any], LiveServer]]:
    servers: list[LiveServer] = []

    def start(app: Any) -> LiveServer:
        s = LiveServer(app).__enter__()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.__exit__()


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight image, video and music pipelines, built once per run."""
    from services.tiny_pipelines import write_tiny_pipeline

    out = tmp_path_factory.mktemp("pipelines")
    return {kind: write_tiny_pipeline(kind, out / kind) for kind in ("image", "video", "music")}


class FakeGpuProbe:
    """A GPU that reports given numbers: the one thing that cannot exist on this machine.

    ``used_mb`` is what other programs and Edison's own allocations occupy; tests move it
    to play the driver. ``lag`` snapshots pass before a change of ``used_mb`` shows.
    """

    def __init__(
        self, total_mb: float = 12288, used_mb: float = 0, budget_mb: float | None = None
    ) -> None:
        from services.memory_probe import MemoryProbe

        self.total_mb = total_mb
        self.budget_mb = budget_mb
        self._used = used_mb
        self._pending: list[tuple[int, float]] = []
        self.calls = 0
        self._real = MemoryProbe(timeout_s=5)

    @property
    def used_mb(self) -> float:
        return self._used

    def set_used(self, used_mb: float, lag: int = 0) -> None:
        if lag:
            self._pending.append((self.calls + lag, used_mb))
        else:
            self._used = used_mb

    def snapshot(self):  # noqa: ANN201
        from services.memory_probe import GpuMemory, MemorySnapshot, _apply_budget

        self.calls += 1
        for due, value in list(self._pending):
            if self.calls >= due:
                self._used = value
                self._pending.remove((due, value))
        gpu = GpuMemory(0, "Fake 12GB", self.total_mb, self._used, self.total_mb - self._used)
        ram = self._real.snapshot()
        gpus = _apply_budget([gpu], self.budget_mb)
        return MemorySnapshot(
            ram.ram_total_mb, ram.ram_available_mb, ram.ram_used_mb, gpus, "fake", time.time()
        )

    def process_vram_mb(self, pids):  # noqa: ANN001, ANN201
        return None

    def shutdown(self) -> None:
        pass
