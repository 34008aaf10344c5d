"""What a pipeline folder can do, read from the folder itself.

One record per folder, read before the first load from its config files and the pipeline
class's ``__call__`` signature, and read again from the loaded pipeline's own attributes
(they win where the two differ). The request checks (``checks.py``) and the call builder
(``calls.py``) both read this record and nothing else, so a request that passes the checks
is one the pipeline can make exactly as asked.

Blocking (file reads, importing diffusers): call it from a worker thread.
"""

from __future__ import annotations

import inspect
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.errors import ModelUnavailable
from services.generation.sizing import safetensors_headers

# Request field -> the names pipelines use for it, first match wins.
DURATION_PARAMS = ("audio_end_in_s", "audio_length_in_s", "audio_duration", "duration")
FRAME_RATE_PARAMS = ("frame_rate", "fps")
GUIDANCE_PARAMS = ("true_cfg_scale", "guidance_scale")  # Qwen-Image's CFG is true_cfg_scale
# Classes whose ``image`` argument is the input they transform (not an optional reference).
_NEEDS_IMAGE = ("Img2Img", "ImageToVideo", "Image2Video", "I2V", "Inpaint", "StableVideoDiffusion")
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class FrameRule:
    """Which frame counts a video pipeline makes as asked: ``step`` k+1 (any when 1)."""

    step: int = 1

    @property
    def text(self) -> str:
        return "any" if self.step <= 1 else f"{self.step}k+1"

    def valid(self, frames: int) -> bool:
        return self.step <= 1 or (frames - 1) % self.step == 0

    def nearest(self, frames: int) -> list[int]:
        """The valid counts either side of ``frames`` (one when it is valid)."""
        if self.valid(frames):
            return [frames]
        below = (frames - 1) // self.step * self.step + 1
        return [n for n in (below, below + self.step) if n >= 1]


@dataclass(frozen=True)
class PipelineInputs:
    """The request inputs a pipeline takes besides the prompt."""

    image: bool = False  # takes an input image
    image_required: bool = False  # ... and cannot run without one
    last_image: bool = False
    lyrics: bool = False
    negative_prompt: bool = False
    guidance: bool = False
    prompt: bool = True  # Stable Video Diffusion takes none


@dataclass(frozen=True, kw_only=True)
class PipelineCaps:
    """What one pipeline folder can do; see the module docstring."""

    kind: str = field(repr=False)  # the pipeline's own record says these (PipelineInfo)
    folder: str = field(repr=False)
    class_name: str
    denoiser: str | None  # "transformer" (a DiT) | "unet" | None
    size_multiple: int  # width and height must be multiples of it (image, video)
    frame_rule: FrameRule  # video
    default_width: int | None
    default_height: int | None
    default_frames: int | None  # video: None when the pipeline decides (e.g. from a duration)
    default_duration_s: float | None  # music: the pipeline's own default length
    max_duration_s: float | None  # music: its longest clip, when it has one
    sample_rate: int | None  # music, and a video pipeline's audio track
    audio_channels: int | None
    published_dtype: str | None  # what the folder's weights are stored in, when 16-bit
    inputs: PipelineInputs
    frame_rate_param: str | None  # where the request's fps goes
    default_fps: float | None  # the frame rate the pipeline assumes (LTX 25, SVD 7)
    duration_param: str | None  # where the request's duration_s goes
    guidance_param: str | None
    video_audio: bool = False  # a video pipeline that also returns an audio track
    min_steps: int = 1  # 2 where the scheduler stretches its shifts to a terminal value
    max_frames: int | None = None  # AnimateDiff: its motion module's positions (32)
    params: frozenset[str] = field(default_factory=frozenset, repr=False)  # __call__ names
    source: str = "config"  # "config" (before load) | "loaded" (read from the pipeline)

    def size_nearest(self, value: int) -> list[int]:
        """The valid sizes either side of ``value`` (one when it is valid)."""
        m = self.size_multiple
        if value % m == 0:
            return [value]
        below = value // m * m
        return [n for n in (below, below + m) if n >= m]


