"""Outputs retention on a real folder: age and size limits, oldest first, and the files
a job not done yet may own are kept. File ages are set with os.utime (given numbers)."""

from __future__ import annotations

import os
from pathlib import Path

from services.generation.retention import MB, prune_outputs

NOW = 1_800_000_000.0
HEX = "0123456789abcdef" * 2


def write(folder: Path, name: str, kb: int, age_h: float) -> Path:
    path = folder / name
    path.write_bytes(b"x" * kb * 1024)
    os.utime(path, (NOW - age_h * 3600, NOW - age_h * 3600))
    return path


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_age_limit_deletes_only_edison_files_older_than_it(tmp_path: Path) -> None:
    write(tmp_path, f"image_{HEX}_0.png", 1, age_h=30)
    write(tmp_path, f"video_{HEX}.mp4", 1, age_h=2)
    write(tmp_path, "notes.txt", 1, age_h=1000)  # not Edison's: never touched
    write(tmp_path, f"music_{HEX}.wav", 1, age_h=25)
    result = prune_outputs(tmp_path, max_age_s=24 * 3600, max_mb=None, now=NOW)
    assert sorted(result.removed) == [f"image_{HEX}_0.png", f"music_{HEX}.wav"]
    assert names(tmp_path) == {f"video_{HEX}.mp4", "notes.txt"}
    assert result.kept_files == 1 and result.freed_mb == 2 / 1024


def test_size_limit_deletes_the_oldest_first_until_under_it(tmp_path: Path) -> None:
    for i, age in enumerate((5, 1, 4, 2, 3)):  # 100 KB each, written out of order
        write(tmp_path, f"image_{HEX}_{i}.png", 100, age_h=age)
    result = prune_outputs(tmp_path, max_age_s=None, max_mb=250 / 1024, now=NOW)
    # 500 KB over a 250 KB limit: the three oldest (ages 5, 4, 3) go.
    assert list(result.removed) == [
        f"image_{HEX}_0.png",
        f"image_{HEX}_2.png",
        f"image_{HEX}_4.png",
    ]
    assert names(tmp_path) == {f"image_{HEX}_1.png", f"image_{HEX}_3.png"}
    assert result.kept_mb * MB == 200 * 1024


def test_files_an_unfinished_job_may_own_are_never_deleted(tmp_path: Path) -> None:
    write(tmp_path, f"image_{HEX}_0.png", 100, age_h=10)  # a finished job's
    write(tmp_path, f"image_{HEX}_1.png", 100, age_h=9)  # listed by an unfinished job
    write(tmp_path, f"video_{HEX}.mp4", 100, age_h=0.5)  # written since it started
    busy_since = NOW - 3600  # the earliest unfinished job started an hour ago
    result = prune_outputs(
        tmp_path,
        max_age_s=60,
        max_mb=1 / 1024,  # everything is over both limits
        busy_since=busy_since,
        busy_names=frozenset({f"image_{HEX}_1.png"}),
        now=NOW,
    )
    assert result.removed == (f"image_{HEX}_0.png",)
    assert names(tmp_path) == {f"image_{HEX}_1.png", f"video_{HEX}.mp4"}


def test_a_missing_folder_is_nothing_to_prune(tmp_path: Path) -> None:
    result = prune_outputs(tmp_path / "none", max_age_s=1, max_mb=1, now=NOW)
    assert result.removed == () and result.kept_files == 0
