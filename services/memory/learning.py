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
A CUDA out-of-memory at size S sets a floor for S and above: 1.25 x the failed run's own
need (its prediction before any floor, so repeated OOMs do not compound), capped at what
the device could ever give; each later successful run at S or above halves the floor's
25 % (after ``DECAY_RUNS`` of them the mark is dropped). Per device: what an LLM worker
needs beyond its GGUF estimate (measured minus estimated, a running mean over recent
loads, with a prior until then).

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
OOM_FLOOR = 1.25  # an OOM mark's floor: its run's own need x this, before any decay
DECAY_RUNS = 4  # successful runs at a mark's size or above that drop the mark
MAX_OOM_MARKS = 16
STATE_VERSION = 2  # 2: OOM marks keep the run's own need, their cap and their decay
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
        return self.line_at(size)

    def line_at(self, size: float) -> float:
        """The fitted line at ``size``, never negative (whatever its unit: eta.py fits
        seconds with it)."""
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
    """A CUDA out-of-memory at ``size``: a floor for that size and above, which decays."""

    size: float
    need_mb: float  # the failed run's own need: no earlier floor, no weights (own_mb)
    cap_mb: float | None = None  # the most its device could ever give (the floor's ceiling)
    at: float = field(default_factory=time.time)
    successes: int = 0  # successful runs at this size or above since the OOM

    @property
    def floor_mb(self) -> float:
        """need x (1 + 0.25 / 2**successes), never above the cap."""
        floor = self.need_mb * (1.0 + (OOM_FLOOR - 1.0) * 0.5**self.successes)
        return floor if self.cap_mb is None else min(floor, self.cap_mb)


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
        floors = [o.floor_mb for o in self.ooms if o.size <= size]
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
    oom_floor_mb: float | None  # the floor applied (resident_mb included)
    own_mb: float  # the run's own need, before any floor and without resident_mb: what
    # an out-of-memory of this run records (so a floor never counts weights loaded since)


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
        ``resident_mb`` is added to a learned figure (and to a floor): the weights when
        not loaded."""
        with self._lock:
            model = self._model(key, unit)
            fit = model.fit(self.learn_after, self.margin_factor)
            floor = model.oom_floor_mb(size)
        if fit is None:
            need, working, source, resident = float(prior_mb), None, "prior", 0.0
        else:
            working = fit.working_mb(size)
            need, source, resident = resident_mb + working, "learned", resident_mb
        own = round(need - resident, 1)  # the run's own memory: weights not counted
        if floor is not None:
            floor = resident + floor  # a floor is of the run's own memory, like ``own``
            need = max(need, floor)
        return Prediction(round(need, 1), source, size, unit, working, resident, floor, own)

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

    def record_oom(
        self, key: str, unit: str, size: float, need_mb: float, *, cap_mb: float | None = None
    ) -> float:
        """A run of ``size`` ran out of memory; ``need_mb`` is its own need (the
        prediction without any floor, ``Prediction.own_mb``), ``cap_mb`` the most its
        device could ever give. Sets the floor for this size and above (replacing an
        earlier mark at the same size, so OOMs in a row do not compound); returns it."""
        mark = OomMark(size, need_mb, cap_mb)
        with self._lock:
            model = self._model(key, unit)
            model.ooms = [o for o in model.ooms if o.size != size] + [mark]
            del model.ooms[:-MAX_OOM_MARKS]
        log.warning(
            "Memory model %s: out of memory at size %g with %.0f MB of its own need: "
            "floor %.0f MB for this size and above%s",
            key,
            size,
            need_mb,
            mark.floor_mb,
            f" (capped at {cap_mb:.0f} MB)" if cap_mb is not None else "",
        )
        return mark.floor_mb

    def record_success(self, key: str, size: float) -> bool:
        """A run of ``size`` succeeded: every OOM floor at this size or below decays one
        step, and one that has decayed ``DECAY_RUNS`` times is dropped. True when any did."""
        with self._lock:
            model = self.pipelines.get(key)
            if model is None:
                return False
            marks = [o for o in model.ooms if o.size <= size]
            for o in marks:
                o.successes += 1
            model.ooms = [o for o in model.ooms if o.successes < DECAY_RUNS]
        return bool(marks)

    def keys(self) -> list[str]:
        """Every pipeline memory model known (measured here or read back at start)."""
        with self._lock:
            return list(self.pipelines)

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
                "version": STATE_VERSION,
                "pipelines": {
                    k: {
                        "unit": m.unit,
                        "resident_mb": m.resident_mb,
                        "samples": [
                            [s.size, s.working_mb, s.predicted_mb, s.at] for s in m.samples
                        ],
                        "ooms": [[o.size, o.need_mb, o.cap_mb, o.at, o.successes] for o in m.ooms],
                    }
                    for k, m in self.pipelines.items()
                },
                "worker_overheads": {d: list(v) for d, v in self.overheads.items()},
            }

    def save(self) -> None:
        """Write the state file atomically. Blocking: call from a thread in async code."""
        if self.path is None:
            return
        try:
            write_json_atomically(self.path, self.snapshot())
        except OSError as exc:
            log.warning("Could not save learned memory models to %s: %s", self.path, exc)

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            # Version 1 stored what the failed run had reserved, previous floors included:
            # those marks compounded, so they are dropped; the next OOM sets a fresh one.
            old_marks = data.get("version", 1) < 2
            pipelines = {
                k: PipelineModel(
                    k,
                    str(m["unit"]),
                    None if m.get("resident_mb") is None else float(m["resident_mb"]),
                    [RunSample(float(s), float(w), p, float(t)) for s, w, p, t in m["samples"]],
                    []
                    if old_marks
                    else [
                        OomMark(
                            float(s), float(n), None if c is None else float(c), float(t), int(x)
                        )
                        for s, n, c, t, x in m.get("ooms", [])
                    ],
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
        if old_marks and any(m.get("ooms") for m in data["pipelines"].values()):
            log.warning(
                "Learned memory models in %s: out-of-memory marks of the old format dropped "
                "(they compounded); the next out-of-memory sets a fresh floor",
                self.path,
            )
        self.pipelines, self.overheads = pipelines, overheads
        log.info(
            "Learned memory models read from %s: %d pipeline(s), %d device(s)",
            self.path,
            len(pipelines),
            len(overheads),
        )


def write_json_atomically(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename, so a
    reader (or a crash) never sees half a file. Blocking; raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