class UnsupportedPipeline(ModelUnavailable):
    """A folder whose class Edison cannot call for this kind; names the class."""


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pipeline_class(folder: Path) -> str | None:
    """The class named by the folder's ``model_index.json`` (None without one)."""
    return _json(folder / "model_index.json").get("_class_name") or None


def _denoiser(folder: Path) -> tuple[str | None, dict[str, Any]]:
    for name in ("transformer", "unet", "dit"):
        cfg = _json(folder / name / "config.json")
        if cfg:
            return ("unet" if name == "unet" else "transformer"), cfg
    return None, {}


def published_dtype(folder: Path) -> str | None:
    """The dtype the denoiser's weights are stored in, when it is a 16-bit one (float32
    weights are a full-precision export, not a statement about how to run them)."""
    for name in ("transformer", "unet", "dit"):
        for header in safetensors_headers(folder / name):
            for t in header.values():
                return _SAFETENSORS_DTYPES.get(str(t.get("dtype")))
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, list | tuple) and value:
        value = value[-1]  # [t, h, w] patch sizes: the spatial one
    return int(value) if isinstance(value, int | float) and value > 0 else None


def _vae_factors(folder: Path) -> tuple[int, int, int]:
    """(spatial scale, temporal compression, latent channels) of the folder's VAE."""
    vae = _json(folder / "vae" / "config.json")
    spatial = _int(vae.get("spatial_compression_ratio")) or _int(vae.get("scale_factor_spatial"))
    temporal = _int(vae.get("temporal_compression_ratio")) or _int(vae.get("scale_factor_temporal"))
    if vae.get("_class_name", "").startswith("AutoencoderKLLTX") and not (spatial and temporal):
        # LTX's VAE derives its ratios from its patch size and scaling flags.
        patch = _int(vae.get("patch_size")) or 4
        flags = vae.get("spatio_temporal_scaling") or [True, True, True, False]
        spatial = spatial or patch * 2 ** sum(bool(f) for f in flags)
        temporal = temporal or (_int(vae.get("patch_size_t")) or 1) * 2 ** sum(
            bool(f) for f in flags
        )
    if not spatial and isinstance(vae.get("temperal_downsample"), list):  # Wan, Qwen-Image
        spatial = 2 ** len(vae["temperal_downsample"])
        temporal = temporal or 2 ** sum(bool(f) for f in vae["temperal_downsample"])
    if not spatial:
        blocks = vae.get("block_out_channels") or [0, 0, 0, 0]
        spatial = 2 ** max(0, len(blocks) - 1)
    channels = _int(vae.get("latent_channels")) or _int(vae.get("z_dim")) or 4
    if vae.get("_class_name") == "AutoencoderKLCogVideoX" and (temporal or 1) > 1:
        # Its decoder doubles an even number of latent frames (5 frames ask 2 latents and
        # come back as 8): only an odd latent count, 8k+1 frames, comes back as asked.
        temporal = 2 * temporal
    return spatial, temporal or 1, channels


# Why: diffusers imports its classes lazily, and two threads resolving them at once (the
# start-up import, a request's capability read, a pipeline load) can each see the other's
# half-made module ("cannot import name ..."). Every import of a diffusers name holds it.
IMPORT_LOCK = threading.Lock()


def diffusers_name(name: str) -> Any:
    """``diffusers.<name>`` (None when there is none), imported under IMPORT_LOCK."""
    with IMPORT_LOCK:
        import diffusers

        return getattr(diffusers, name, None)


def _signature(class_name: str) -> dict[str, inspect.Parameter]:
    import diffusers

    cls = diffusers_name(class_name)
    if not isinstance(cls, type) or "__call__" not in dir(cls):
        raise UnsupportedPipeline(
            f"pipeline class {class_name} is not in diffusers {diffusers.__version__}",
            class_name=class_name,
        )
    return dict(inspect.signature(cls.__call__).parameters)


