"""What a generation request asks for and what a run gives back, shared by the pipeline
host, the output writers and the job service."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.memory.peak import PeakReading


@dataclass
class GenerationParams:
    """One request, with the same argument names for every kind wherever the meaning is shared."""

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None  # None: generation.<kind>.default_steps
    guidance_scale: float | None = None  # None: the pipeline's default
    seed: int | None = None  # None: pick a random seed and report it
    width: int | None = None  # image/video; None: the pipeline's default
    height: int | None = None
    num_images: int = 1  # image
    num_frames: int | None = None  # video; None: the pipeline's default
    fps: int | None = None  # video; None: the pipeline's own frame rate, else 8
    video_format: str = "mp4"  # "mp4" | "gif"
    duration_s: float | None = None  # music; None: the pipeline's default (its longest clip)
    lyrics: str | None = None  # music pipelines that sing them (ACE-Step)
    # Image-to-X input images: a data URL as the request sent it; the checks replace it
    # with the decoded bytes (see checks.py), which the call builder opens.
    image: str | bytes | None = field(default=None, repr=False)
    last_image: str | bytes | None = field(default=None, repr=False)
    round_to_valid: bool = False  # round a size or frame count the pipeline cannot make


@dataclass(frozen=True)
class Adjustment:
    """A request value Edison changed, on request (``round_to_valid``), to one the
    pipeline makes exactly."""

    field: str
    asked: float
    used: float


@dataclass
class OutputFile:
    name: str  # file name under the outputs dir (uuid-based, safe characters only)
    path: Path
    media_type: str  # image/png, video/mp4, image/gif, audio/wav
    meta: dict[str, float | int] = field(default_factory=dict)  # width, height, fps, ...


@dataclass
class RunResult:
    outputs: list[OutputFile]
    seed: int
    load_ms: float
    run_ms: float
    used_savers: bool
    peak: PeakReading | None = None  # the call's measured memory on its device
    import_ms: float = 0.0  # importing torch/diffusers inside this run's load (0: done before)
    first_run: bool = False  # the first run after a load: it loads the device's kernels too
