"""How long a generation will take: learned from the measured durations of past runs.

Per kind, the seconds a job's pipeline ran (a load, which happens once, is left out)
against its request's size (``sizing.py``): a least-squares line once two sizes were
measured (slope never negative), the mean of that kind after one run, none before. A
running job's remaining time comes from its own progress once a step is done (elapsed /
steps done x steps left), else from the line less the time it has run.
"""

from __future__ import annotations

import threading
from collections import deque

from services.memory.learning import fit_line

MAX_SAMPLES = 32


class DurationModel:
    """One per app. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, deque[tuple[float, float]]] = {}

    def record(self, kind: str, size: float, seconds: float) -> None:
        if size > 0 and seconds >= 0:
            with self._lock:
                self._samples.setdefault(kind, deque(maxlen=MAX_SAMPLES)).append((size, seconds))

    def predict(self, kind: str, size: float | None) -> float | None:
        """Seconds a job of this kind and size holds the gate; None before any run."""
        with self._lock:
            points = list(self._samples.get(kind, ()))
        if not points:
            return None
        if size is None:
            return sum(y for _, y in points) / len(points)
        # The same least squares as memory (slope never negative; one size: the mean);
        # its margin is for memory and is not used here.
        return fit_line(points, margin_factor=1.0).line_at(size)
