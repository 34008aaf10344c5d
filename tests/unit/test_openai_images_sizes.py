"""The nearest valid sizes /v1/images/generations offers for a refused size, from the
nearest values JobService gives for the side it refused (decision logic from numbers)."""

from __future__ import annotations

import pytest

from routers.openai_images import nearest_sizes


@pytest.mark.parametrize(
    ("field", "nearest", "width", "height", "expected"),
    [
        ("width", [64, 72], 65, 64, ["64x64", "72x64"]),  # height on the grid: kept
        ("height", [64, 72], 64, 70, ["64x72", "64x64"]),  # nearest first
        ("width", [64, 72], 65, 65, ["64x64", "64x72", "72x64", "72x72"]),  # both off
        ("width", [64, 80], 70, 48, ["64x48", "80x48"]),  # a multiple of 16
        ("width", [64, 80], 70, 50, ["64x48", "80x48", "64x64", "80x64"]),
        ("width", [16], 5, 32, ["16x32"]),  # below the first multiple
        ("width", [], 65, 64, []),  # no nearest values given: none offered
    ],
)
def test_nearest_sizes(field, nearest, width, height, expected) -> None:
    assert nearest_sizes(field, nearest, width, height) == expected
