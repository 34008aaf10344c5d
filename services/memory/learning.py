"""Learned memory: what a generation request needs and what an LLM worker costs, from
measured peaks rather than constants.

Per pipeline (folder, dtype, device): working memory = a + b x size, fitted by least
squares on measured runs (``peak.py``), times a safety margin taken from how far the
measured peaks stood above the fit (the 95th percentile of measured / fitted, times
``memory.margin_factor``, never below 1.1). Beyond the largest size measured the margin
widens by a quarter of the relative distance (a request 36 % larger than any measured
one gets 9 % more): attention makes working memory grow a little faster than linearly
(the tiny image pipeline: 10 % above a three-point linear fit at 1.36x its largest
size), and the next run then teaches the fit. Until ``memory.learn_after`` runs are
measured, the configured ``required_vram_mb`` / ``required_ram_mb`` stand (the prior).
A CUDA out-of-memory at size S sets a floor for S and above: 1.25 x what the failed
run had reserved. Per device: what an LLM worker needs beyond its GGUF estimate
(measured minus estimated, a running mean over recent loads, with a prior until then).

The figures are kept in ``<memory.state_dir>/memory-models.json`` and read back at
start; a file that cannot be read is logged and ignored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("edison.memory")

STATE_FILE = "memory-models.json"
MIN_MARGIN = 1.1
OOM_FLOOR = 1.25
EXTRAPOLATION = 0.25  # extra margin per unit of relative distance beyond the largest size
MAX_SAMPLES = 64
MAX_OVERHEAD_SAMPLES = 8


@dataclass(frozen=True)
class Fit:
    """working_mb(size) = (a + b x size) x margin."""

    a_mb: float
    b_mb_per_unit: float
    margin: float
    samples: int
    max_size: float  # the largest size measured

    def fitted_mb(self, size: float) -> float:
        return max(0.0, self.a_mb + self.b_mb_per_unit * size)

    def margin_at(self, size: float) -> float:
        beyond = max(0.0, size / self.max_size - 1.0) if self.max_size > 0 else 0.0
        return self.margin * (1.0 + EXTRAPOLATION * beyond)

    def working_mb(self, size: float) -> float:
        return self.fitted_mb(size) * self.margin_at(size)


def fit_line(points: list[tuple[float, float]], margin_factor: float) -> Fit:
    """Least squares through (size, working MB), slope never negative, and the margin."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx > 0 else 0.0
    if b < 0:  # noise: memory does not shrink as requests grow
        b = 0.0
    a = my - b * mx
    ratios = sorted(y / max(1e-6, a + b * x) for x, y in points)
    p95 = ratios[max(0, math.ceil(0.95 * n) - 1)]
    biggest = max(x for x, _ in points)
    return Fit(a, b, max(MIN_MARGIN, p95 * margin_factor), n, biggest)


@dataclass
class RunSample:
    size: float
    working_mb: float
    predicted_mb: float | None  # the learned working prediction it ran under (None: prior)
    at: float = field(default_factory=time.time)


@dataclass
class OomMark:
    size: float
    need_mb: float  # what the run had reserved when the device ran out
    at: float = field(default_factory=time.time)


@dataclass
class PipelineModel:
    key: str  # folder|dtype|device
    unit: str
    resident_mb: float | None = None  # weights + what runs left allocated, measured
    samples: list[RunSample] = field(default_factory=list)
    ooms: list[OomMark] = field(default_factory=list)
    dropped: int = 0  # measurements refused as impossible

    def fit(self, learn_after: int, margin_factor: float) -> Fit | None:
        if len(self.samples) < learn_after:
            return None
        return fit_line([(s.size, s.working_mb) for s in self.samples], margin_factor)

    def oom_floor_mb(self, size: float) -> float | None:
        floors = [o.need_mb * OOM_FLOOR for o in self.ooms if o.size <= size]
        return max(floors) if floors else None


