"""A generation request checked against what its pipeline can do, before it is queued.

Fills in the defaults (the request's, else the config's, else the pipeline's own), then
refuses anything the pipeline would make differently from what was asked: a size that
is not a multiple of the pipeline's, a frame count outside its rule, an input it does not
take or a missing one it needs. Each refusal is an InvalidRequest naming the field, with
the nearest valid values; ``round_to_valid`` asks for those instead, and the job then
says what it changed (:class:`Adjustment`).
"""

from __future__ import annotations

import dataclasses

from services.errors import InvalidRequest
from services.generation.capabilities import PipelineCaps
from services.generation.params import Adjustment, GenerationParams
from services.llm.images import ImageLimits, decode_data_url, inspect_image
from services.settings import PipelineSettings

INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_FPS = 8  # a video pipeline that assumes no frame rate


def image_limits(kind: str, cfg: PipelineSettings) -> ImageLimits:
    """The input image limits of ``generation.<kind>`` (the chat's checks, other limits)."""
    return ImageLimits(
        max_bytes=int(cfg.max_image_mb * 1024 * 1024),
        max_pixels=cfg.max_image_pixels,
        allow_remote=False,
        formats=INPUT_FORMATS,
        settings=f"generation.{kind}",
    )


def resolve(
    caps: PipelineCaps, cfg: PipelineSettings, params: GenerationParams
) -> tuple[GenerationParams, list[Adjustment]]:
    """``params`` with every default filled in and every value one the pipeline makes as
    asked; InvalidRequest naming the field otherwise. Decodes no image (see
    :func:`decode_inputs`)."""
    adjustments: list[Adjustment] = []
    p = params
    _check_inputs(caps, p)
    if caps.kind in ("image", "video"):
        width = p.width or getattr(cfg, "default_width", None) or caps.default_width
        height = p.height or getattr(cfg, "default_height", None) or caps.default_height
        width = _on_multiple("width", width, caps, p, adjustments)
        height = _on_multiple("height", height, caps, p, adjustments)
        p = dataclasses.replace(p, width=width, height=height)
        most = cfg.max_pixels  # type: ignore[attr-defined]
        if width and height and width * height > most:
            asked = "" if params.width and params.height else " (the pipeline's default size)"
            raise InvalidRequest(
                "width",
                f"{width}x{height}{asked} is more than generation.{caps.kind}.max_pixels "
                f"({most} pixels)",
            )
    if caps.kind == "video":
        frames = p.num_frames or getattr(cfg, "default_frames", None) or caps.default_frames
        if frames is not None:
            frames = _on_frame_rule(frames, caps, p, adjustments)
            most = cfg.max_frames  # type: ignore[attr-defined]
            if frames > most:
                raise InvalidRequest(
                    "num_frames", f"must be at most {most} (generation.video.max_frames)"
                )
        fps = p.fps or round(caps.default_fps or DEFAULT_FPS)
        p = dataclasses.replace(p, num_frames=frames, fps=fps)
    if caps.kind == "music":
        most = cfg.max_duration_s  # type: ignore[attr-defined]
        seconds = p.duration_s or getattr(cfg, "default_duration_s", None)
        if seconds is None:
            seconds = min(caps.default_duration_s or most, most)
        if seconds > most:
            raise InvalidRequest("duration_s", f"must be at most {most:g}")
        if caps.max_duration_s and seconds > caps.max_duration_s:
            raise InvalidRequest(
                "duration_s",
                f"{caps.class_name}'s longest clip is {caps.max_duration_s:g} s",
                nearest=[round(caps.max_duration_s, 3)],
            )
        p = dataclasses.replace(p, duration_s=seconds)
    return p, adjustments


