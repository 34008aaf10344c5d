"""The tiny family folders load as users' folders do and run bare in diffusers (CPU, float32).

Each folder is written by services.demo.tiny_families (random weights, no download) and
reloaded with ``DiffusionPipeline.from_pretrained``; one or two steps must give the size,
frame count or audio length asked. A second table checks that each folder keeps its
family's geometry (VAE scale x patch size, temporal compression, sample rate), which is
what Edison's request checks read. ``tiny_family_dir`` (tests/families_fixture.py) comes
through tests/integration/conftest.py; torch runs on one thread (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from services.demo.tiny_families import _BUILDERS, FAMILIES, write_tiny_family  # noqa: E402

W, H = 64, 48  # not square, so a swapped width and height shows


def _image() -> Image.Image:
    return Image.new("RGB", (W, H), (200, 40, 90))


# name -> (pipeline class, call arguments besides prompt/steps/generator)
CALLS: dict[str, tuple[str, dict[str, Any]]] = {
    "sdxl": ("StableDiffusionXLPipeline", {"height": H, "width": W}),
    "sd3": ("StableDiffusion3Pipeline", {"height": H, "width": W}),
    "flux": ("FluxPipeline", {"height": H, "width": W}),
    "qwen-image": ("QwenImagePipeline", {"height": H, "width": W, "negative_prompt": "dog"}),
    # LTX takes multiples of 32, and LTX-2 two latent pixels at least (its decoder pads by
    # reflection: 32 pixels fail).
    "ltx": ("LTXPipeline", {"height": 64, "width": 96, "num_frames": 9, "frame_rate": 24}),
    "ltx2": ("LTX2Pipeline", {"height": 64, "width": 96, "num_frames": 9, "frame_rate": 24}),
    "wan-t2v": ("WanPipeline", {"height": H, "width": W, "num_frames": 9}),
    "wan-i2v": ("WanImageToVideoPipeline", {"height": H, "width": W, "num_frames": 5}),
    "cogvideox": ("CogVideoXPipeline", {"height": H, "width": W, "num_frames": 9}),
    "svd": ("StableVideoDiffusionPipeline", {"height": H, "width": W, "num_frames": 3}),
    "stable-audio": ("StableAudioPipeline", {"audio_end_in_s": 1.0}),
    "ace-step": ("AceStepPipeline", {"audio_duration": 1.0, "lyrics": "[verse]\nthe cat"}),
    "audioldm2": ("AudioLDM2Pipeline", {"audio_length_in_s": 1.0}),
}


def test_every_family_has_a_builder_and_a_call() -> None:
    assert sorted(_BUILDERS) == sorted(CALLS) == sorted(FAMILIES)


def _load(folder: Path):
    from diffusers import DiffusionPipeline

    # Why dtype: without it diffusers' models load in float32 but transformers' ones in the
    # dtype they were saved in. (`torch_dtype` is the older name, deprecated in diffusers 0.42.)
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(frames: Any) -> tuple[int, tuple[int, int]]:
    """(frame count, (width, height)) of one video from a pipeline's ``frames``."""
    video = frames[0]
    if isinstance(video, list):  # PIL frames
        return len(video), video[0].size
    return video.shape[0], (video.shape[2], video.shape[1])  # numpy (frames, h, w, c)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_bare_call_gives_what_was_asked(
    name: str,
    tiny_family_dir,
) -> None:
    pipe = _load(tiny_family_dir(name))
    class_name, asked = CALLS[name]
    assert type(pipe).__name__ == class_name
    kwargs: dict[str, Any] = {"num_inference_steps": 2, "generator": torch.manual_seed(0)}
    if name != "svd":  # SVD takes no prompt
        kwargs["prompt"] = "a cat"
    if name in ("svd", "wan-i2v"):
        kwargs["image"] = _image()
    out = pipe(**kwargs, **asked)

    kind = FAMILIES[name]
    if kind == "image":
        assert out.images[0].size == (W, H)
    elif kind == "video":
        assert _frames(out.frames) == (asked["num_frames"], (asked["width"], asked["height"]))
        if name == "ltx2":
            # The audio track: (batch, channels, samples) at the vocoder's rate. It comes out
            # a few mel frames short of the video (LTX-2's causal audio VAE), never longer.
            rate = pipe.vocoder.config.output_sampling_rate
            batch, channels, samples = out.audio.shape
            assert (batch, channels, rate) == (1, 2, 24_000)
            video_s = asked["num_frames"] / asked["frame_rate"]
            assert video_s - 0.1 < samples / rate <= video_s
    else:
        assert _sample_rate(pipe) == AUDIO_RATES[name]
        rate = AUDIO_RATES[name]
        assert out.audios.shape[0] == 1
        assert out.audios.shape[-1] == rate * 1  # one second, exactly


