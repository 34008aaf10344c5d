"""Keeping the outputs folder bounded: ``server.outputs_max_age_h`` and
``server.outputs_max_mb``.

Only the files Edison writes there (``<kind>_<32 hex>...``) are considered, oldest first
(by modification time): a file older than the age limit goes, and while the files left
take more than the size limit the oldest go. A file that may belong to a job not done
yet is never deleted: one modified since the earliest unfinished job started (a running
job writes its files before it is marked done), or one an unfinished job lists.

Blocking (a directory scan, deletions): run it in a worker thread.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edison.generation")

OUTPUT_NAME = re.compile(r"^(image|video|music)_[0-9a-f]{32}[A-Za-z0-9_.-]*$")
MB = 1024 * 1024


@dataclass(frozen=True)
class PruneResult:
    """What one pass deleted and what it kept."""

    removed: tuple[str, ...]
    freed_mb: float
    kept_files: int
    kept_mb: float


def prune_outputs(
    folder: Path,
    *,
    max_age_s: float | None,
    max_mb: float | None,
    busy_since: float | None = None,
    busy_names: frozenset[str] = frozenset(),
    now: float | None = None,
) -> PruneResult:
    """Delete Edison's files in ``folder`` beyond the age and size limits, oldest first.

    ``busy_since``: when the earliest unfinished job started (files modified since then
    are kept); ``busy_names``: files unfinished jobs list (kept)."""
    now = time.time() if now is None else now
    files: list[tuple[float, str, int]] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if OUTPUT_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    files.append((st.st_mtime, entry.name, st.st_size))
    except FileNotFoundError:
        return PruneResult((), 0.0, 0, 0.0)
    files.sort()  # oldest first
    total = sum(size for _, _, size in files)
    limit = None if max_mb is None else max_mb * MB
    removed: list[str] = []
    freed = 0
    for mtime, name, size in files:
        if name in busy_names or (busy_since is not None and mtime >= busy_since):
            continue
        too_old = max_age_s is not None and now - mtime > max_age_s
        too_big = limit is not None and total > limit
        if not (too_old or too_big):
            continue
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass  # gone already (a DELETE /jobs/{id} meanwhile)
        except OSError as exc:
            log.warning("Could not delete the old output %s: %s", name, exc)
            continue
        removed.append(name)
        freed += size
        total -= size
    if removed:
        log.info(
            "Outputs: deleted %d old file(s), %.1f MB; %d file(s), %.1f MB kept",
            len(removed),
            freed / MB,
            len(files) - len(removed),
            total / MB,
        )
    return PruneResult(tuple(removed), freed / MB, len(files) - len(removed), total / MB)
