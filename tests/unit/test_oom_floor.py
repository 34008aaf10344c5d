"""The out-of-memory floor, from numbers: what an OOM records, its cap, and its decay.

A CUDA out-of-memory cannot happen on this CPU machine; these tests give the learned
memory the figures an OOM would report (the decision logic, table-driven from numbers).
The run through a real pipeline is in tests/integration/test_memory_learning.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from services.memory.learning import DECAY_RUNS, OOM_FLOOR, LearnedMemory

KEY = "/p/image|float16|cuda:0"
UNIT = "latent elements"
SIZE = 4096.0


def learned(tmp_path: Path) -> LearnedMemory:
    return LearnedMemory(tmp_path / "state", learn_after=3, margin_factor=1.0)


def oom(mem: LearnedMemory, *, cap_mb: float | None = None, resident_mb: float = 0.0) -> float:
    """What the job service does when a run of SIZE runs out of memory: predict, then
    record the run's own need. Returns the need the next run is predicted."""
    p = mem.predict(KEY, UNIT, SIZE, prior_mb=4000, resident_mb=resident_mb)
    mem.record_oom(KEY, UNIT, SIZE, p.own_mb, cap_mb=cap_mb)
    return mem.predict(KEY, UNIT, SIZE, prior_mb=4000, resident_mb=resident_mb).need_mb


def test_three_ooms_in_a_row_do_not_compound(tmp_path: Path) -> None:
    mem = learned(tmp_path)
    needs = [oom(mem) for _ in range(3)]
    # Each OOM records the run's own need (4000 MB, the prior), not the floored need it
    # ran under: the floor is 5000 MB after the first and stays there (old code: 5000,
    # 6250, 7812.5).
    assert needs == [4000 * OOM_FLOOR] * 3
    assert mem.view(KEY).oom_marks == 1


def test_the_floor_is_capped_at_what_the_device_could_ever_give(tmp_path: Path) -> None:
    mem = learned(tmp_path)
    # A 4500 MB card less its reserve: a 5000 MB floor would make this size a 422 forever.
    assert oom(mem, cap_mb=4500) == 4500
    assert mem.predict(KEY, UNIT, SIZE * 2, prior_mb=4000, resident_mb=0).oom_floor_mb == 4500


def test_successes_at_that_size_decay_the_floor_until_it_is_gone(tmp_path: Path) -> None:
    mem = learned(tmp_path)
    oom(mem)

    def floor() -> float | None:
        return mem.predict(KEY, UNIT, SIZE, prior_mb=4000, resident_mb=0).oom_floor_mb

    assert not mem.record_success(KEY, SIZE / 2)  # a smaller run proves nothing about SIZE
    seen = [floor()]
    for _ in range(DECAY_RUNS):
        assert mem.record_success(KEY, SIZE)  # a run at SIZE (or above) succeeded
        seen.append(floor())
    # 25 % over the run's own need, halved by each success, then dropped.
    assert seen == [5000.0, 4500.0, 4250.0, 4125.0, None]
    assert mem.view(KEY).oom_marks == 0
    # A new OOM after the decay sets the floor afresh (not on top of the old one).
    assert oom(mem) == 5000.0


def test_a_floor_counts_the_run_s_own_memory_not_weights_loaded_since(tmp_path: Path) -> None:
    """The first run of a pipeline that is not loaded counts its weights in its need; an
    OOM then floors the run's own memory, and the weights count only while not loaded."""
    mem = learned(tmp_path)
    for size in (1000.0, 2000.0, 3000.0):  # learned: working MB = size / 10
        mem.record_run(KEY, UNIT, size, size / 10, predicted_mb=None, resident_mb=None)
    cold = mem.predict(KEY, UNIT, SIZE, prior_mb=4000, resident_mb=3000)
    assert cold.source == "learned" and cold.working_mb is not None
    assert cold.need_mb == pytest.approx(3000 + cold.working_mb, abs=0.1)
    assert cold.own_mb == pytest.approx(cold.working_mb, abs=0.1)  # no weights in it
    mem.record_oom(KEY, UNIT, SIZE, cold.own_mb)
    loaded = mem.predict(KEY, UNIT, SIZE, prior_mb=4000, resident_mb=0)
    # Old code: the floor was 1.25 x (3000 + working), weights counted twice once loaded.
    assert loaded.need_mb == pytest.approx(cold.working_mb * OOM_FLOOR, abs=0.2)
    again = mem.predict(KEY, UNIT, SIZE, prior_mb=4000, resident_mb=3000)
    assert again.need_mb == pytest.approx(3000 + cold.working_mb * OOM_FLOOR, abs=0.2)


def test_the_decay_survives_a_restart_and_old_compounded_marks_are_dropped(
    tmp_path: Path, caplog
) -> None:
    mem = learned(tmp_path)
    oom(mem, cap_mb=4800)
    mem.record_success(KEY, SIZE)
    mem.save()
    again = learned(tmp_path)
    p = again.predict(KEY, UNIT, SIZE, prior_mb=4000, resident_mb=0)
    assert p.oom_floor_mb == mem.predict(KEY, UNIT, SIZE, prior_mb=4000, resident_mb=0).oom_floor_mb
    assert p.oom_floor_mb == 4500.0
    # A state file of the first version kept compounded needs with no cap: dropped.
    path = tmp_path / "state" / "memory-models.json"
    data = json.loads(path.read_text())
    data["version"] = 1
    data["pipelines"][KEY]["ooms"] = [[SIZE, 7812.5, 1.0]]
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="edison.memory"):
        old = learned(tmp_path)
    assert old.view(KEY).oom_marks == 0
    assert old.predict(KEY, UNIT, SIZE, prior_mb=4000, resident_mb=0).need_mb == 4000
    assert "old format dropped" in caplog.text
