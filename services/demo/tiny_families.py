"""Tiny random-weight folders of the diffusers families people run, for tests.

One member of each family (SDXL, SD3, FLUX.1, Qwen-Image, LTX-Video, LTX-2, Wan 2.1 text-
and image-to-video, CogVideoX, Stable Video Diffusion, Stable Audio, ACE-Step 1.5,
AudioLDM2), built from configs the way ``services.demo.tiny_pipelines`` builds the demo's:
no download, seeded, saved with ``save_pretrained`` so that
``DiffusionPipeline.from_pretrained(folder)`` reloads them like a user's folder.

The widths are tiny but the geometry is the published one: each folder keeps its family's
VAE scale factor, patch size, temporal compression and audio sample rate (SD3 and FLUX take
multiples of 16, LTX multiples of 32 and 8k+1 frames, Wan 4k+1, ACE-Step 48 kHz), so the
size, frame and duration rules measured on these folders hold for the real checkpoints.
Defaults that a config holds (a UNet's or transformer's sample size, SVD's frame count) are
scaled down to run on a CPU; docs/families.md lists both and which defaults sit in code.
The builders live in services/demo/families/ (shared parts, image, video, music).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services.demo.families import image, music, video
from services.demo.tiny_pipelines import _music

# name -> the generation kind it serves.
FAMILIES: dict[str, str] = {
    "sdxl": "image",
    "sd3": "image",
    "flux": "image",
    "qwen-image": "image",
    "ltx": "video",
    "ltx2": "video",
    "wan-t2v": "video",
    "wan-i2v": "video",
    "cogvideox": "video",
    "svd": "video",
    "stable-audio": "music",
    "ace-step": "music",
    "audioldm2": "music",
}


def write_tiny_family(name: str, folder: Path, *, dtype: str | None = None) -> Path:
    """Build the tiny pipeline of family ``name`` and save it in ``folder`` (once).

    ``dtype`` ("bfloat16", "float16") saves the weights in that dtype, as a published
    folder states its own (in each safetensors header, and as ``dtype`` in the
    transformers components' config.json); by default they are float32.
    A folder that already holds a ``model_index.json`` is returned as it is: diffusers
    writes that file last, so its presence means an earlier save finished.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {sorted(FAMILIES)}")
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    # Why: seeding here and before each component makes the weights identical run to run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = _BUILDERS[name]()
    if dtype is not None:
        from diffusers.utils import logging as diffusers_logging

        # Why quiet: ``to()`` warns about modules to keep in float32 even when there are none.
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            pipe.to(getattr(torch, dtype))
        finally:
            diffusers_logging.set_verbosity(level)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# Why a registry rather than names looked up: FAMILIES and the builders must agree, and a
# test checks that every family has one.
_BUILDERS: dict[str, Callable] = {
    **image.BUILDERS,
    **video.BUILDERS,
    "stable-audio": _music,  # the demo's own music pipeline, as write_tiny_pipeline builds it
    **music.BUILDERS,
}
