"""Real swarms over HTTP on tiny CPU models (the policy from numbers: unit/test_swarm_policy)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from services.llm.manager import ModelManager

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


def test_time_slice_loads_each_group_once_per_round(
    make_settings, tiny_dir, caplog, monkeypatch
) -> None:
    app = create_app(make_settings(models=tiers(tiny_dir, "fast", "medium", "deep")))
    resolved: list[str] = []
    real_resolve = ModelManager.resolve

    async def counting_resolve(self: ModelManager, key: str, **kw: Any) -> Any:
        resolved.append(key)
        return await real_resolve(self, key, **kw)

    monkeypatch.setattr(ModelManager, "resolve", counting_resolve)
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="edison.swarm"):
        # Force time_slice from the figure the policy itself reads: usable between the
        # threshold and twice the threshold (RAM on this CPU-only host).
        usable = app.state.placement.view_of(app.state.probe.snapshot()).budget.usable_mb
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
        # One resolution per group and round: the agents' completions use the held tier.
        assert resolved == ["medium", "deep", "deep", "medium"]


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
    # A text model: the vision load fails on llama-cpp-python (its llava-1-5 handler needs a
    # projector; llama-server would serve it as a text model).
    vision = tmp_path / "vision.gguf"
    shutil.copy(tiny_dir / "reasoning.gguf", vision)
    settings = make_settings(
        models=tiers(
            tiny_dir,
            "fast",
            "medium",
            deep={"path": str(deep)},
            vision={
                "path": str(vision),
                "n_ctx": 256,
                "preload": False,
                "backend": "llama-cpp-python",
            },
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


def test_an_agent_whose_prompt_cannot_fit_fails_alone(make_settings, tiny_dir) -> None:
    settings = make_settings(models=tiers(tiny_dir, "fast"))
    body = swarm_body(("short", "fast"), ("long", "fast"))
    body["agents"][1]["role"] = "a painter who " + "paints " * 140  # > 256 tokens of context
    with TestClient(create_app(settings)) as client:
        r = client.post("/swarm", json=body)
        assert r.status_code == 200, r.text
        short, long = r.json()["responses"]
        assert isinstance(short["content"], str) and short["error"] is None
        assert long["content"] is None
        assert long["error"]["code"] == "context_length_exceeded"
        # Every agent failing fails the request with that error.
        body["agents"][0]["role"] = body["agents"][1]["role"]
        r = client.post("/swarm", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