def decode_inputs(kind: str, cfg: PipelineSettings, params: GenerationParams) -> GenerationParams:
    """Decode and check the input images (blocking: run it in a thread): PNG, JPEG or
    WebP data URLs within ``generation.<kind>.max_image_mb`` and ``max_image_pixels``."""
    limits = image_limits(kind, cfg)
    decoded = {}
    for name in ("image", "last_image"):
        url = getattr(params, name)
        if isinstance(url, str):
            data = decode_data_url(url, name, limits)
            inspect_image(data, name, limits)
            decoded[name] = data
    return dataclasses.replace(params, **decoded) if decoded else params


def _check_inputs(caps: PipelineCaps, p: GenerationParams) -> None:
    takes = caps.inputs
    name = caps.class_name
    if takes.prompt and not p.prompt.strip():
        raise InvalidRequest("prompt", f"{name} needs a prompt")
    if not takes.prompt and p.prompt:
        raise InvalidRequest("prompt", f"{name} takes no prompt")
    if takes.image_required and p.image is None:
        raise InvalidRequest("image", f"{name} needs an input image: send it as a data URL")
    refused = [
        ("image", p.image is not None and not takes.image, "takes no input image"),
        ("last_image", p.last_image is not None and not takes.last_image, "takes no last image"),
        ("lyrics", bool(p.lyrics) and not takes.lyrics, "sings no lyrics"),
        (
            "negative_prompt",
            bool(p.negative_prompt) and not takes.negative_prompt,
            "takes no negative prompt",
        ),
        ("guidance_scale", p.guidance_scale is not None and not takes.guidance, "has no guidance"),
    ]
    for field, bad, why in refused:
        if bad:
            raise InvalidRequest(field, f"{name} {why}")
    if p.last_image is not None and p.image is None:
        raise InvalidRequest("image", f"{name} needs `image` with `last_image`")


def _nearest_of(value: int, candidates: list[int]) -> int:
    """The candidate closest to ``value``; the larger one on a tie."""
    return min(candidates, key=lambda c: (abs(c - value), -c))


def _on_multiple(
    field: str,
    value: int | None,
    caps: PipelineCaps,
    p: GenerationParams,
    adjustments: list[Adjustment],
) -> int | None:
    if value is None:
        return None
    near = caps.size_nearest(value)
    if near == [value]:
        return value
    if not p.round_to_valid:
        raise InvalidRequest(
            field,
            f"must be a multiple of {caps.size_multiple} for {caps.class_name} "
            f"(nearest: {' or '.join(map(str, near))}; or set round_to_valid)",
            nearest=near,
        )
    used = _nearest_of(value, near)
    adjustments.append(Adjustment(field, value, used))
    return used


def _on_frame_rule(
    frames: int, caps: PipelineCaps, p: GenerationParams, adjustments: list[Adjustment]
) -> int:
    rule = caps.frame_rule
    if rule.valid(frames):
        return frames
    near = rule.nearest(frames)
    if not p.round_to_valid:
        raise InvalidRequest(
            "num_frames",
            f"{caps.class_name} makes {rule.text} frames "
            f"(nearest: {' or '.join(map(str, near))}; or set round_to_valid)",
            nearest=near,
        )
    used = _nearest_of(frames, near)
    adjustments.append(Adjustment("num_frames", frames, used))
    return used


def warm_params(caps: PipelineCaps) -> GenerationParams:
    """The smallest request ``caps``'s pipeline makes as asked (one step), for the
    start-up warm-up: its own size multiple, frame rule and required input image."""
    side = max(caps.size_multiple, 64 // caps.size_multiple * caps.size_multiple)
    image = None
    if caps.inputs.image_required:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (side, side), (128, 128, 128)).save(buf, format="PNG")
        image = buf.getvalue()
    return GenerationParams(
        "warm-up" if caps.inputs.prompt else "",
        steps=1,
        seed=0,
        width=side if caps.kind != "music" else None,
        height=side if caps.kind != "music" else None,
        num_frames=caps.frame_rule.step + 1 if caps.kind == "video" else None,
        fps=round(caps.default_fps or DEFAULT_FPS) if caps.kind == "video" else None,
        duration_s=min(1.0, caps.max_duration_s or 1.0) if caps.kind == "music" else None,
        image=image,
    )
