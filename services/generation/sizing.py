"""How big a generation request is, in the unit its working memory grows with.

Read from the pipeline folder's own config files, so a request is sized before the
pipeline is loaded: image and video in latent elements (images or frames x latent
channels x the latent grid, the VAE's scale factor apart from the pixels), music in
audio samples (seconds x sample rate x channels). The weights' size comes from the
safetensors headers (element counts, times the dtype the pipeline loads in).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.generation.params import GenerationParams

MB = 1024 * 1024


@dataclass(frozen=True)
class PipelineShape:
    """What sizing needs from a pipeline folder."""

    kind: str
    vae_scale: int  # pixels per latent cell
    latent_channels: int
    default_px: int | None  # the pipeline's default width and height
    sample_rate: int | None  # music
    audio_channels: int | None  # music
    default_duration_s: float | None  # music: the pipeline's longest clip
    parameters: int  # elements in the folder's safetensors files

    def weights_mb(self, bytes_per_element: int) -> float:
        return self.parameters * bytes_per_element / MB


@dataclass(frozen=True)
class RequestSize:
    """A request's size in the unit its working memory grows with."""

    value: float
    unit: str  # latent elements | audio samples
    field: str  # the request field that makes it large (named in a 422)
    text: str  # for people: "2 x 512x512 images"


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def safetensors_headers(folder: Path) -> Iterator[dict[str, Any]]:
    """The tensor entries of each safetensors file under ``folder`` (headers only, never
    the weights): name -> {"dtype", "shape", ...}. Unreadable files are skipped."""
    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(min(length, 100 * MB)))
        except (OSError, ValueError, struct.error):
            continue
        yield {k: t for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)}


def tensor_elements(folder: Path) -> dict[str, int]:
    """Tensor name -> element count, over every safetensors file under ``folder``."""
    return {
        name: math.prod(int(d) for d in t.get("shape", []))
        for header in safetensors_headers(folder)
        for name, t in header.items()
    }


def safetensors_elements(folder: Path) -> int:
    """Elements of every tensor in the folder's safetensors files (headers only)."""
    return sum(tensor_elements(folder).values())


def read_shape(kind: str, folder: Path) -> PipelineShape:
    """The sizing facts of a pipeline folder (missing config keys fall back to SD's)."""
    vae = _json(folder / "vae" / "config.json")
    denoiser = _json(folder / "unet" / "config.json") or _json(
        folder / "transformer" / "config.json"
    )
    blocks = vae.get("block_out_channels") or [0, 0, 0, 0]
    scale = 2 ** max(0, len(blocks) - 1)
    channels = int(vae.get("latent_channels") or denoiser.get("in_channels") or 4)
    sample = denoiser.get("sample_size")
    default_px = int(sample) * scale if isinstance(sample, int) and kind != "music" else None
    rate = vae.get("sampling_rate")
    ratios = vae.get("downsampling_ratios")
    longest = None
    if kind == "music" and rate and ratios and isinstance(sample, int):
        longest = sample * math.prod(ratios) / rate
    return PipelineShape(
        kind=kind,
        vae_scale=scale,
        latent_channels=channels,
        default_px=default_px,
        sample_rate=int(rate) if rate else None,
        audio_channels=int(vae.get("audio_channels") or 1) if kind == "music" else None,
        default_duration_s=longest,
        parameters=safetensors_elements(folder),
    )


def request_size(shape: PipelineShape, params: GenerationParams) -> RequestSize:
    """The size of ``params`` on a pipeline of this shape."""
    if shape.kind == "music":
        seconds = params.duration_s or shape.default_duration_s or 10.0
        samples = seconds * (shape.sample_rate or 44100) * (shape.audio_channels or 2)
        return RequestSize(samples, "audio samples", "duration_s", f"{seconds:g} s of audio")
    px = shape.default_px or 512
    width, height = params.width or px, params.height or px
    cells = math.ceil(width / shape.vae_scale) * math.ceil(height / shape.vae_scale)
    if shape.kind == "video":
        frames = params.num_frames or 16
        field = "num_frames" if frames > 1 else "width"
        text = f"{frames} frames of {width}x{height}"
        return RequestSize(frames * shape.latent_channels * cells, "latent elements", field, text)
    n = params.num_images
    field = "num_images" if n > 1 else "width"
    text = f"{n} x {width}x{height} image{'s' if n > 1 else ''}"
    return RequestSize(n * shape.latent_channels * cells, "latent elements", field, text)