def _default(params: dict[str, inspect.Parameter], name: str) -> Any:
    p = params.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _first(params: dict[str, inspect.Parameter], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in params), None)


def _min_steps(folder: Path) -> int:
    """A flow-match scheduler with ``shift_terminal`` (LTX) divides by zero at one step
    (NaN timesteps, then an IndexError deep in the scheduler): it needs two."""
    cfg = _json(folder / "scheduler" / "scheduler_config.json")
    return 2 if cfg.get("shift_terminal") else 1


def _music_rate(folder: Path) -> tuple[int | None, int | None, float | None]:
    """(sample rate, channels, longest clip) of a music folder's VAE or vocoder."""
    vae = _json(folder / "vae" / "config.json")
    vocoder = _json(folder / "vocoder" / "config.json")
    rate = vae.get("sampling_rate") or vae.get("sample_rate") or vocoder.get("sampling_rate")
    channels = _int(vae.get("audio_channels")) or (1 if vocoder else None)
    _, den = _denoiser(folder)
    ratios = vae.get("downsampling_ratios")
    longest = None
    if rate and ratios and isinstance(den.get("sample_size"), int):
        hop = 1
        for r in ratios:
            hop *= int(r)
        longest = den["sample_size"] * hop / rate
    return (int(rate) if rate else None), channels, longest


