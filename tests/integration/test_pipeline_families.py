"""Every family's tiny random-weight folder through the HTTP API, on the CPU.

Each folder is written by the project itself (services/demo/tiny_families.py) from its
architecture's own config. Each family gets exactly the size, frames or duration asked,
or a 422 naming the field with the valid neighbours; image-to-video works with a data URL
and refuses without one; lyrics and durations reach the music pipelines; LTX-2's audio
track is in the MP4. Slow (a pipeline per family): marked ``slow``, still run by
``make test``.
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import wave
from pathlib import Path

import imageio.v3 as iio
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from services.demo.tiny_families import FAMILIES
from tests.helpers import wait_ready

pytestmark = pytest.mark.slow


@pytest.fixture
def family_dir(tiny_family_dir):
    """The folders of tests/families_fixture.py (written once per session)."""
    return tiny_family_dir


@pytest.fixture
def client_for(make_settings, family_dir):
    clients: list[TestClient] = []

    def start(name: str, **cfg) -> TestClient:
        kind = FAMILIES[name]
        settings = make_settings(
            generation={
                kind: {
                    "pipeline": str(family_dir(name)),
                    "required_ram_mb": 64,
                    "default_steps": 1,  # LTX runs 2: its scheduler needs them
                    **cfg,
                }
            }
        )
        client = TestClient(create_app(settings)).__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    yield start
    for c in clients:
        c.__exit__(None, None, None)


def caps_of(client: TestClient, kind: str) -> dict:
    pipes = client.get("/system/memory").json()["pipelines"]
    return next(p["caps"] for p in pipes if p["kind"] == kind and p["caps"])


def png_url(w: int = 32, h: int = 32) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 80, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def fetch(client: TestClient, out: dict) -> bytes:
    r = client.get(out["url"])
    assert r.status_code == 200
    return r.content


def ffmpeg_streams(data: bytes, tmp_path: Path) -> str:
    """What ffmpeg says the file holds (its stream lines)."""
    import imageio_ffmpeg

    path = tmp_path / "probe.mp4"
    path.write_bytes(data)
    run = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
        capture_output=True,
        text=True,
    )
    return "\n".join(line for line in run.stderr.splitlines() if "Stream #" in line)


IMAGE = [n for n, k in FAMILIES.items() if k == "image"]
VIDEO = [n for n, k in FAMILIES.items() if k == "video"]


@pytest.mark.parametrize("name", IMAGE)
def test_image_family_makes_the_size_asked_or_names_the_field(name, client_for) -> None:
    client = client_for(name)
    caps = caps_of(client, "image")
    m = caps["size_multiple"]
    w, h = 4 * m if m < 16 else 3 * m, 2 * m
    r = client.post("/generate-image", json={"prompt": "a red cat", "width": w, "height": h})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert (
        Image.open(io.BytesIO(fetch(client, out))).size == (w, h) == (out["width"], out["height"])
    )

    r = client.post("/generate-image", json={"prompt": "x", "width": w + m // 2, "height": h})
    assert r.status_code == 422, r.text
    field = r.json()["error"]["fields"][0]
    assert field["field"] == "width" and field["nearest"] == [w, w + m]


@pytest.mark.parametrize("name", VIDEO)
def test_video_family_makes_the_frames_and_size_asked(name, client_for, tmp_path) -> None:
    client = client_for(name)
    caps = caps_of(client, "video")
    m, step = caps["size_multiple"], caps["frame_rule"]["step"]
    frames = step + 1 if step > 1 else 3
    body = {"prompt": "waves", "width": 3 * m, "height": 2 * m, "num_frames": frames, "fps": 8}
    if caps["inputs"]["image_required"]:
        r = client.post("/generate-video", json={**body, "prompt": None})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] in (
            "image",
            "prompt",
        )
        body["image"] = png_url()
        if not caps["inputs"]["prompt"]:
            body.pop("prompt")
    r = client.post("/generate-video", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    data = fetch(client, out)
    video = iio.imread(data, index=None, extension=".mp4")
    assert video.shape[:3] == (frames, 2 * m, 3 * m), video.shape
    assert out["frames"] == frames
    streams = ffmpeg_streams(data, tmp_path)
    assert ("Audio:" in streams) == caps["video_audio"], streams

    if step > 1:
        r = client.post("/generate-video", json={**body, "num_frames": step + 2})
        assert r.status_code == 422, r.text
        field = r.json()["error"]["fields"][0]
        assert field["field"] == "num_frames" and field["nearest"] == [step + 1, 2 * step + 1]
        r = client.post(
            "/generate-video", json={**body, "num_frames": step + 2, "round_to_valid": True}
        )
        assert r.status_code == 200, r.text
        assert r.json()["adjustments"] == [
            {"field": "num_frames", "asked": step + 2, "used": step + 1}
        ]
        assert r.json()["outputs"][0]["frames"] == step + 1


def test_ltx2_mp4_carries_its_audio_track(client_for, tmp_path) -> None:
    client = client_for("ltx2")
    caps = caps_of(client, "video")
    assert caps["video_audio"] and caps["sample_rate"]
    m = caps["size_multiple"]
    body = {"prompt": "rain", "width": 2 * m, "height": 2 * m, "fps": 8}
    r = client.post("/generate-video", json=body)
    assert r.status_code == 200, r.text
    streams = ffmpeg_streams(fetch(client, r.json()["outputs"][0]), tmp_path)
    assert re.search(r"Audio: aac", streams), streams


def test_wan_image_to_video_refuses_inputs_it_cannot_use(client_for) -> None:
    """Wan 2.1 I2V (a CLIP image encoder, no FLF2V position embeddings) cannot use a last
    frame: diffusers would fail deep in the transformer, Edison answers 422 first."""
    client = client_for("wan-i2v")
    caps = caps_of(client, "video")
    assert caps["inputs"]["image_required"] and not caps["inputs"]["last_image"]
    m = caps["size_multiple"]
    body = {"prompt": "a boat", "width": 2 * m, "height": 2 * m, "num_frames": 5}
    r = client.post("/generate-video", json={**body, "image": "data:image/png;base64,AAAA"})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "image"
    r = client.post("/generate-video", json={**body, "image": png_url(), "last_image": png_url()})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "last_image"


def wav_info(data: bytes) -> tuple[float, int]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate(), w.getframerate()


@pytest.mark.parametrize("name", ["stable-audio", "ace-step", "audioldm2"])
def test_music_family_makes_the_duration_asked(name, client_for) -> None:
    client = client_for(name)
    caps = caps_of(client, "music")
    assert caps["duration_param"], caps
    body = {"prompt": "calm piano", "duration_s": 1.5}
    if caps["inputs"]["lyrics"]:
        body["lyrics"] = "[verse]\nla la la"
    r = client.post("/generate-music", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    seconds, rate = wav_info(fetch(client, out))
    assert abs(seconds - 1.5) < 0.01 and rate == out["sample_rate"] == caps["sample_rate"]
    if not caps["inputs"]["lyrics"]:
        r = client.post("/generate-music", json={**body, "lyrics": "la"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "lyrics"


def test_call_arguments_reach_each_pipeline_under_its_own_name(family_dir) -> None:
    """The request's fps and duration go to the argument each pipeline really has (read
    from the real folders): LTX's frame_rate, ACE-Step's audio_duration."""
    from services.generation.calls import call_kwargs
    from services.generation.capabilities import read_caps
    from services.generation.params import GenerationParams

    ltx = read_caps("video", family_dir("ltx"))
    kw = call_kwargs(ltx, GenerationParams("x", steps=1, num_frames=9, fps=12), 0)
    assert kw["frame_rate"] == 12 and kw["num_frames"] == 9
    ace = read_caps("music", family_dir("ace-step"))
    kw = call_kwargs(ace, GenerationParams("x", steps=1, duration_s=3.0, lyrics="la"), 0)
    assert kw["audio_duration"] == 3.0 and kw["lyrics"] == "la"


def test_a_folder_in_bfloat16_says_so_and_auto_picks_it_on_a_gpu(family_dir, tmp_path) -> None:
    import torch
    from diffusers import DiffusionPipeline

    from services.generation.capabilities import choose_dtype, read_caps

    pipe = DiffusionPipeline.from_pretrained(family_dir("flux"))
    pipe.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    caps = read_caps("image", tmp_path / "bf16")
    assert caps.published_dtype == "bfloat16"
    assert choose_dtype("auto", caps, "cuda:0")[0] == "bfloat16"
    assert choose_dtype("auto", caps, "cpu")[0] == "float32"
    assert read_caps("image", family_dir("flux")).published_dtype is None  # float32 export


def test_guidance_goes_where_each_family_means_it(family_dir) -> None:
    """FLUX.1 [dev] has a distilled guidance (guidance_scale; no negative prompt), Qwen-Image
    a true CFG scale (true_cfg_scale, with a negative prompt): read from the real folders."""
    from services.generation.capabilities import read_caps

    flux, qwen = (
        read_caps("image", family_dir("flux")),
        read_caps("image", family_dir("qwen-image")),
    )
    assert flux.guidance_param == "guidance_scale" and not flux.inputs.negative_prompt
    assert qwen.guidance_param == "true_cfg_scale" and qwen.inputs.negative_prompt
