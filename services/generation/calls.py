"""The keyword arguments of one pipeline call, built from the folder's capabilities.

The request's names are the same for every kind (prompt, negative_prompt, steps,
guidance_scale, seed, width, height, num_frames, fps, duration_s, image, lyrics); each
pipeline's own names come from its record (``capabilities.py``), which the request
checks read too. Nothing here guesses: a value reaches the call only under a name the
pipeline's ``__call__`` takes.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from services.errors import Cancelled
from services.generation.capabilities import PipelineCaps
from services.generation.params import GenerationParams


def _pil(data: str | bytes | None) -> Any:
    if data is None:
        return None
    if isinstance(data, str):  # the checks decode every image before a run
        raise TypeError("an input image reached the pipeline undecoded")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def call_kwargs(
    caps: PipelineCaps,
    params: GenerationParams,
    seed: int,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """The arguments of ``pipe(**kwargs)`` for ``params`` (already checked and resolved)."""
    import torch

    accepted = caps.params
    kind = caps.kind
    # Why a CPU generator: the same seed gives the same noise on any device, with or
    # without CPU offload, and diffusers moves the noise to the execution device itself.
    kwargs: dict[str, Any] = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "num_inference_steps": params.steps,
        "generator": torch.Generator(device="cpu").manual_seed(seed),
        "image": _pil(params.image),
        "last_image": _pil(params.last_image),
        "lyrics": params.lyrics,
    }
    if caps.guidance_param is not None:
        kwargs[caps.guidance_param] = params.guidance_scale
    if kind in ("image", "video"):
        kwargs.update(width=params.width, height=params.height, output_type="pil")
    if kind == "image":
        kwargs["num_images_per_prompt"] = params.num_images
    elif kind == "video":
        kwargs["num_frames"] = params.num_frames
        if caps.frame_rate_param is not None:
            kwargs[caps.frame_rate_param] = params.fps
        kwargs["num_videos_per_prompt"] = 1
    elif kind == "music":
        kwargs["num_waveforms_per_prompt"] = 1
        if caps.duration_param == "audio_end_in_s":  # StableAudio: a window of the clip
            kwargs.update(audio_start_in_s=0.0, audio_end_in_s=params.duration_s)
        elif caps.duration_param is not None:
            kwargs[caps.duration_param] = params.duration_s
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k in accepted}

    total = params.steps or 0
    calls = 0

    def step_done() -> None:
        nonlocal calls
        calls += 1
        if on_step is not None:
            on_step(min(calls, total), total)
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"{kind} generation cancelled after step {calls}")

    if "callback_on_step_end" in accepted:

        def on_step_end(_pipe: Any, _i: int, _t: Any, tensors: dict) -> dict:
            step_done()
            return tensors

        kwargs["callback_on_step_end"] = on_step_end
    elif "callback" in accepted:  # StableAudio, AudioLDM, MusicLDM: the older hook
        kwargs["callback"] = lambda _i, _t, _latents: step_done()
        if "callback_steps" in accepted:
            kwargs["callback_steps"] = 1
    return kwargs
