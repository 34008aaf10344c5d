"""Request checks and dtype choice from a pipeline's capabilities (decision logic given
the facts; the facts themselves are read from real folders in
tests/integration/test_pipeline_families.py)."""

from __future__ import annotations

import dataclasses
import io

import pytest
from PIL import Image

from services.errors import InvalidRequest
from services.generation.capabilities import FrameRule, PipelineCaps, PipelineInputs, choose_dtype
from services.generation.checks import decode_inputs, resolve, warm_params
from services.generation.params import Adjustment, GenerationParams
from services.settings import ImageSettings, MusicSettings, VideoSettings


def caps(**kw) -> PipelineCaps:
    base = dict(
        kind="video",
        folder="/x",
        class_name="WanPipeline",
        denoiser="transformer",
        size_multiple=16,
        frame_rule=FrameRule(4),
        default_width=832,
        default_height=480,
        default_frames=81,
        default_duration_s=None,
        max_duration_s=None,
        sample_rate=None,
        audio_channels=None,
        published_dtype=None,
        inputs=PipelineInputs(negative_prompt=True, guidance=True),
        frame_rate_param=None,
        default_fps=None,
        duration_param=None,
        guidance_param="guidance_scale",
    )
    return PipelineCaps(**{**base, **kw})


VIDEO = VideoSettings(max_pixels=1280 * 720, max_frames=257)


def refused(c: PipelineCaps, cfg, **params) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        resolve(c, cfg, GenerationParams("a boat", **params))
    return info.value


@pytest.mark.parametrize(
    "multiple, value, nearest",
    [(16, 72, [64, 80]), (32, 72, [64, 96]), (8, 60, [56, 64]), (16, 8, [32]), (32, 48, [64])],
)
def test_a_size_off_the_multiple_names_the_field_and_its_neighbours(multiple, value, nearest):
    err = refused(caps(size_multiple=multiple), VIDEO, width=value, height=multiple * 4)
    field = err.details["fields"][0]
    assert field["field"] == "width"
    assert field["nearest"] == nearest
    least = 2 * multiple  # one latent cell a side is too few (LTX-2's VAE padding)
    want = f"at least {least}" if value < least else f"multiple of {multiple}"
    assert want in field["message"]


@pytest.mark.parametrize(
    "step, frames, nearest", [(4, 8, [5, 9]), (8, 8, [1, 9]), (8, 20, [17, 25]), (4, 2, [1, 5])]
)
def test_a_frame_count_off_the_rule_is_refused_with_neighbours(step, frames, nearest):
    err = refused(caps(frame_rule=FrameRule(step)), VIDEO, num_frames=frames)
    field = err.details["fields"][0]
    assert field["field"] == "num_frames" and field["nearest"] == nearest
    assert f"{step}k+1" in field["message"]


def test_round_to_valid_rounds_and_says_what_it_made():
    p, adjusted = resolve(
        caps(size_multiple=32, frame_rule=FrameRule(8)),
        VIDEO,
        GenerationParams("a", width=72, height=56, num_frames=8, round_to_valid=True),
    )
    assert (p.width, p.height, p.num_frames) == (64, 64, 9)
    assert adjusted == [
        Adjustment("width", 72, 64),
        Adjustment("height", 56, 64),
        Adjustment("num_frames", 8, 9),
    ]


def test_defaults_come_from_the_request_then_the_config_then_the_pipeline():
    c = caps(default_fps=25.0)
    p, _ = resolve(c, VIDEO, GenerationParams("a"))
    assert (p.width, p.height, p.num_frames, p.fps) == (832, 480, 81, 25)
    cfg = VideoSettings(default_width=512, default_height=256, default_frames=17)
    p, _ = resolve(c, cfg, GenerationParams("a", height=320, fps=12))
    assert (p.width, p.height, p.num_frames, p.fps) == (512, 320, 17, 12)


def test_a_default_size_above_max_pixels_is_refused_naming_it():
    err = refused(caps(), VideoSettings(max_pixels=256 * 256))
    assert "the pipeline's default size" in err.message and "max_pixels" in err.message


@pytest.mark.parametrize(
    "inputs, params, field",
    [
        (PipelineInputs(image=True, image_required=True), {}, "image"),
        (PipelineInputs(), {"image": b"png"}, "image"),
        (PipelineInputs(image=True), {"last_image": b"x", "image": b"y"}, "last_image"),
        (PipelineInputs(image=True, last_image=True), {"last_image": b"x"}, "image"),
        (PipelineInputs(), {"lyrics": "la la"}, "lyrics"),
        (PipelineInputs(), {"negative_prompt": "blur"}, "negative_prompt"),
        (PipelineInputs(), {"guidance_scale": 3.0}, "guidance_scale"),
    ],
)
def test_inputs_the_pipeline_does_not_take_or_needs(inputs, params, field):
    err = refused(caps(inputs=inputs), VIDEO, **params)
    assert err.details["fields"][0]["field"] == field
    assert "WanPipeline" in err.message