@dataclass(frozen=True)
class Prediction:
    """What one request is predicted to need on its device, and where the figure came from."""

    need_mb: float
    source: str  # prior | learned
    size: float
    unit: str
    working_mb: float | None  # the learned working memory, margin included
    resident_mb: float  # weights counted because the pipeline is not loaded (0 when it is)
    oom_floor_mb: float | None


@dataclass(frozen=True)
class PipelineModelView:
    key: str
    unit: str
    samples: int
    learned: bool  # predictions come from the fit (enough samples)
    a_mb: float | None
    b_mb_per_unit: float | None
    margin: float | None
    resident_mb: float | None
    oom_marks: int
    dropped: int
    last_size: float | None
    last_predicted_mb: float | None  # working memory the last run was predicted to need
    last_measured_mb: float | None  # working memory it really took


@dataclass(frozen=True)
class WorkerOverheadView:
    device: str
    mb: float
    samples: int
    source: str  # prior | learned
    backend: str = "llama-cpp-python"  # the worker backend it was learned for


class LearnedMemory:
    """One per app (owned by placement). Thread-safe; file writes happen in save()."""

    def __init__(
        self,
        state_dir: Path | None,
        *,
        learn_after: int = 3,
        margin_factor: float = 1.05,
        overhead_prior_mb: float = 512.0,
    ) -> None:
        self.path = Path(state_dir) / STATE_FILE if state_dir is not None else None
        self.learn_after = learn_after
        self.margin_factor = margin_factor
        self.overhead_prior_mb = overhead_prior_mb
        # Why: runs are recorded from the event loop, the file is written from a thread
        # and /system/memory reads at any time; the lock covers the dictionaries only.
        self._lock = threading.Lock()
        self.pipelines: dict[str, PipelineModel] = {}
        self.overheads: dict[str, list[float]] = {}
        self._load()

    # ---- pipelines -----------------------------------------------------------------
    def _model(self, key: str, unit: str) -> PipelineModel:
        model = self.pipelines.get(key)
        if model is None or model.unit != unit:
            model = self.pipelines[key] = PipelineModel(key, unit)
        return model

    def predict(
        self, key: str, unit: str, size: float, *, prior_mb: float, resident_mb: float
    ) -> Prediction:
        """The need of one request of ``size``: learned once enough runs are measured,
        else ``prior_mb``; never below an out-of-memory floor at or under this size.
        ``resident_mb`` is added to a learned figure: the weights when not loaded."""
        with self._lock:
            model = self._model(key, unit)
            fit = model.fit(self.learn_after, self.margin_factor)
            floor = model.oom_floor_mb(size)
        if fit is None:
            need, working, source, resident = float(prior_mb), None, "prior", 0.0
        else:
            working = fit.working_mb(size)
            need, source, resident = resident_mb + working, "learned", resident_mb
        if floor is not None:
            need = max(need, floor)
        return Prediction(round(need, 1), source, size, unit, working, resident, floor)

    def record_run(
        self,
        key: str,
        unit: str,
        size: float,
        working_mb: float,
        *,
        predicted_mb: float | None,
        resident_mb: float | None,
    ) -> bool:
        """Keep one measured run; False (logged) when the figure is impossible."""
        ok = math.isfinite(working_mb) and working_mb >= 0 and math.isfinite(size) and size > 0
        with self._lock:
            model = self._model(key, unit)
            if resident_mb is not None and math.isfinite(resident_mb) and resident_mb >= 0:
                model.resident_mb = resident_mb
            if not ok:
                model.dropped += 1
            else:
                model.samples.append(RunSample(size, working_mb, predicted_mb))
                del model.samples[:-MAX_SAMPLES]
        if not ok:
            log.warning(
                "Memory model %s: dropped an impossible measurement (size=%s working=%s MB)",
                key,
                size,
                working_mb,
            )
        return ok

    def record_oom(self, key: str, unit: str, size: float, need_mb: float) -> None:
        with self._lock:
            self._model(key, unit).ooms.append(OomMark(size, need_mb))

    def resident_mb(self, key: str) -> float | None:
        with self._lock:
            model = self.pipelines.get(key)
            return model.resident_mb if model is not None else None

    def view(self, key: str) -> PipelineModelView | None:
        with self._lock:
            model = self.pipelines.get(key)
            if model is None:
                return None
            fit = model.fit(self.learn_after, self.margin_factor)
            last = model.samples[-1] if model.samples else None
            return PipelineModelView(
                key=key,
                unit=model.unit,
                samples=len(model.samples),
                learned=fit is not None,
                a_mb=None if fit is None else round(fit.a_mb, 3),
                b_mb_per_unit=None if fit is None else fit.b_mb_per_unit,
                margin=None if fit is None else round(fit.margin, 3),
                resident_mb=model.resident_mb,
                oom_marks=len(model.ooms),
                dropped=model.dropped,
                last_size=None if last is None else last.size,
                last_predicted_mb=None if last is None else last.predicted_mb,
                last_measured_mb=None if last is None else round(last.working_mb, 2),
            )

    # ---- LLM workers ---------------------------------------------------------------
    def worker_overhead_mb(self, device: str) -> float:
        """What a worker needs on ``device`` beyond its GGUF estimate."""
        with self._lock:
            samples = self.overheads.get(device)
        return sum(samples) / len(samples) if samples else self.overhead_prior_mb

    def record_worker_load(self, device: str, estimate_mb: float, measured_mb: float) -> bool:
        """One load's measured minus estimated memory; False for an impossible figure."""
        overhead = measured_mb - estimate_mb
        if not (math.isfinite(overhead) and measured_mb > 0 and overhead > -estimate_mb):
            log.warning(
                "Worker overhead on %s: dropped an impossible measurement (%s MB measured, "
                "%s MB estimated)",
                device,
                measured_mb,
                estimate_mb,
            )
            return False
        with self._lock:
            samples = self.overheads.setdefault(device, [])
            samples.append(max(0.0, overhead))
            del samples[:-MAX_OVERHEAD_SAMPLES]
        return True

    def overhead_samples(self, device: str) -> int:
        with self._lock:
            return len(self.overheads.get(device, ()))

    # ---- persistence ---------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "version": 1,
                "pipelines": {
                    k: {
                        "unit": m.unit,
                        "resident_mb": m.resident_mb,
                        "samples": [
                            [s.size, s.working_mb, s.predicted_mb, s.at] for s in m.samples
                        ],
                        "ooms": [[o.size, o.need_mb, o.at] for o in m.ooms],
                    }
                    for k, m in self.pipelines.items()
                },
                "worker_overheads": {d: list(v) for d, v in self.overheads.items()},
            }

    def save(self) -> None:
        """Write the state file atomically. Blocking: call from a thread in async code."""
        if self.path is None:
            return
        data = json.dumps(self.snapshot())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(data)
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("Could not save learned memory models to %s: %s", self.path, exc)

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            pipelines = {
                k: PipelineModel(
                    k,
                    str(m["unit"]),
                    None if m.get("resident_mb") is None else float(m["resident_mb"]),
                    [RunSample(float(s), float(w), p, float(t)) for s, w, p, t in m["samples"]],
                    [OomMark(float(s), float(n), float(t)) for s, n, t in m.get("ooms", [])],
                )
                for k, m in data["pipelines"].items()
            }
            overheads = {
                str(d): [float(x) for x in v] for d, v in data.get("worker_overheads", {}).items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning(
                "Ignoring the learned memory models in %s (unreadable: %s: %s); starting afresh",
                self.path,
                type(exc).__name__,
                exc,
            )
            return
        self.pipelines, self.overheads = pipelines, overheads
        log.info(
            "Learned memory models read from %s: %d pipeline(s), %d device(s)",
            self.path,
            len(pipelines),
            len(overheads),
        )
