"""Shared fixtures: tiny models generated once, settings builders, a real uvicorn server.

Helpers that are not fixtures (wait_until, LiveServer, FakeGpuProbe) are in helpers.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.settings import KINDS, Settings
from tests.helpers import LiveServer, deep_merge

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tier GGUF files (fast, medium, deep, reasoning), written once per run."""
    from services.demo.assets import DEMO_TIERS
    from services.demo.tiny_gguf import write_tiny_gguf

    out = tmp_path_factory.mktemp("tiny")
    for i, (tier, shape) in enumerate(DEMO_TIERS.items()):
        write_tiny_gguf(out / f"{tier}.gguf", shape, seed=i)
    return out


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
