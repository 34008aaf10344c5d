"""Fixtures of the probe tests: fake nvidia-smi programs on PATH, probes shut down after."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.memory.probe import MemoryProbe


@pytest.fixture
def smi_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


@pytest.fixture
def new_probe() -> Iterator[Callable[..., MemoryProbe]]:
    """MemoryProbe(**kwargs), shut down (its retries stopped) when the test ends."""
    made: list[MemoryProbe] = []

    def make(**kwargs: Any) -> MemoryProbe:
        made.append(MemoryProbe(**kwargs))
        return made[-1]

    yield make
    for probe in made:
        probe.shutdown()
