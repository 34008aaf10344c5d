"""The swarm memory policy from numbers, and real swarms over HTTP on tiny CPU models."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from services.memory_ledger import MemoryLedger, device_name
from services.memory_probe import GpuMemory, MemorySnapshot
from services.model_manager import ModelManager
from services.swarm_safety import (
    DEGRADED,
    NORMAL,
    TIME_SLICE,
    Agent,
    SwarmMemoryPolicy,
    decide,
    group_agents_by_model,
    should_load_vision,
)

# ---- the policy from numbers --------------------------------------------------------


@pytest.mark.parametrize(
    ("heavy", "free", "threshold", "mode"),
    [
        (2, 10000.1, 5000, NORMAL),  # just above 2 x threshold
        (2, 10000, 5000, TIME_SLICE),  # exactly 2 x threshold
        (2, 9999.9, 5000, TIME_SLICE),
        (2, 5000, 5000, TIME_SLICE),  # exactly the threshold
        (2, 4999.9, 5000, DEGRADED),
        (2, 0, 5000, DEGRADED),
        (4, 50000, 5000, NORMAL),
        (1, 0, 5000, NORMAL),  # one heavy model: normal whatever the memory
        (0, 0, 5000, NORMAL),
        (2, 0, 0, TIME_SLICE),  # threshold 0: 0 MB free is still "at the threshold"
        (2, 0.1, 0, NORMAL),
    ],
)
def test_decide_at_every_boundary(heavy: int, free: float, threshold: float, mode: str) -> None:
    got, reason = decide(heavy, free, threshold)
    assert got == mode
    assert reason


class StubGpuProbe:
    """A GPU reporting given figures: a GPU cannot exist on this CPU-only machine."""

    def __init__(self, total_mb: float, free_mb: float) -> None:
        self.total_mb, self.free_mb = total_mb, free_mb

    def snapshot(self) -> MemorySnapshot:
        used = self.total_mb - self.free_mb
        gpu = GpuMemory(0, "stub", self.total_mb, used, self.free_mb)
        return MemorySnapshot(32000, 16000, 16000, (gpu,), "stub", time.time())


def resident() -> Any:
    return SimpleNamespace(worker=SimpleNamespace(alive=True))


@pytest.mark.parametrize(
    ("free", "held", "tiers", "loaded", "mode"),
    [
        (10001, 0, ["medium", "deep"], [], NORMAL),
        (10000, 0, ["medium", "deep"], [], TIME_SLICE),
        (5000, 0, ["medium", "deep", "medium"], [], TIME_SLICE),
        (4999, 0, ["medium", "deep"], [], DEGRADED),
        (12000, 2001, ["medium", "deep"], [], TIME_SLICE),  # the ledger's holdings count
        (12000, 7001, ["medium", "deep"], [], DEGRADED),
        (4999, 0, ["fast", "medium", "fast"], [], NORMAL),  # one heavy tier
        (4999, 0, ["medium", "deep"], ["deep"], NORMAL),  # deep resident: one to load
        (4999, 0, ["fast", "medium", "deep"], ["fast"], DEGRADED),  # fast is not heavy
    ],
)
@pytest.mark.anyio
async def test_policy_assess_from_memory_figures(
    make_settings, tiny_dir, caplog, free, held, tiers, loaded, mode
) -> None:
    settings = make_settings(
        models={n: {"path": str(tiny_dir / f"{n}.gguf")} for n in ("fast", "medium", "deep")},
        memory={"reserve_vram_mb": 0},
        swarm={"degraded_threshold_mb": 5000},
    )
    probe = StubGpuProbe(total_mb=free, free_mb=free)
    ledger = MemoryLedger(reserve_vram_mb=0, reserve_ram_mb=0)
    if held:
        ledger.reserve("cuda:0", held, "task:image", "task")
    manager = ModelManager(settings, probe, ledger)  # type: ignore[arg-type]
    for name in loaded:
        manager.tiers[name].model = resident()
    policy = SwarmMemoryPolicy(settings, probe, ledger, manager)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="edison.swarm"):
        decision = await policy.assess([Agent(f"a{i}", "", t) for i, t in enumerate(tiers)])
    assert decision.mode == mode
    assert decision.device == "cuda:0"
    assert decision.free_mb == free - held
    assert f"Swarm policy: {mode} - " in caplog.text
    assert f"free={free - held:.0f}MB threshold=5000MB" in caplog.text


@pytest.mark.parametrize(
    ("images", "prompt", "expected"),
    [
        (True, "", True),
        (False, "Describe this image", True),
        (False, "LOOK AT the chart", True),
        (False, "What do you see?", True),
        (False, "a photo, please", True),
        (False, "imagine a cat", False),  # word boundary: not "image"
        (False, "who will oversee it", False),
        (False, "seen from above", False),
        (False, "Hello there", False),
    ],
)
def test_should_load_vision(images: bool, prompt: str, expected: bool) -> None:
    assert should_load_vision(images, prompt) is expected


def test_should_load_vision_reads_the_given_keywords() -> None:
    assert should_load_vision(False, "a Chart of sales", ["chart"])
    assert not should_load_vision(False, "Describe this image", ["chart"])


def test_groups_put_fast_first_then_heavy_in_order_of_appearance() -> None:
    agents = [Agent("m1", "", "medium"), Agent("f1", "", "fast"), Agent("d1", "", "deep")]
    agents += [Agent("m2", "", "medium"), Agent("f2", "", "fast")]
    groups = group_agents_by_model(agents)
    assert [g.to_dict() for g in groups] == [
        {"model": "fast", "agents": ["f1", "f2"]},
        {"model": "medium", "agents": ["m1", "m2"]},
        {"model": "deep", "agents": ["d1"]},
    ]


# ---- real swarms over HTTP ----------------------------------------------------------


def tiers(tiny_dir: Path, *names: str, **overrides: Any) -> dict[str, Any]:
    out = {n: {"path": str(tiny_dir / f"{n}.gguf"), "n_ctx": 256, "preload": False} for n in names}
    for name, extra in overrides.items():
        out[name] = {**out.get(name, {}), **extra}
    return {**out, "n_threads": 1, "load_timeout_s": 60}


def swarm_body(*agents: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "prompt": "Name a colour.",
        "agents": [{"name": n, "role": "a painter", "model": m} for n, m in agents],
        "max_tokens": 16,
        **extra,
    }


def loads(app: Any) -> dict[str, int]:
    return {name: t.loads for name, t in app.state.models.tiers.items()}


def test_normal_mode_every_agent_on_its_tier(make_settings, tiny_dir, caplog) -> None:
    settings = make_settings(
        models=tiers(tiny_dir, "fast", "medium", "deep"), swarm={"degraded_threshold_mb": 1}
    )
    app = create_app(settings)
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="edison.swarm"):
        body = swarm_body(("a", "fast"), ("b", "medium"), ("c", "deep"), rounds=2, synthesize=True)
        r = client.post("/swarm", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["policy"]["mode"] == "normal"
        assert "Swarm policy: normal - " in caplog.text
        assert [(x["agent"], x["round"]) for x in out["responses"]] == [
            ("a", 1),
            ("b", 1),
            ("c", 1),
            ("a", 2),
            ("b", 2),
            ("c", 2),
        ]
        for x in out["responses"]:
            assert x["tier"] == x["model"] and x["fallback_reason"] is None
            assert isinstance(x["content"], str)
            assert x["peers_shown"] == (0 if x["round"] == 1 else 2)
        assert out["synthesis"]["tier"] == "fast" and isinstance(out["synthesis"]["content"], str)
        # Fast runs beside the heavy tiers; medium and deep take turns in the heavy slot,
        # and round 2 starts with deep, which is still loaded.
        assert [s["order"] for s in out["schedule"]] == [
            ["fast", "medium", "deep"],
            ["fast", "deep", "medium"],
        ]
        assert all(s["concurrent"] for s in out["schedule"])
        assert loads(app) == {"fast": 1, "medium": 2, "deep": 1}
        assert [s["loads"] for s in out["schedule"]] == [3, 1]
        assert len(out["timings_ms"]["rounds"]) == 2


def test_time_slice_loads_each_group_once_per_round(make_settings, tiny_dir, caplog) -> None:
    app = create_app(make_settings(models=tiers(tiny_dir, "fast", "medium", "deep")))
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="edison.swarm"):
        # Force time_slice from the figure the policy itself reads: usable between the
        # threshold and twice the threshold (RAM on this CPU-only host).
        snap = app.state.probe.snapshot()
        usable = app.state.ledger.budget(snap, device_name(snap, 0)).usable_mb
        app.state.settings.swarm.degraded_threshold_mb = int(usable / 1.5)
        body = swarm_body(("m1", "medium"), ("d1", "deep"), ("m2", "medium"), ("d2", "deep"))
        r = client.post("/swarm", json={**body, "rounds": 2})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["policy"]["mode"] == "time_slice", out["policy"]
        assert "Swarm policy: time_slice - " in caplog.text
        assert out["groups"] == [
            {"model": "medium", "agents": ["m1", "m2"]},
            {"model": "deep", "agents": ["d1", "d2"]},
        ]
        assert all(x["tier"] == x["model"] for x in out["responses"])
        assert len(out["responses"]) == 8
        # Each group's model is loaded at most once per round: round 1 loads both groups,
        # round 2 starts with deep (still in the slot) and loads medium once.
        per_round = [s["loads"] for s in out["schedule"]]
        assert per_round == [len(out["groups"]), len(out["groups"]) - 1]
        assert [s["order"] for s in out["schedule"]] == [["medium", "deep"], ["deep", "medium"]]
        assert not any(s["concurrent"] for s in out["schedule"])
        assert app.state.models.loads_total() == sum(per_round) == 3
        assert loads(app) == {"fast": 0, "medium": 2, "deep": 1}


def test_degraded_mode_puts_every_agent_on_the_fallback_tier(
    make_settings, tiny_dir, caplog
) -> None:
    settings = make_settings(
        models=tiers(tiny_dir, "fast", "medium", "deep"),
        swarm={"degraded_threshold_mb": 10**9},
    )
    app = create_app(settings)
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="edison.swarm"):
        body = swarm_body(("a", "medium"), ("b", "deep"), ("c", "medium"), rounds=2)
        r = client.post("/swarm", json={**body, "synthesize": True})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["policy"]["mode"] == "degraded"
        assert "Swarm policy: degraded - " in caplog.text
        assert out["groups"] == [{"model": "fast", "agents": ["a", "b", "c"]}]
        for x in out["responses"]:
            assert x["tier"] == "fast" and x["model"] in ("medium", "deep")
            assert "degraded mode" in x["fallback_reason"]
        assert out["synthesis"]["tier"] == "fast"
        assert loads(app) == {"fast": 1, "medium": 0, "deep": 0}
        assert app.state.models.tiers["medium"].attempts == []


def test_failed_load_and_vision_on_demand_fall_back(make_settings, tiny_dir, tmp_path) -> None:
    deep = tmp_path / "deep.gguf"
    shutil.copy(tiny_dir / "deep.gguf", deep)
    vision = tmp_path / "vision.gguf"  # a text model: the vision load fails (no projector)
    shutil.copy(tiny_dir / "reasoning.gguf", vision)
    settings = make_settings(
        models=tiers(
            tiny_dir,
            "fast",
            "medium",
            deep={"path": str(deep)},
            vision={"path": str(vision), "n_ctx": 256, "preload": False},
        ),
        swarm={"degraded_threshold_mb": 1},
    )
    deep.write_bytes(b"this is no longer a model " * 100)  # broken after settings are loaded
    app = create_app(settings)
    with TestClient(app) as client:
        body = swarm_body(("d", "deep"), ("v", "vision"))
        r = client.post("/swarm", json=body)
        assert r.status_code == 200, r.text
        d, v = r.json()["responses"]
        assert d["tier"] == "medium" and "deep:" in d["fallback_reason"]
        assert isinstance(d["content"], str)
        # No image and no vision keyword: the vision model is not even tried.
        assert v["tier"] == "medium" and "vision not loaded" in v["fallback_reason"]
        assert app.state.models.tiers["vision"].attempts == []

        # A vision keyword: now the vision model is tried; it fails and medium answers.
        r = client.post("/swarm", json={**body, "prompt": "Look at the picture: what colour?"})
        assert r.status_code == 200, r.text
        _, v = r.json()["responses"]
        assert v["tier"] == "medium" and "vision:" in v["fallback_reason"]
        assert app.state.models.tiers["vision"].attempts
        assert app.state.models.tiers["vision"].loads == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"rounds": 0}, "rounds"),
        ({"rounds": 4}, "rounds"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"agents": []}, "agents"),
        ({"agents": [{"name": "a", "model": "huge"}]}, "agents.0.model"),
        ({"agents": [{"name": "a", "model": "deep"}]}, "agents.0.model"),  # not configured
        ({"agents": [{"name": n} for n in "abc"]}, "agents"),  # over swarm.max_agents
        ({"agents": [{"name": "a"}, {"name": "a"}]}, "agents.1.name"),
    ],
)
def test_bad_input_is_422_naming_the_field(make_settings, tiny_dir, change, field) -> None:
    settings = make_settings(models=tiers(tiny_dir, "fast", "medium"), swarm={"max_agents": 2})
    app = create_app(settings)
    with TestClient(app) as client:
        r = client.post("/swarm", json={**swarm_body(("a", "fast")), **change})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_request"
        assert [f["field"] for f in err["fields"]] == [field]
        assert app.state.models.loads_total() == 0
