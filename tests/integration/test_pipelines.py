"""PipelineHost against real tiny diffusers pipelines on the CPU (random weights, offline)."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from services.demo.tiny_pipelines import MUSIC_MAX_DURATION_S, write_tiny_pipeline  # noqa: E402
from services.errors import Cancelled, ModelUnavailable  # noqa: E402
from services.generation.params import GenerationParams  # noqa: E402
from services.generation.pipelines import PipelineHost, PipelineOOM  # noqa: E402
from services.generation.placement_ladder import RungPlan  # noqa: E402
from tests.helpers import cuda_oom_first  # noqa: E402

HOP = 128  # the tiny music VAE's samples per latent frame


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: write_tiny_pipeline(kind, root / kind) for kind in ("image", "video", "music")}


@pytest.fixture(scope="module")
def hosts(folders, tmp_path_factory) -> dict[str, PipelineHost]:
    out = tmp_path_factory.mktemp("outputs")
    made = {kind: PipelineHost(kind, folder, "cpu", out) for kind, folder in folders.items()}
    yield made
    for host in made.values():
        host.unload()


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_image_writes_one_png_per_image_at_the_asked_size(hosts):
    steps: list[tuple[int, int]] = []
    params = GenerationParams("a cat", steps=2, width=48, height=32, num_images=2, seed=1)
    result = hosts["image"].run(params, on_step=lambda done, total: steps.append((done, total)))

    assert len(result.outputs) == 2
    for out in result.outputs:
        assert out.path.is_file() and out.path.parent == hosts["image"].outputs_dir
        assert out.media_type == "image/png"
        with Image.open(out.path) as im:
            assert (im.format, im.size) == ("PNG", (48, 32))
        assert out.meta == {"width": 48, "height": 32}
    assert len({out.name for out in result.outputs}) == 2
    assert steps == [(1, 2), (2, 2)]
    assert result.seed == 1 and result.used_savers is False


def test_video_mp4_has_the_asked_frame_count(hosts):
    import imageio.v3 as iio

    steps: list[tuple[int, int]] = []
    params = GenerationParams("a cat", steps=2, width=32, height=32, num_frames=6, fps=6, seed=2)
    result = hosts["video"].run(params, on_step=lambda done, total: steps.append((done, total)))

    (out,) = result.outputs
    assert out.name.endswith(".mp4") and out.media_type == "video/mp4"
    frames = list(iio.imiter(out.path, plugin="FFMPEG"))
    assert len(frames) == 6
    assert frames[0].shape[:2] == (32, 32)
    assert out.meta["frames"] == 6 and out.meta["fps"] == 6
    assert steps == [(1, 2), (2, 2)]


def test_video_gif_option(hosts):
    params = GenerationParams(
        "a cat", steps=1, width=32, height=32, num_frames=4, fps=4, video_format="gif", seed=3
    )
    (out,) = hosts["video"].run(params).outputs

    assert out.name.endswith(".gif") and out.media_type == "image/gif"
    with Image.open(out.path) as im:
        assert im.format == "GIF" and im.size == (32, 32)
        assert im.n_frames == 4
        assert im.info["duration"] == 250  # 1000 ms / 4 fps


@pytest.mark.parametrize("duration_s", [2.5, 16.0])
def test_music_wav_has_the_asked_duration_and_the_pipeline_rate(hosts, duration_s):
    host = hosts["music"]
    steps: list[tuple[int, int]] = []
    params = GenerationParams("piano", steps=2, duration_s=duration_s, seed=4)
    (out,) = host.run(params, on_step=lambda done, total: steps.append((done, total))).outputs

    rate = host._pipe.vae.config.sampling_rate
    assert out.media_type == "audio/wav" and out.name.endswith(".wav")
    with wave.open(str(out.path), "rb") as w:
        assert w.getframerate() == rate == out.meta["sample_rate"]
        assert w.getsampwidth() == 2  # 16-bit PCM
        assert w.getnchannels() == 2
        assert abs(w.getnframes() - duration_s * rate) <= HOP
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert np.any(pcm != 0)  # really audio, not a silent file
    assert steps == [(1, 2), (2, 2)]  # StableAudio reports through the older `callback` hook


def test_music_max_duration_covers_the_demo_config(hosts):
    hosts["music"].load()
    assert hosts["music"].describe().max_duration_s == MUSIC_MAX_DURATION_S >= 16.0


@pytest.mark.parametrize("kind", ["image", "music"])
def test_should_cancel_stops_at_a_step_end(hosts, kind):
    host = hosts[kind]
    steps: list[tuple[int, int]] = []
    before = set(host.outputs_dir.iterdir())
    params = GenerationParams("a cat", steps=3, width=32, height=32, duration_s=1.0, seed=5)

    with pytest.raises(Cancelled):
        host.run(
            params,
            on_step=lambda done, total: steps.append((done, total)),
            should_cancel=lambda: len(steps) >= 1,
        )
    assert steps == [(1, 3)]
    assert set(host.outputs_dir.iterdir()) == before  # nothing written for a cancelled run


def test_missing_folder_is_model_unavailable(tmp_path):
    host = PipelineHost("video", tmp_path / "nope", "cpu", tmp_path / "out")

    with pytest.raises(ModelUnavailable) as info:
        host.run(GenerationParams("a cat", steps=1))
    assert "video" in info.value.message
    assert info.value.details["kind"] == "video"
    assert host.loaded is False
    assert host.describe().load_error is not None


def test_broken_folder_is_model_unavailable(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    host = PipelineHost("image", tmp_path, "cpu", tmp_path / "out")

    with pytest.raises(ModelUnavailable, match="image"):
        host.load()
    assert host.loaded is False


def test_a_seed_gives_the_same_image_and_no_seed_reports_the_one_chosen(hosts):
    host = hosts["image"]
    params = GenerationParams("a dog", steps=2, width=32, height=32, seed=1234)
    first = host.run(params).outputs[0].path
    second = host.run(params).outputs[0].path
    assert first != second
    assert np.array_equal(_pixels(first), _pixels(second))

    chosen = host.run(GenerationParams("a dog", steps=2, width=32, height=32))
    assert isinstance(chosen.seed, int) and chosen.seed >= 0
    again = host.run(GenerationParams("a dog", steps=2, width=32, height=32, seed=chosen.seed))
    assert np.array_equal(_pixels(chosen.outputs[0].path), _pixels(again.outputs[0].path))


def test_oom_is_reported_and_a_retry_at_vae_tiling_succeeds(folders, tmp_path, monkeypatch):
    host = PipelineHost("image", folders["image"], "cpu", tmp_path)
    host.load()
    # This CPU machine cannot run out of GPU memory: the first pipeline call raises the
    # error torch raises on a full card; the second call runs the real pipeline.
    calls = cuda_oom_first(monkeypatch, type(host._pipe))
    params = GenerationParams("a cat", steps=1, width=32, height=32, seed=6)

    with pytest.raises(PipelineOOM) as info:
        host.run(params)
    assert info.value.details["kind"] == "image"
    assert host.loaded is True  # the caller decides whether to unload

    result = host.run(params, plan=RungPlan("vae_tiling"))  # the next rung down
    assert result.used_savers is True
    assert calls["n"] == 2 and len(result.outputs) == 1 and result.outputs[0].path.is_file()
    assert host.describe().placement == "vae_tiling" and host.loads == 1  # toggled in place
    assert host._pipe.vae.use_slicing and host._pipe.vae.use_tiling

    back = host.run(params, plan=RungPlan("full"))  # full speed again for an ordinary run
    assert back.used_savers is False and host.describe().placement == "full"
    assert not host._pipe.vae.use_slicing and not host._pipe.vae.use_tiling
    host.unload()


def test_unload_then_run_loads_again(folders, tmp_path):
    host = PipelineHost("music", folders["music"], "cpu", tmp_path)
    host.load()
    info = host.describe()
    assert host.loaded and info.class_name == "StableAudioPipeline"
    assert info.dtype == "float32" and info.device == "cpu" and info.loads == 1
    # What the pipeline holds is measured from its modules' tensors.
    held = sum(
        t.numel() * t.element_size()
        for m in host._pipe.components.values()
        if isinstance(m, torch.nn.Module)
        for t in (*m.parameters(), *m.buffers())
    )
    assert info.weights_mb == pytest.approx(held / 2**20, abs=0.01) and info.weights_mb > 0
    host.unload()
    info = host.describe()
    assert host.loaded is False and info.class_name is None and info.weights_mb is None

    result = host.run(GenerationParams("piano", steps=1, duration_s=0.5, seed=7))
    assert host.loaded is True and len(result.outputs) == 1
    assert host.last_used_at > 0 and host.describe().loads == 2
    host.unload()


def test_tiny_pipeline_folder_reloads_with_diffusion_pipeline(folders):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folders["video"])
    assert type(pipe).__name__ == "AnimateDiffPipeline"
    size = sum(f.stat().st_size for f in folders["video"].rglob("*") if f.is_file())
    assert size < 12 * 1024 * 1024
