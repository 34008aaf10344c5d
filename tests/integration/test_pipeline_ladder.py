"""The placement ladder with real tiny pipelines on the CPU (random weights, offline).

diffusers' hooks run here with the CPU as both onload and offload device, so every rung
really applies and really runs. What cannot exist here stands in, and only that: a GPU
that reports given numbers (FakeGpuProbe, with every placed ``cuda:0`` run on the CPU)
and torch's CUDA out-of-memory error, raised by the pipeline's call as a full card would
(tests/helpers.py ``cuda_oom_first``).
"""

from __future__ import annotations

import io
import logging
import os
import wave
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from app.main import create_app  # noqa: E402
from services.generation.params import GenerationParams  # noqa: E402
from services.generation.pipelines import PipelineHost  # noqa: E402
from services.generation.placement_ladder import ORDER, RungPlan  # noqa: E402
from tests.helpers import FakeGpuProbe, cuda_oom_first, wait_ready  # noqa: E402

PARAMS = {
    # 16 px: within the tiny VAE's tile, so VAE tiling decodes the same pixels
    "image": GenerationParams("a cat", steps=2, width=16, height=16, seed=11),
    "video": GenerationParams("a cat", steps=1, width=16, height=16, num_frames=2, fps=4, seed=12),
    "music": GenerationParams("piano", steps=2, duration_s=0.5, seed=13),
}
# fp8 stores the denoiser's weights in 8 bits: close to full residency, not equal.
FP8_TOLERANCE = {"image": 24, "video": 24, "music": 400}  # of 255 / of 32767


def _samples(path: Path) -> np.ndarray:
    if path.suffix == ".wav":
        with wave.open(str(path), "rb") as w:
            return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int32)
    if path.suffix == ".mp4":
        import imageio.v3 as iio

        return np.stack(list(iio.imiter(path, plugin="FFMPEG"))).astype(np.int32)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int32)


def _run_at(kind: str, folder: Path, out: Path, rung: str) -> tuple[np.ndarray, PipelineHost]:
    host = PipelineHost(kind, folder, "cpu", out)
    try:
        result = host.run(PARAMS[kind], plan=RungPlan(rung))
        assert host.describe().placement == rung
        return _samples(result.outputs[0].path), host
    finally:
        host.unload()


