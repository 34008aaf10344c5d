"""How fast each placement rung runs a pipeline: seconds per step, measured per rung.

Per learned-model key (folder|dtype|device, plus |rung below full residency): the
seconds per step of measured runs (the call's time over its steps, a first run after a
load left out: it loads kernels too), fitted against the request's size by least
squares. A rung's speed is its fitted time relative to full residency's at the same
size; before both are measured, the rung's prior (``placement_ladder.py``) stands.
Kept in ``<memory.state_dir>/rung-speeds.json``; a file that cannot be read is ignored.

The same file keeps the rungs a folder's models refused (group offload on a model whose
forward casts by weight device, say), per folder and diffusers version: a restart skips
them at once instead of failing into them again, and a new diffusers tries them again.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from services.memory.learning import fit_line, write_json_atomically

log = logging.getLogger("edison.generation")

STATE_FILE = "rung-speeds.json"
MAX_SAMPLES = 32


class RungSpeeds:
    """One per app (the pipeline registry's). Thread-safe; file writes happen in save()."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = Path(state_dir) / STATE_FILE if state_dir is not None else None
        # Why: runs are recorded from the event loop and the file is written from a thread.
        self._lock = threading.Lock()
        self.samples: dict[str, list[tuple[float, float]]] = {}
        # "<folder>|diffusers <version>" -> rung -> why the folder's models refused it
        self.unsupported: dict[str, dict[str, str]] = {}
        self._load()

    def record(self, key: str, size: float, step_s: float) -> bool:
        """Keep one run's seconds per step; False for an impossible figure."""
        if not (math.isfinite(step_s) and step_s > 0 and math.isfinite(size) and size > 0):
            return False
        with self._lock:
            kept = self.samples.setdefault(key, [])
            kept.append((size, step_s))
            del kept[:-MAX_SAMPLES]
        return True

    def mark_unsupported(self, folder: str, rung: str, why: str) -> None:
        """Keep that ``folder``'s models refused ``rung`` (saved by save())."""
        with self._lock:
            self.unsupported.setdefault(unsupported_key(folder), {})[rung] = why

    def unsupported_for(self, folder: str) -> dict[str, str]:
        """The rungs ``folder``'s models refused under this diffusers: rung -> why."""
        with self._lock:
            return dict(self.unsupported.get(unsupported_key(folder), {}))

    def step_s(self, key: str, size: float) -> float | None:
        """Seconds per step at ``size``, fitted from measured runs; None before any."""
        with self._lock:
            points = list(self.samples.get(key, ()))
        if not points:
            return None
        fitted = fit_line(points, 1.0).fitted_mb(size)  # a least-squares line, any unit
        return fitted if fitted > 0 else sum(s for _, s in points) / len(points)

    def save(self) -> None:
        """Write the state file atomically. Blocking: call from a thread in async code."""
        if self.path is None:
            return
        with self._lock:
            data = {
                "version": 1,
                "step_s": {k: list(v) for k, v in self.samples.items()},
                "unsupported": {k: dict(v) for k, v in self.unsupported.items()},
            }
        try:
            write_json_atomically(self.path, data)
        except OSError as exc:
            log.warning("Could not save rung speeds to %s: %s", self.path, exc)

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            self.samples = {
                str(k): [(float(s), float(t)) for s, t in v] for k, v in data["step_s"].items()
            }
            # Absent in files written before the marks were kept: none then.
            self.unsupported = {
                str(k): {str(r): str(w) for r, w in v.items()}
                for k, v in data.get("unsupported", {}).items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("Ignoring the rung speeds in %s (unreadable: %s)", self.path, exc)


def unsupported_key(folder: str) -> str:
    """A folder's marks hold under one diffusers version: hooks change between releases."""
    return f"{_resolved(folder)}|diffusers {_diffusers_release()}"


@functools.lru_cache(maxsize=64)
def _resolved(folder: str) -> Path:
    # Read on every prediction: resolve a folder's path once, not per request.
    return Path(folder).expanduser().resolve()


@functools.cache
def _diffusers_release() -> str:
    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "unknown"