def read_caps(kind: str, folder: Path) -> PipelineCaps:
    """The capabilities of the pipeline folder configured for ``kind``.

    Raises UnsupportedPipeline (naming the class) for a folder whose class is not in
    diffusers or does not make ``kind``."""
    folder = Path(folder)
    class_name = pipeline_class(folder)
    if class_name is None:
        raise UnsupportedPipeline(
            f"{kind} pipeline unavailable: no diffusers pipeline at {folder} "
            "(model_index.json missing)",
            kind=kind,
        )
    try:
        params = _signature(class_name)
    except UnsupportedPipeline as exc:
        message = f"{kind} pipeline unavailable: {exc.message}"
        raise UnsupportedPipeline(message, **exc.details) from None
    makes_video = "num_frames" in params
    duration_param = _first(params, DURATION_PARAMS)
    made = "video" if makes_video else "music" if duration_param else "image"
    if made != kind:
        raise UnsupportedPipeline(
            f"{kind} pipeline unavailable: {class_name} makes {made}, not {kind}: "
            f"configure it under generation.{made}",
            class_name=class_name,
            kind=kind,
        )
    denoiser, den = _denoiser(folder)
    spatial, temporal, latent_channels = _vae_factors(folder)
    patch = _int(den.get("patch_size")) or _int(den.get("all_patch_size")) or 1
    # FLUX, FLUX.2 and Qwen-Image pack 2x2 latent cells into one token (patch_size 1,
    # in_channels four times the VAE's latent channels): the pipeline then needs 2 x scale.
    in_channels = _int(den.get("in_channels"))
    if patch == 1 and in_channels == 4 * latent_channels:
        patch = 2
    # Every diffusers pipeline also checks multiples of 8 itself (powers of two: the lcm).
    multiple = max(8, spatial * patch) if kind != "music" else 1

    width, height = _default(params, "width"), _default(params, "height")
    if kind in ("image", "video") and not (isinstance(width, int) and isinstance(height, int)):
        side = den.get("sample_size")
        h = den.get("sample_height", side)
        w = den.get("sample_width", side)
        if isinstance(h, int) and isinstance(w, int):
            height, width = h * spatial, w * spatial
        else:  # FLUX and Qwen-Image keep it in the pipeline: 128 latent cells
            height = width = 128 * spatial
    frames = _default(params, "num_frames") if kind == "video" else None
    if kind == "video" and frames is None:
        frames = _int(den.get("num_frames"))  # Stable Video Diffusion's UNet

    rate = channels = longest = None
    default_duration = None
    if kind == "music":
        rate, channels, longest = _music_rate(folder)
        d = _default(params, duration_param) if duration_param else None
        default_duration = float(d) if isinstance(d, int | float) else longest
    elif kind == "video":
        audio_vae = _json(folder / "audio_vae" / "config.json")
        vocoder = _json(folder / "vocoder" / "config.json")
        if audio_vae or vocoder:
            rate = _int(vocoder.get("output_sampling_rate")) or _int(
                vocoder.get("sampling_rate") or audio_vae.get("sample_rate")
            )
            channels = _int(audio_vae.get("out_ch")) or 2

    rate_param = _first(params, FRAME_RATE_PARAMS) if kind == "video" else None
    # Wan 2.1 image-to-video embeds its input image with a CLIP encoder; only the FLF2V
    # checkpoints' transformers have room for a second one (pos_embed_seq_len).
    last_image = "last_image" in params and not (
        (folder / "image_encoder").is_dir() and not den.get("pos_embed_seq_len")
    )
    # FLUX.1 [dev] embeds a distilled guidance (guidance_embeds): `guidance_scale` is that,
    # and a negative prompt would need true CFG, which it is not made for. Qwen-Image has
    # no guidance embedding: its CFG scale is `true_cfg_scale`.
    guidance = _first(params, GUIDANCE_PARAMS)
    if guidance == "true_cfg_scale" and den.get("guidance_embeds"):
        guidance = "guidance_scale_distilled"
    needs_image = "image" in params and any(s in class_name for s in _NEEDS_IMAGE)
    inputs = PipelineInputs(
        image="image" in params,
        image_required=needs_image,
        last_image=last_image,
        lyrics="lyrics" in params,
        negative_prompt="negative_prompt" in params and guidance != "guidance_scale_distilled",
        guidance=guidance is not None,
        prompt="prompt" in params,
    )
    return PipelineCaps(
        kind=kind,
        folder=str(folder),
        class_name=class_name,
        denoiser=denoiser,
        size_multiple=multiple,
        frame_rule=FrameRule(temporal if kind == "video" else 1),
        default_width=int(width) if isinstance(width, int) else None,
        default_height=int(height) if isinstance(height, int) else None,
        default_frames=int(frames) if isinstance(frames, int) else None,
        default_duration_s=default_duration,
        max_duration_s=longest,
        sample_rate=rate,
        audio_channels=channels,
        published_dtype=published_dtype(folder),
        inputs=inputs,
        frame_rate_param=rate_param,
        default_fps=_default(params, rate_param) if rate_param else None,
        duration_param=duration_param,
        guidance_param="guidance_scale" if guidance == "guidance_scale_distilled" else guidance,
        video_audio=kind == "video" and rate is not None,
        min_steps=_min_steps(folder),
        max_frames=_int(den.get("motion_max_seq_length")) if kind == "video" else None,
        params=frozenset(params),
    )


def choose_dtype(setting: str, caps: PipelineCaps | None, device: str) -> tuple[str, str]:
    """The dtype to load in and why: ``generation.<kind>.dtype``, where ``auto`` means
    float32 on the CPU; else the folder's own 16-bit dtype; else bfloat16 for transformer
    (DiT) pipelines on a card that supports it and float16 for UNet ones."""
    if setting != "auto":
        return setting, f"generation dtype set to {setting}"
    if not device.startswith("cuda"):
        return "float32", "auto: float32 on the CPU"
    if caps is not None and caps.published_dtype:
        return caps.published_dtype, f"auto: the folder's weights are {caps.published_dtype}"
    dit = caps is not None and caps.denoiser == "transformer"
    if dit and _bf16_supported(device):
        return "bfloat16", "auto: a transformer (DiT) pipeline on a card with bfloat16"
    return "float16", "auto: " + ("a UNet pipeline" if not dit else "this card has no bfloat16")


def _bf16_supported(device: str) -> bool:
    try:
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return torch.cuda.get_device_capability(index) >= (8, 0)
    except Exception:  # noqa: BLE001 - no CUDA here: the UNet default
        return False
