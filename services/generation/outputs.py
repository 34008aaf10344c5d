"""Writing what a pipeline returned: PNG images, MP4 or GIF videos, WAV audio.

Blocking (file I/O, video encoding): runs in the pipeline's worker thread.
"""

from __future__ import annotations

import uuid
import wave
from pathlib import Path
from typing import Any

import numpy as np

from services.generation.capabilities import PipelineCaps
from services.generation.params import GenerationParams, OutputFile


def write_outputs(
    caps: PipelineCaps, outputs_dir: Path, pipe: Any, out: Any, params: GenerationParams
) -> list[OutputFile]:
    """Write what a run returned under ``outputs_dir``; say what was written."""
    kind = caps.kind
    outputs_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}_{uuid.uuid4().hex}"
    if kind == "image":
        return [
            _write_png(outputs_dir, image, f"{stem}_{i}.png")
            for i, image in enumerate(_to_pil_list(out.images))
        ]
    if kind == "video":
        audio = getattr(out, "audio", None)  # LTX-2: the clip's sound, muxed into the MP4
        track = None
        if audio is not None and caps.sample_rate and params.video_format == "mp4":
            track = (_audio_array(audio), caps.sample_rate)
        return [_write_video(outputs_dir, _to_pil_list(out.frames[0]), stem, params, track)]
    rate = caps.sample_rate or sample_rate(pipe)
    audios = out.audios if hasattr(out, "audios") else out.audio
    return [_write_wav(outputs_dir, rate, audios, f"{stem}.wav", params)]


def _write_png(outputs_dir: Path, image: Any, name: str) -> OutputFile:
    path = outputs_dir / name
    image.save(path, format="PNG")
    meta = {"width": image.width, "height": image.height}
    return OutputFile(name, path, "image/png", meta)


def _write_video(
    outputs_dir: Path,
    frames: list,
    stem: str,
    params: GenerationParams,
    track: tuple[np.ndarray, int] | None = None,
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
        # Why macro_block_size 2: imageio's default of 16 rescales a 24-pixel-wide video to
        # 32 without a word; H.264 in yuv420p needs only even sides (sizes are multiples of 8).
        export_to_video(frames, str(path), fps=params.fps, macro_block_size=2)
        if track is not None:
            _mux_audio(path, *track, seconds=len(frames) / params.fps)
    meta = {
        "frames": len(frames),
        "fps": params.fps,
        "width": frames[0].width,
        "height": frames[0].height,
        "duration_s": len(frames) / params.fps,
    }
    return OutputFile(name, path, "image/gif" if fmt == "gif" else "video/mp4", meta)


def _audio_array(audios: Any) -> np.ndarray:
    """The first clip of a pipeline's (batched) audio output as (samples, channels) float32."""
    audio = audios[0]
    audio = audio.detach().float().cpu().numpy() if hasattr(audio, "detach") else audio
    audio = np.asarray(audio, dtype=np.float32)
    # (channels, samples) -> (samples, channels); AudioLDM/MusicLDM give mono (samples,).
    if audio.ndim == 2 and audio.shape[0] <= 8 < audio.shape[1]:
        audio = audio.T
    return audio if audio.ndim == 2 else audio.reshape(-1, 1)


def _wav(path: Path, audio: np.ndarray, rate: int) -> np.ndarray:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return pcm


def _write_wav(
    outputs_dir: Path, rate: int, audios: Any, name: str, params: GenerationParams
) -> OutputFile:
    audio = _audio_array(audios)
    if params.duration_s is not None:
        audio = audio[: int(round(params.duration_s * rate))]
    path = outputs_dir / name
    pcm = _wav(path, audio, rate)
    meta = {"duration_s": pcm.shape[0] / rate, "sample_rate": rate, "channels": pcm.shape[1]}
    return OutputFile(name, path, "audio/wav", meta)


def _mux_audio(video: Path, audio: np.ndarray, rate: int, *, seconds: float) -> None:
    """Put ``audio`` into the MP4 at ``video`` as an AAC track, cut to the video's length,
    with the ffmpeg that writes the video (imageio-ffmpeg's)."""
    import subprocess

    import imageio_ffmpeg

    wav = video.with_suffix(".audio.wav")
    muxed = video.with_suffix(".muxed.mp4")
    try:
        # LTX-2's track comes out a few ms short of the video: pad it with silence.
        n = int(round(seconds * rate))
        audio = np.pad(audio[:n], ((0, max(0, n - len(audio))), (0, 0)))
        _wav(wav, audio, rate)
        subprocess.run(
            [
                imageio_ffmpeg.get_ffmpeg_exe(),
                *("-loglevel", "error", "-y", "-i", str(video), "-i", str(wav)),
                *("-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac"),
                *("-t", f"{seconds:.6f}", str(muxed)),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        muxed.replace(video)
    finally:
        wav.unlink(missing_ok=True)
        muxed.unlink(missing_ok=True)


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
