"""A session fixture that writes the tiny family folders (services.demo.tiny_families).

Import it where it is needed (``from tests.families_fixture import tiny_family_dir``), or
once into a conftest.py to share it: every folder is written once per test session, on
first use, so a run that selects one family builds only that one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_family_dir(name)``: the folder of family ``name``, written on first call."""
    from services.demo.tiny_families import write_tiny_family

    root = tmp_path_factory.mktemp("families")

    def folder(name: str) -> Path:
        # write_tiny_family returns a finished folder as it is: the folder is the cache.
        return write_tiny_family(name, root / name)

    return folder