# The sample rate each music folder states: ACE-Step 1.5's and AudioLDM2's own; the demo's
# Stable Audio folder runs at 16 kHz (Stable Audio Open: 44.1 kHz).
AUDIO_RATES = {"stable-audio": 16_000, "ace-step": 48_000, "audioldm2": 16_000}


def _sample_rate(pipe) -> int:
    """The output sample rate, from the component each music pipeline takes it from."""
    name = type(pipe).__name__
    if name == "AudioLDM2Pipeline":
        return pipe.vocoder.config.sampling_rate
    return pipe.vae.config.sampling_rate  # Stable Audio and ACE-Step: the Oobleck VAE's


# name -> (spatial multiple, temporal compression or None): the published families' own.
GEOMETRY: dict[str, tuple[int, int | None]] = {
    "sdxl": (8, None),
    "sd3": (16, None),
    "flux": (16, None),
    "qwen-image": (16, None),
    "ltx": (32, 8),
    "ltx2": (32, 8),
    "wan-t2v": (16, 4),
    "wan-i2v": (16, 4),
    "cogvideox": (16, 4),
    "svd": (8, None),
}


def _spatial_multiple(pipe) -> int:
    """VAE scale x patch size, read the way each pipeline reads it."""
    name = type(pipe).__name__
    if name.startswith("LTX"):
        return pipe.vae.spatial_compression_ratio * pipe.transformer.config.patch_size
    if name.startswith("Wan"):
        return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    if name.startswith("CogVideoX"):
        return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size
    if name.startswith(("Flux", "QwenImage")):
        return pipe.vae_scale_factor * 2  # latents packed 2x2
    if name == "StableDiffusion3Pipeline":
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size
    return pipe.vae_scale_factor  # UNets take any latent size


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_each_folder_keeps_its_familys_geometry(
    name: str,
    tiny_family_dir,
) -> None:
    pipe = _load(tiny_family_dir(name))
    multiple, temporal = GEOMETRY[name]
    assert _spatial_multiple(pipe) == multiple
    if temporal is not None:
        if name.startswith("ltx"):
            assert pipe.vae_temporal_compression_ratio == temporal
        else:
            assert pipe.vae_scale_factor_temporal == temporal


def _weight_dtypes(path: Path) -> set[str]:
    """The tensor dtypes a safetensors file states in its header (no weights read)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_a_folder_can_state_a_published_dtype(tmp_path: Path) -> None:
    folder = write_tiny_family("sd3", tmp_path / "sd3", dtype="bfloat16")
    assert _weight_dtypes(folder / "transformer" / "diffusion_pytorch_model.safetensors") == {
        "BF16"
    }
    assert json.loads((folder / "text_encoder_3" / "config.json").read_text())["dtype"] == (
        "bfloat16"
    )
    pipe = _load(folder)
    assert pipe.transformer.dtype == pipe.text_encoder_3.dtype == torch.float32


def test_writing_is_seeded_and_done_once(tmp_path: Path) -> None:
    a = write_tiny_family("sd3", tmp_path / "a")
    b = write_tiny_family("sd3", tmp_path / "b")
    weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
    assert (a / weights).read_bytes() == (b / weights).read_bytes()
    stamp = (a / weights).stat().st_mtime_ns
    assert write_tiny_family("sd3", a) == a
    assert (a / weights).stat().st_mtime_ns == stamp


def test_an_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family 'sdxl-turbo'"):
        write_tiny_family("sdxl-turbo", tmp_path / "x")
    assert not (tmp_path / "x").exists()
