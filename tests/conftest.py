"""Shared fixtures: tiny models generated once, settings builders, a real uvicorn server.

Helpers that are not fixtures (wait_until, LiveServer, FakeGpuProbe) are in helpers.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.settings import KINDS, Settings
from tests.helpers import LiveServer, deep_merge

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _torch_on_one_thread() -> Iterator[None]:
    """torch on one thread for the whole run. Why: the tests' tiny tensors gain nothing
    from a second thread, and on a busy 2-core machine two threads per process wait on
    each other (the family tests ran 5-20x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _probes_end_with_their_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Shut down every MemoryProbe a test made. A probe whose nvidia-smi step failed keeps
    a retrier thread; left running, it ran a later test's fake nvidia-smi (PATH is
    process-wide) and broke that test's counts."""
    from services.memory.probe import MemoryProbe

    made: list[MemoryProbe] = []
    real_init = MemoryProbe.__init__

    def init(self: MemoryProbe, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(MemoryProbe, "__init__", init)
    yield
    for probe in made:
        probe.shutdown()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tier GGUF files (fast, medium, deep, reasoning), written once per run."""
    from services.demo.assets import DEMO_TIERS
    from services.demo.tiny_gguf import write_tiny_gguf

    out = tmp_path_factory.mktemp("tiny")
    for i, (tier, shape) in enumerate(DEMO_TIERS.items()):
        write_tiny_gguf(out / f"{tier}.gguf", shape, seed=i)
    return out


def _can_build_llama_server() -> bool:
    compilers = ("c++", "g++", "clang++")
    return shutil.which("cmake") is not None and any(shutil.which(c) for c in compilers)


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The llama-server binary `make install` builds into the venv.

    Skips only where it cannot be built (no cmake or C++ compiler); anywhere else a
    missing binary fails the test: `make test` builds it first.
    """
    from services.llm.backend_llama_server import default_binary, inspect_binary

    path = default_binary()
    info = inspect_binary(path)
    if info.usable:
        return path
    if not _can_build_llama_server():
        pytest.skip(f"llama-server cannot be built here (no cmake or C++ compiler): {info.reason}")
    pytest.fail(f"{info.reason}; `make install` (scripts/build_llama_server.sh) builds it")


@pytest.fixture(params=["llama-cpp-python", "llama-server"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each worker backend in turn (llama-server: the binary must be there, see above)."""
    if request.param == "llama-server":
        request.getfixturevalue("llama_server_bin")
    return request.param


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a test: no models unless given, outputs in tmp_path."""

    def build(**sections: Any) -> Settings:
        data = deep_merge(
            {
                "server": {"outputs_dir": str(tmp_path / "outputs"), "log_level": "debug"},
                "memory": {"reserve_ram_mb": 0, "state_dir": str(tmp_path / "state")},
            },
            sections,
        )
        return Settings(**data)

    return build


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
    from services.demo.tiny_pipelines import write_tiny_pipeline

    out = tmp_path_factory.mktemp("pipelines")
    return {kind: write_tiny_pipeline(kind, out / kind) for kind in KINDS}
