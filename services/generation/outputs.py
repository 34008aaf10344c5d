"""Writing what a pipeline returned: PNG images, MP4 or GIF videos, WAV audio.

Blocking (file I/O, video encoding): runs in the pipeline's worker thread.
"""

from __future__ import annotations

import uuid
import wave
from pathlib import Path
from typing import Any

import numpy as np

from services.generation.params import GenerationParams, OutputFile


def write_outputs(
    kind: str, outputs_dir: Path, pipe: Any, out: Any, params: GenerationParams
) -> list[OutputFile]:
    """Write what a run returned under ``outputs_dir``; say what was written."""
    outputs_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}_{uuid.uuid4().hex}"
    if kind == "image":
        return [
            _write_png(outputs_dir, image, f"{stem}_{i}.png")
            for i, image in enumerate(_to_pil_list(out.images))
        ]
    if kind == "video":
        return [_write_video(outputs_dir, _to_pil_list(out.frames[0]), stem, params)]
    return [_write_wav(outputs_dir, pipe, out.audios, f"{stem}.wav", params)]


def _write_png(outputs_dir: Path, image: Any, name: str) -> OutputFile:
    path = outputs_dir / name
    image.save(path, format="PNG")
    meta = {"width": image.width, "height": image.height}
    return OutputFile(name, path, "image/png", meta)


def _write_video(
    outputs_dir: Path, frames: list, stem: str, params: GenerationParams
) -> OutputFile:
    from diffusers.utils import export_to_gif, export_to_video

    fmt = params.video_format.lower()
    if fmt not in ("mp4", "gif"):
        raise ValueError(f"video_format must be 'mp4' or 'gif', not {params.video_format!r}")
    name = f"{stem}.{fmt}"
    path = outputs_dir / name
    if fmt == "gif":
        export_to_gif(frames, str(path), fps=params.fps)
    else:
        export_to_video(frames, str(path), fps=params.fps)
    meta = {
        "frames": len(frames),
        "fps": params.fps,
        "width": frames[0].width,
        "height": frames[0].height,
        "duration_s": len(frames) / params.fps,
    }
    return OutputFile(name, path, "image/gif" if fmt == "gif" else "video/mp4", meta)


def _write_wav(
    outputs_dir: Path, pipe: Any, audios: Any, name: str, params: GenerationParams
) -> OutputFile:
    rate = sample_rate(pipe)
    audio = audios[0]
    audio = audio.detach().float().cpu().numpy() if hasattr(audio, "detach") else audio
    audio = np.asarray(audio, dtype=np.float32)
    # (channels, samples) -> (samples, channels); AudioLDM/MusicLDM give mono (samples,).
    audio = audio.T if audio.ndim == 2 else audio[:, None]
    if params.duration_s is not None:
        audio = audio[: int(round(params.duration_s * rate))]
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    path = outputs_dir / name
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    meta = {"duration_s": pcm.shape[0] / rate, "sample_rate": rate, "channels": pcm.shape[1]}
    return OutputFile(name, path, "audio/wav", meta)


def sample_rate(pipe: Any) -> int:
    """The real output rate: the VAE's for StableAudio, the vocoder's for AudioLDM/MusicLDM."""
    vae = getattr(pipe, "vae", None)
    rate = getattr(getattr(vae, "config", None), "sampling_rate", None)
    if rate is None:
        rate = getattr(
            getattr(getattr(pipe, "vocoder", None), "config", None), "sampling_rate", None
        )
    if rate is None:
        raise ValueError(f"cannot tell the sample rate of {type(pipe).__name__}")
    return int(rate)


def max_audio_s(pipe: Any) -> float | None:
    """StableAudio's longest clip (sample_size * hop / rate); None where there is no limit."""
    transformer, vae = getattr(pipe, "transformer", None), getattr(pipe, "vae", None)
    size = getattr(getattr(transformer, "config", None), "sample_size", None)
    hop = getattr(vae, "hop_length", None)
    if size is None or hop is None:
        return None
    return size * hop / sample_rate(pipe)


def _to_pil_list(items: Any) -> list:
    """PIL images from whatever a pipeline returned: PIL list, array or tensor in [0, 1]."""
    from PIL import Image

    if isinstance(items, list | tuple) and items and isinstance(items[0], Image.Image):
        return list(items)
    if hasattr(items, "detach"):
        items = items.detach().float().cpu().numpy()
    array = np.asarray(items)
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return [Image.fromarray(frame) for frame in array]