def test_a_pipeline_without_a_prompt_refuses_one_and_others_need_one():
    svd = caps(inputs=PipelineInputs(image=True, image_required=True, prompt=False))
    err = refused(svd, VIDEO, image=b"x")
    assert err.details["fields"][0]["field"] == "prompt"
    p, _ = resolve(svd, VIDEO, GenerationParams("", image=b"x"))
    assert p.image == b"x"
    with pytest.raises(InvalidRequest, match="prompt"):
        resolve(caps(), VIDEO, GenerationParams("  "))


def test_music_duration_defaults_and_limits():
    music = caps(
        kind="music",
        size_multiple=1,
        frame_rule=FrameRule(1),
        default_duration_s=60.0,
        max_duration_s=None,
        duration_param="audio_duration",
    )
    p, _ = resolve(music, MusicSettings(max_duration_s=30), GenerationParams("a"))
    assert p.duration_s == 30  # the pipeline's 60 s default, capped at the maximum
    p, _ = resolve(music, MusicSettings(default_duration_s=12), GenerationParams("a"))
    assert p.duration_s == 12
    short = dataclasses.replace(music, max_duration_s=16.384)
    err = refused(short, MusicSettings(), duration_s=20.0)
    assert err.details["fields"][0]["nearest"] == [16.384]


def png(w: int, h: int, fmt: str = "PNG") -> str:
    import base64

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_input_images_decode_in_each_format(fmt):
    p = decode_inputs("video", VIDEO, GenerationParams("a", image=png(16, 8, fmt)))
    assert isinstance(p.image, bytes)
    assert Image.open(io.BytesIO(p.image)).size == (16, 8)


@pytest.mark.parametrize(
    "url, why",
    [
        ("data:image/png;base64,@@@", "corrupt"),
        ("https://example.com/a.png", "data URL"),
        (png(8, 8, "GIF"), "not a PNG or JPEG or WEBP"),
        (png(80, 80), "generation.video.max_image_pixels"),
    ],
)
def test_bad_input_images_name_the_field(url, why):
    cfg = VideoSettings(max_image_pixels=64 * 64)
    with pytest.raises(InvalidRequest, match=why) as info:
        decode_inputs("video", cfg, GenerationParams("a", last_image=url, image=png(8, 8)))
    assert info.value.details["fields"][0]["field"] == "last_image"


@pytest.mark.parametrize(
    "setting, published, denoiser, device, bf16, want",
    [
        ("auto", None, "transformer", "cpu", True, "float32"),
        ("auto", "bfloat16", "transformer", "cpu", True, "float32"),
        ("auto", "bfloat16", "transformer", "cuda:0", True, "bfloat16"),
        ("auto", "float16", "transformer", "cuda:0", True, "float16"),
        ("auto", None, "transformer", "cuda:0", True, "bfloat16"),
        ("auto", None, "transformer", "cuda:0", False, "float16"),
        ("auto", None, "unet", "cuda:0", True, "float16"),
        ("float32", "bfloat16", "transformer", "cuda:0", True, "float32"),
        ("bfloat16", None, "unet", "cpu", False, "bfloat16"),
    ],
)
def test_dtype_choice(monkeypatch, setting, published, denoiser, device, bf16, want):
    # A double for the one GPU fact: whether the card has bfloat16 (no GPU here).
    monkeypatch.setattr("services.generation.capabilities._bf16_supported", lambda _d: bf16)
    dtype, why = choose_dtype(setting, caps(published_dtype=published, denoiser=denoiser), device)
    assert dtype == want
    assert why


def test_warm_up_params_are_valid_for_the_pipeline():
    c = caps(
        size_multiple=32,
        frame_rule=FrameRule(8),
        inputs=PipelineInputs(image=True, image_required=True),
    )
    p = warm_params(c)
    resolved, adjusted = resolve(c, VIDEO, p)
    assert adjusted == [] and resolved.width % 32 == 0 and (resolved.num_frames - 1) % 8 == 0
    assert Image.open(io.BytesIO(p.image)).size == (p.width, p.height)
    assert ImageSettings().max_image_mb > 0


def test_a_transformers_music_folder_is_refused_at_config_load(tmp_path) -> None:
    from pydantic import ValidationError

    from services.settings import Settings

    (tmp_path / "musicgen").mkdir()
    (tmp_path / "musicgen" / "config.json").write_text('{"model_type": "musicgen"}')
    with pytest.raises(ValidationError, match="transformers model") as info:
        Settings(generation={"music": {"pipeline": str(tmp_path / "musicgen")}})
    assert "model_index.json" in str(info.value) and "ACE-Step" in str(info.value)
    Settings(generation={"music": {"pipeline": str(tmp_path / "not-made-yet")}})  # made later
