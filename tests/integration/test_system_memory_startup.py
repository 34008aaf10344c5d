"""/system/memory lists every configured pipeline from start-up, with what was learned
about it before a restart, though none is loaded yet. Real apps, real state files;
the learned runs are given numbers (as measured runs would record them)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import wait_ready


def test_configured_pipelines_and_their_learned_models_show_before_any_request(
    make_settings, tiny_pipelines
) -> None:
    settings = make_settings(
        generation={
            kind: {"pipeline": str(tiny_pipelines[kind]), "required_ram_mb": 64}
            for kind in ("image", "video")
        },
        memory={"learn_after": 3},
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        registry = client.app.state.pipelines
        key = registry.model_key("image", "cpu")
        for size in (1000, 2000, 3000):
            registry.learned.record_run(
                key, "latent elements", size, size / 100, predicted_mb=None, resident_mb=12.0
            )
        registry.learned.save()
    # After a restart, before any request: nothing loaded, everything configured listed.
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        rows = client.get("/system/memory").json()["pipelines"]
    by_kind = {row["kind"]: row for row in rows}
    assert set(by_kind) == {"image", "video"}  # music is not configured
    image, video = by_kind["image"], by_kind["video"]
    assert image["loaded"] is False and image["device"] == "cpu" and image["loads"] == 0
    model = image["memory_model"]
    assert model["learned"] is True and model["samples"] == 3 and model["resident_mb"] == 12.0
    # Never placed and nothing learned: listed on the device it may go to (`auto`).
    assert video["loaded"] is False and video["device"] == "auto"
    assert video["memory_model"] is None and video["folder"] == str(tiny_pipelines["video"])