@pytest.fixture(scope="module")
def full_outputs(tiny_pipelines, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("full")
    return {k: _run_at(k, tiny_pipelines[k], out, "full")[0] for k in ("image", "music", "video")}


CASES = [("image", r) for r in ORDER[1:]] + [("music", r) for r in ORDER[1:]]
CASES += [("video", "offload_blocks"), ("video", "offload_model")]


@pytest.mark.parametrize("kind, rung", CASES)
def test_each_rung_gives_full_residencys_output(
    kind, rung, tiny_pipelines, full_outputs, tmp_path
) -> None:
    got, host = _run_at(kind, tiny_pipelines[kind], tmp_path, rung)
    want = full_outputs[kind]
    assert got.shape == want.shape
    if rung == "fp8":
        diff = np.abs(got - want)
        assert 0 < diff.max() <= FP8_TOLERANCE[kind]  # really stored in 8 bits, and close
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
    else:  # the same computation, maybe in another order: one step of rounding at most
        assert np.abs(got - want).max() <= 1
    if rung in ("offload_blocks", "sequential") and kind == "music":
        # StableAudio's Oobleck VAE refuses group offload: it stays whole, the rest moves.
        assert host.plan is not None and host.plan.rung == rung


def _fake_gpu_app(
    make_settings, tiny_pipelines, card_mb: float, reserve_ram_mb: int = 0, preload: bool = False
):
    """An app on a GPU of ``card_mb`` that reports given numbers; its ``cuda:0`` runs on
    the CPU. The tiny image pipeline's weights are 6.4 MB in float32."""
    settings = make_settings(
        memory={"reserve_vram_mb": 0, "reserve_ram_mb": reserve_ram_mb},
        generation={
            "image": {
                "pipeline": str(tiny_pipelines["image"]),
                "required_vram_mb": 1,
                "default_steps": 2,
                "fp8": "off",
                "preload": preload,
            }
        },
    )
    probe = FakeGpuProbe(total_mb=card_mb)
    return create_app(settings, probe=probe, pipeline_run_device=lambda device: "cpu"), probe


BODY = {"prompt": "a cat", "width": 32, "height": 32, "steps": 2, "seed": 3}


def test_a_pipeline_larger_than_the_card_runs_at_block_offload_and_learns_that_rung(
    make_settings, tiny_pipelines
) -> None:
    app, probe = _fake_gpu_app(make_settings, tiny_pipelines, card_mb=5)
    with TestClient(app) as client:
        wait_ready(client)
        gates = []
        for _ in range(2):
            r = client.post("/generate-image", json=BODY)
            assert r.status_code == 200, r.text
            gates.append(gate := r.json()["gate"])
            assert gate["device"] == "cuda:0" and gate["rung"] == "offload_blocks"
            assert (
                "offload_blocks (nothing resident) is the fastest rung that fits"
                in (gate["rung_because"])
            )
            assert "full needs 6 MB" in gate["rung_because"]
        # Not measured at that rung before the first run: its need was estimated.
        assert gates[0]["need_source"] == "estimated" and "(estimated)" in gates[0]["rung_because"]
        registry = client.app.state.pipelines
        host = registry.host_of("image")
        assert host.weights_mb > probe.total_mb  # the whole pipeline is larger than the card
        memory = client.get("/system/memory").json()
        [row] = [p for p in memory["pipelines"] if p["kind"] == "image" and p["loaded"]]
        assert row["placement"] == "offload_blocks"
        assert row["placement_detail"] == "offload_blocks (nothing resident)"
        decision = memory["gate"]["last_decisions"][-1]
        assert decision["rung"] == "offload_blocks"
        # Learned under that rung's own key; full residency's model has no run.
        blocks = registry.learned.view(registry.model_key("image", "cuda:0", "offload_blocks"))
        assert blocks is not None and blocks.samples + blocks.dropped == 2
        full = registry.learned.view(registry.model_key("image", "cuda:0"))
        assert full is None or full.samples == 0
        assert len(registry.speeds.samples[blocks.key]) == 1  # the first run loads kernels


def test_a_preload_larger_than_the_card_warms_at_the_rung_that_fits(
    make_settings, tiny_pipelines
) -> None:
    """The start-up warm-up walks the same ladder as a request: at full residency the
    6.4 MB pipeline would not fit the 5 MB card."""
    app, _ = _fake_gpu_app(make_settings, tiny_pipelines, card_mb=5, preload=True)
    with TestClient(app) as client:
        wait_ready(client)
        assert "image warmed in" in client.get("/ready").json()["detail"]
        registry = client.app.state.pipelines
        host = registry.host_of("image")
        assert host.loaded and host.describe().placement == "offload_blocks"
        decision = client.get("/system/memory").json()["gate"]["last_decisions"][-1]
        assert decision["rung"] == "offload_blocks" and "warm-up" in decision["reason"]
        # A warm-up teaches nothing (a first run loads kernels too).
        key = registry.model_key("image", "cuda:0", "offload_blocks")
        assert registry.learned.view(key) is None or registry.learned.view(key).samples == 0
        r = client.post("/generate-image", json=BODY)
        assert r.status_code == 200, r.text
        assert r.json()["gate"]["rung"] == "offload_blocks"
        assert r.json()["timings_ms"]["warmup"] is None and host.loads == 1


def test_a_rung_the_model_cannot_take_is_marked_and_skipped(
    make_settings, tiny_pipelines, monkeypatch, caplog
) -> None:
    import diffusers

    app, _ = _fake_gpu_app(make_settings, tiny_pipelines, card_mb=5)
    with TestClient(app) as client, caplog.at_level(logging.WARNING, "edison.generation"):
        wait_ready(client)
        registry = client.app.state.pipelines
        client.portal.call(registry.shape, "image")  # the headers said it could
        # ...and the loaded model refuses group offload, as a model whose forward casts
        # by weight device does.
        monkeypatch.setattr(diffusers.UNet2DConditionModel, "_supports_group_offloading", False)
        r = client.post("/generate-image", json=BODY)
        assert r.status_code == 200, r.text
        assert r.json()["gate"]["rung"] == "offload_blocks"
        host = registry.host_of("image")
        assert host.describe().placement == "offload_model"  # the next rung down
        assert "offload_blocks marked unsupported" in caplog.text
        memory = client.get("/system/memory").json()
        [row] = [p for p in memory["pipelines"] if p["kind"] == "image" and p["loaded"]]
        assert "does not support group offload" in row["unsupported_rungs"]["offload_blocks"]
        again = client.post("/generate-image", json=BODY)
        assert again.status_code == 200 and again.json()["gate"]["rung"] == "offload_model"
        assert host.loads == 1  # the second request found it at its rung
    # A restart remembers the mark (same folder, same diffusers): shown before any load,
    # and the first request's gate skips straight past the rung.
    app, _ = _fake_gpu_app(make_settings, tiny_pipelines, card_mb=5)
    with TestClient(app) as client:
        wait_ready(client)
        memory = client.get("/system/memory").json()
        [row] = [p for p in memory["pipelines"] if p["kind"] == "image"]
        assert not row["loaded"] and "offload_blocks" in row["unsupported_rungs"]
        r = client.post("/generate-image", json=BODY)
        assert r.status_code == 200, r.text
        assert r.json()["gate"]["rung"] == "offload_model"
        assert "offload_blocks: unsupported" in r.json()["gate"]["rung_because"]


def test_fitting_no_rung_is_503_at_once_naming_the_figures(make_settings, tiny_pipelines):
    """A 5 MB card below the weights, and no RAM to offload them to (the whole of it
    reserved): not even leaf offload fits."""
    app, _ = _fake_gpu_app(make_settings, tiny_pipelines, card_mb=5, reserve_ram_mb=1_048_576)
    with TestClient(app) as client:
        wait_ready(client)
        r = client.post("/generate-image", json=BODY)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert "no rung fits: the smallest, sequential, needs" in error["message"]
        assert "MB of RAM" in error["message"]
        host = client.app.state.pipelines.host_of("image")
        assert host is None or host.loads == 0  # nothing loaded: never an out-of-memory


def test_an_oom_steps_down_the_ladder_and_each_failure_is_learned(
    make_settings, tiny_pipelines, monkeypatch, caplog
) -> None:
    import diffusers

    settings = make_settings(
        generation={
            "image": {
                "pipeline": str(tiny_pipelines["image"]),
                "required_ram_mb": 64,
                "default_steps": 2,
            }
        }
    )
    calls = cuda_oom_first(monkeypatch, diffusers.StableDiffusionPipeline, times=2)
    with TestClient(create_app(settings)) as client, caplog.at_level(logging.WARNING):
        wait_ready(client)
        r = client.post("/generate-image", json=BODY)
        assert r.status_code == 200, r.text
        assert calls["n"] == 3 and r.json()["gate"]["rung"] == "full"
        registry = client.app.state.pipelines
        assert registry.host_of("image").describe().placement == "fp8"  # full, vae, fp8
        assert "out of memory at full in image: a cat: stepping down to vae_tiling" in caplog.text
        marks = {
            rung: (registry.learned.view(registry.model_key("image", "cpu", rung)) or None)
            for rung in ("full", "vae_tiling", "fp8")
        }
        assert marks["full"].oom_marks == 1 and marks["vae_tiling"].oom_marks == 1
        assert marks["fp8"].oom_marks == 0 and marks["fp8"].samples + marks["fp8"].dropped == 1
        # Every rung the CPU allows running out: 503 naming each one.
        more = cuda_oom_first(monkeypatch, diffusers.StableDiffusionPipeline, times=9)
        r = client.post("/generate-image", json={**BODY, "seed": 4})
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "ran out of memory at every rung" in message
        assert more["n"] >= 1 and "fp8: out of memory" in message


def test_a_pinned_placement_runs_at_that_rung(make_settings, tiny_pipelines) -> None:
    settings = make_settings(
        generation={
            "music": {
                "pipeline": str(tiny_pipelines["music"]),
                "required_ram_mb": 64,
                "default_steps": 2,
                "placement": "sequential",
            }
        }
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = client.post("/generate-music", json={"prompt": "piano", "duration_s": 0.5})
        assert r.status_code == 200, r.text
        assert r.json()["gate"]["rung"] == "sequential"
        wav = client.get(r.json()["outputs"][0]["url"])
        with wave.open(io.BytesIO(wav.content)) as w:
            assert w.getnframes() > 0
        host = client.app.state.pipelines.host_of("music")
        assert host.describe().placement == "sequential"
