"""Edison's configuration: one typed, bounded, described settings tree.

Read from a YAML file (``config/edison.yaml`` by default, ``EDISON_CONFIG`` or
``--config`` for another), then overridden by environment variables of the form
``EDISON__SECTION__KEY`` (``EDISON__MEMORY__RESERVE_VRAM_MB=2048``).

Sizes are in MB, meaning MiB (1024 x 1024 bytes) throughout Edison.
Relative paths in a config file are resolved against that file's folder.
The field descriptions below are the config reference: the README's table is
generated from them (``edison config-reference``) and a test keeps the two equal.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from services.cluster.config import ClusterSettings
from services.errors import ConfigError

TIER_NAMES: tuple[str, ...] = ("fast", "medium", "deep", "reasoning", "vision")
HEAVY_TIERS: frozenset[str] = frozenset({"medium", "deep", "reasoning", "vision"})
KINDS: tuple[str, ...] = ("image", "video", "music")  # generation kinds: generation.<kind>
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "edison.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port of the HTTP server.")
    api_key: SecretStr | None = Field(
        None,
        min_length=8,
        description="When set, every endpoint but /health, /ready and the docs needs "
        "`Authorization: Bearer <key>`.",
    )
    outputs_dir: Path = Field(
        Path("outputs"), description="Folder where generated images, videos and audio are written."
    )
    outputs_max_age_h: float | None = Field(
        168,
        gt=0,
        description="Generated files older than this many hours are deleted, and finished "
        "jobs older than this are forgotten (null: kept for ever). Never a file of a job "
        "still queued or running.",
    )
    outputs_max_mb: float | None = Field(
        10240,
        gt=0,
        description="Most MB the generated files may take: beyond it the oldest are deleted "
        "first (null: no limit). Never a file of a job still queued or running.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty disables CORS."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level of log line written."
    )
    max_body_mb: float = Field(
        8,
        gt=0,
        le=1024,
        description="Largest request body; a larger one is refused with 413 before it is read.",
    )


class DeviceLimits(_Section):
    reserve_vram_mb: int | None = Field(
        None, ge=0, le=65536, description="This device's reserve (default: memory.reserve_vram_mb)."
    )
    vram_budget_mb: int | None = Field(
        None,
        ge=256,
        le=4194304,
        description="This device's cap (default: memory.vram_budget_mb).",
    )


class MemorySettings(_Section):
    device: int = Field(
        0,
        ge=0,
        le=63,
        description="Index of the GPU that models and pipelines run on: the short form of "
        "`devices: [N]` (ignored when `devices` is set).",
    )
    devices: Literal["auto"] | list[Annotated[int, Field(ge=0, le=63)]] | None = Field(
        None,
        description="GPUs Edison places work on: `auto` (every GPU the probe sees) or a list of "
        "indices. Each has its own gate, queue and heavy slot. Unset: `[device]`.",
    )
    per_device: dict[Annotated[int, Field(ge=0, le=63)], DeviceLimits] = Field(
        default_factory=dict,
        description="Overrides of `reserve_vram_mb` / `vram_budget_mb` for one GPU index "
        "(`per_device: {1: {reserve_vram_mb: 2048}}`).",
    )

    @model_validator(mode="after")
    def _devices_listed_once(self) -> MemorySettings:
        if isinstance(self.devices, list):
            if not self.devices:
                raise ValueError("devices must name at least one GPU index (or be auto)")
            if len(set(self.devices)) != len(self.devices):
                raise ValueError("devices lists an index twice")
        return self

    reserve_vram_mb: int = Field(
        1024,
        ge=0,
        le=65536,
        description="VRAM headroom on the device that is never handed out (CUDA context, "
        "fragmentation, other programs).",
    )
    reserve_ram_mb: int = Field(
        1024, ge=0, le=1048576, description="RAM headroom never handed out when running on the CPU."
    )
    vram_budget_mb: int | None = Field(
        None,
        ge=256,
        le=4194304,
        description="Optional cap on the VRAM of each device: Edison treats the card as if it "
        "had this much memory (for operators sharing a card).",
    )
    probe_timeout_s: float = Field(
        2.0, gt=0, le=30, description="Time limit of each step of the VRAM probe ladder."
    )
    recovery_wait_s: float = Field(
        5.0,
        ge=0,
        le=120,
        description="After an unload, how long to wait for the driver to show the memory back.",
    )
    recovery_poll_s: float = Field(
        0.25, gt=0, le=5, description="Polling interval while waiting for memory to come back."
    )
    probe_backoff_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="A probe step that timed out or failed is skipped this long, then retried "
        "in the background; each new failure doubles the wait.",
    )
    probe_backoff_max_s: float = Field(
        300.0, gt=0, le=86400, description="Longest a failing probe step is skipped."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> MemorySettings:
        if self.probe_backoff_max_s < self.probe_backoff_s:
            raise ValueError("probe_backoff_max_s must be at least probe_backoff_s")
        return self

    learn_after: int = Field(
        3,
        ge=1,
        le=1000,
        description="Runs of a pipeline measured before its learned memory model replaces "
        "`generation.<kind>.required_vram_mb` / `required_ram_mb` (the prior).",
    )
    margin_factor: float = Field(
        1.05,
        ge=1.0,
        le=10.0,
        description="Safety margin of a learned prediction: the 95th percentile of measured / "
        "fitted peaks, times this factor, never below 1.1.",
    )
    worker_overhead_prior_mb: float = Field(
        512,
        ge=0,
        le=65536,
        description="What an LLM worker needs beyond its GGUF estimate (CUDA context, runtime) "
        "until a load on the device has been measured.",
    )
    state_dir: Path = Field(
        Path("var/state"),
        description="Folder where learned memory models are kept across restarts "
        "(`memory-models.json`); a corrupt file is logged and ignored.",
    )


class TierSettings(_Section):
    path: Path = Field(description="GGUF model file of this tier.")
    n_gpu_layers: int = Field(
        -1, ge=-1, le=1024, description="Layers offloaded to the GPU (-1: all); tried first."
    )
    n_ctx: int = Field(4096, ge=64, le=1048576, description="Context size in tokens; tried first.")
    preload: bool = Field(True, description="Load this tier at start-up.")
    keep_alive_s: float | None = Field(
        None,
        ge=0,
        description="Unload after this many idle seconds (default: models.heavy_keep_alive_s "
        "for heavy tiers, never for fast).",
    )
    chat_format: str | None = Field(
        None, description="llama.cpp chat format; default: the template in the GGUF file."
    )
    device: Literal["auto"] | Annotated[int, Field(ge=0, le=63)] = Field(
        "auto",
        description="GPU index this tier loads on, or `auto`: the device where its best rung "
        "fits now (ties: fewest heavy tasks, then most usable memory).",
    )
    allow_split: bool = Field(
        False,
        description="When no single GPU can hold the model's best GPU rung, split its layers "
        "across the GPUs (llama.cpp tensor split) instead of walking down the ladder.",
    )
    backend: Literal["llama-cpp-python", "llama-server"] | None = Field(
        None, description="Worker backend of this tier (default: models.backend)."
    )
    parallel: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Requests this tier's worker serves at once (llama-server slots, batched "
        "together). n_ctx is divided across them as llama-server does: each slot gets n_ctx / "
        "parallel rounded up to a multiple of 256 (capped at the trained context), and the KV "
        "cache holds parallel x that. Default: 4 on llama-server, 1 on llama-cpp-python (its "
        "only value).",
    )


class VisionTierSettings(TierSettings):
    preload: bool = Field(False, description="Load this tier at start-up (vision is on demand).")
    clip_path: Path | None = Field(
        None, description="Multimodal projector (mmproj GGUF) of the vision model."
    )
    chat_format: str | None = Field(
        "llava-1-5",
        description="llama.cpp chat handler for the vision model: `llava-1-5` (its own "
        "LLaVA template), `mtmd` (the model's own chat template), `llava-1-6`, ...",
    )
    max_image_mb: float = Field(
        10, gt=0, le=1024, description="Largest image a chat may carry (decoded bytes)."
    )
    max_image_pixels: int = Field(
        16_777_216,
        ge=1,
        le=1_073_741_824,
        description="Most pixels (width x height) an image may have: a small file can decode "
        "to gigabytes.",
    )
    allow_remote_images: bool = Field(
        False,
        description="Accept http(s) image URLs: Edison fetches them itself (bounded by "
        "`max_image_mb`) and hands the worker the bytes. Off: such URLs are refused (422).",
    )
    image_tokens: int = Field(
        576,
        ge=1,
        le=65536,
        description="Context tokens one image takes in the context budget (the projector's "
        "patches: 576 for LLaVA-1.5; 16 for the demo's tiny projector).",
    )


def default_llama_server() -> Path:
    """The llama-server ``make install`` builds: bin/llama-server of this Python's venv."""
    return Path(sys.prefix) / "bin" / "llama-server"


@dataclass(frozen=True)
class AutoFacts:
    """What ``models.backend: auto`` decides on, on a host whose llama-server binary is
    present. The probes behind them run only where they can change the answer."""

    binary: Path
    gpu_visible: bool  # NVML counts a GPU (and CUDA_VISIBLE_DEVICES does not hide them)
    server_gpu: bool | None = None  # the binary's --list-devices names a GPU
    python_gpu: bool | None = None  # llama-cpp-python was built with GPU offload
    slots_tier: str | None = None  # a tier that asks for parallel > 1 without a backend


def decide_auto_backend(f: AutoFacts) -> tuple[str, str, bool]:
    """(backend, because, fallback) for ``auto`` given the facts: llama-server (parallel
    slots) unless, on a GPU host, its build cannot offload while llama-cpp-python's can."""
    where = f"llama-server binary present at {f.binary}"
    if not f.gpu_visible:
        return "llama-server", f"auto: {where} (no GPU visible: CPU either way)", False
    if f.server_gpu:
        return "llama-server", f"auto: {where}, offloading to the GPU", False
    if f.python_gpu and f.slots_tier is None:
        return (
            "llama-cpp-python",
            f"auto: the {where} lists no GPU (a CPU build: rebuild it with CUDA), and "
            "llama-cpp-python offloads to the GPU",
            True,
        )
    if f.python_gpu:
        return (
            "llama-server",
            f"auto: {where}, CPU only (it lists no GPU); kept for models.{f.slots_tier}."
            "parallel, which llama-cpp-python cannot serve",
            False,
        )
    return (
        "llama-server",
        f"auto: {where}; neither it nor llama-cpp-python offloads to the GPU",
        False,
    )


def gpus_visible() -> bool:
    """Whether NVML counts a GPU this process may use (False without NVML, or when the
    driver does not answer within 5 s: through the probe's bounded executor, as every
    driver call here)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    from services.memory.probe import ProbeCalls, ProbeStepFailed

    def count() -> int:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()

    try:
        return ProbeCalls(max_threads=1).call(count, 5.0, "NVML device count") > 0
    except ProbeStepFailed:  # no driver, no library, or a hung call: no GPU to offload to
        return False


def python_gpu_offload() -> bool:
    """Whether llama-cpp-python was built with GPU offload, asked in a child process (a
    broken CUDA set-up then cannot take Edison down)."""
    import subprocess

    code = "import llama_cpp; print(bool(llama_cpp.llama_supports_gpu_offload()))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip().endswith("True")


@dataclass(frozen=True)
class BackendChoice:
    """The worker backend tiers without their own get, and why."""

    configured: str  # models.backend as written: auto, llama-server or llama-cpp-python
    backend: str  # what it means here
    because: str
    key: tuple[Any, ...] = field(default=(), repr=False)  # the settings it was decided on
    fallback: bool = False  # auto fell back to llama-cpp-python (no binary, or a CPU build)


class ModelsSettings(_Section):
    fast: TierSettings | None = Field(None, description="Always-resident small model.")
    medium: TierSettings | None = Field(None, description="Heavy-slot tier.")
    deep: TierSettings | None = Field(None, description="Heavy-slot tier.")
    reasoning: TierSettings | None = Field(None, description="Heavy-slot tier.")
    vision: VisionTierSettings | None = Field(
        None, description="Heavy-slot tier, loaded when images are present."
    )
    heavy_keep_alive_s: float = Field(
        300, ge=0, description="Idle seconds after which a heavy model is unloaded (0: never)."
    )
    load_timeout_s: float = Field(
        120, gt=0, le=3600, description="A worker not ready within this time is killed."
    )
    unload_timeout_s: float = Field(
        10, gt=0, le=300, description="Grace period between SIGTERM and SIGKILL of a worker."
    )
    n_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads per worker (default: llama.cpp's)."
    )
    backend: Literal["auto", "llama-server", "llama-cpp-python"] = Field(
        "auto",
        description="Worker process of every tier: `llama-server` (llama.cpp's C++ server: "
        "parallel slots, continuous batching), `llama-cpp-python` (python -m "
        "llama_cpp.server, one request at a time), or `auto`: llama-server where its binary "
        "is present, else llama-cpp-python; on a GPU host, llama-cpp-python when the "
        "llama-server build lists no GPU and llama-cpp-python's offloads (logged, and shown "
        "in /system/memory). Per tier: models.<tier>.backend.",
    )
    llama_server_binary: Path | None = Field(
        None,
        description="The llama-server executable (default: bin/llama-server of Edison's venv, "
        "which `make install` builds from the llama.cpp that llama-cpp-python vendors).",
    )
    llama_server_cache_ram_mb: int = Field(
        256,
        ge=0,
        le=1048576,
        description="Cap on each llama-server worker's prompt cache in RAM (`--cache-ram`; "
        "llama.cpp's own default is 8192), counted in the load's RAM need. 0 turns it off.",
    )
    min_residency_s: float = Field(
        30,
        ge=0,
        le=3600,
        description="A heavy model loaded less than this long ago is not evicted by a chat "
        "for another heavy tier on its device: the chat goes to another device, waits, or "
        "falls back. The gate may still evict it for an image, video or music task.",
    )
    max_residency_wait_s: float = Field(
        10,
        ge=0,
        le=3600,
        description="Longest a chat waits for a heavy model's residency to end; a longer wait "
        "falls back along the tier chain instead.",
    )

    def tiers(self) -> dict[str, TierSettings]:
        """The configured tiers, in loading order, absent ones left out."""
        return {name: t for name in TIER_NAMES if (t := getattr(self, name)) is not None}

    _choice: BackendChoice | None = PrivateAttr(None)

    def backend_choice(self) -> BackendChoice:
        """What ``models.backend`` means here: ``auto`` is llama-server where its binary is
        present (a file Edison may run), else llama-cpp-python. Decided once per value."""
        key = (self.backend, self.llama_server_binary)
        if self._choice is not None and self._choice.key == key:
            return self._choice
        if self.backend != "auto":
            choice = BackendChoice(self.backend, self.backend, "configured", key)
        else:
            binary = self.llama_server_binary or default_llama_server()
            if binary.is_file() and os.access(binary, os.X_OK):
                backend, why, fallback = decide_auto_backend(self._auto_facts(binary))
                choice = BackendChoice("auto", backend, why, key, fallback=fallback)
            else:
                why = f"auto: no llama-server binary at {binary} (build it with `make install`)"
                choice = BackendChoice("auto", "llama-cpp-python", why, key, fallback=True)
        self._choice = choice
        return choice

    def _auto_facts(self, binary: Path) -> AutoFacts:
        """The facts ``auto`` needs, probing only what can change the answer: on a host
        without a GPU, nothing beyond NVML's count."""
        if not gpus_visible():
            return AutoFacts(binary, gpu_visible=False)
        from services.llm.backend_llama_server import inspect_binary

        if inspect_binary(binary).gpu_offload:
            return AutoFacts(binary, gpu_visible=True, server_gpu=True)
        slots = next(
            (n for n, t in self.tiers().items() if t.backend is None and (t.parallel or 1) > 1),
            None,
        )
        return AutoFacts(binary, True, False, python_gpu_offload(), slots)

    def backend_of(self, tier: TierSettings) -> str:
        """The worker backend a tier runs on: its own, else models.backend (``auto``
        resolved, see :meth:`backend_choice`)."""
        return tier.backend or self.backend_choice().backend

    def parallel_of(self, tier: TierSettings) -> int:
        """Slots of a tier's worker: its own, else 4 on llama-server, 1 on llama-cpp-python."""
        if tier.parallel is not None:
            return tier.parallel
        return 4 if self.backend_of(tier) == "llama-server" else 1

    @model_validator(mode="after")
    def _parallel_needs_llama_server(self) -> ModelsSettings:
        for name, tier in self.tiers().items():
            if self.parallel_of(tier) > 1 and self.backend_of(tier) != "llama-server":
                why = f" ({self.backend_choice().because})" if tier.backend is None else ""
                raise ValueError(
                    f"{name}.parallel {tier.parallel} needs backend llama-server: "
                    f"llama-cpp-python serves one request at a time{why}"
                )
        return self


class LadderSettings(_Section):
    gpu_layers: list[int] = Field(
        [32, 20, 12, 4, 0],
        min_length=1,
        description="GPU layer counts tried after the configured one when a load fails.",
    )
    context: list[int] = Field(
        [4096, 2048, 1024],
        min_length=1,
        description="Context sizes tried after the configured one when a load fails.",
    )

    @model_validator(mode="after")
    def _non_negative(self) -> LadderSettings:
        if any(v < 0 for v in self.gpu_layers):
            raise ValueError("gpu_layers must be >= 0")
        if any(v < 64 for v in self.context):
            raise ValueError("context sizes must be >= 64")
        return self


class PipelineSettings(_Section):
    pipeline: Path | None = Field(
        None, description="Local diffusers pipeline folder (with model_index.json)."
    )
    required_vram_mb: int = Field(
        4000, ge=0, le=1048576, description="VRAM the gate frees before a run on a GPU."
    )
    required_ram_mb: int = Field(
        2000, ge=0, le=1048576, description="RAM the gate checks before a run on the CPU."
    )
    keep_alive_s: float = Field(
        300, ge=0, description="Idle seconds before the loaded pipeline is released (0: at once)."
    )
    max_steps: int = Field(50, ge=1, le=1000, description="Largest `steps` a request may ask.")
    default_steps: int = Field(25, ge=1, le=1000, description="`steps` when a request omits it.")
    device: Literal["auto"] | Annotated[int, Field(ge=0, le=63)] = Field(
        "auto",
        description="GPU index this pipeline runs on, or `auto`: the device that holds the "
        "task's need with the least unloading (an idle device before a busy one).",
    )
    preload: bool = Field(
        False,
        description="Load the pipeline at start-up and run one tiny warm-up step on its device "
        "before /ready (the first request then pays no load and no kernel warm-up).",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Weights' dtype. `auto`: float32 on the CPU; on a GPU the folder's own "
        "16-bit dtype when its weights are stored in one, else bfloat16 for transformer (DiT) "
        "pipelines on cards that have it and float16 for UNet ones.",
    )
    placement: Literal["auto", "full", "offload_blocks", "offload_model", "sequential"] = Field(
        "auto",
        description="Where the weights live while it runs. `auto`: the fastest rung of the "
        "placement ladder whose need fits what is usable (full residency, VAE tiling, fp8 "
        "storage, block offload, model offload, leaf offload); another value pins that rung.",
    )
    fp8: Literal["auto", "off"] = Field(
        "auto",
        description="`auto`: the ladder may store the denoiser's weights in float8 and cast "
        "each layer as it runs (where the model supports it); `off`: never.",
    )
    pin_memory: bool = Field(
        True,
        description="Offloaded weights in pinned host memory (faster copies with CUDA streams), "
        "when the ledger's usable RAM holds a pinned copy; else they stay pageable.",
    )
    max_image_mb: float = Field(
        20, gt=0, le=1024, description="Largest input `image` / `last_image` (decoded MB)."
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=64, description="Largest input image, width x height in pixels."
    )

    @model_validator(mode="after")
    def _a_diffusers_folder(self) -> PipelineSettings:
        folder = self.pipeline
        if folder is not None and folder.is_dir() and not (folder / "model_index.json").is_file():
            what = (
                "a transformers model (config.json), such as MusicGen"
                if (folder / "config.json").is_file()
                else "not a diffusers pipeline folder"
            )
            raise ValueError(
                f"pipeline {folder} is {what}: Edison runs diffusers pipeline folders "
                "(model_index.json), e.g. StableAudio, AudioLDM2 or ACE-Step for music"
            )
        return self

    @model_validator(mode="after")
    def _default_steps_within_limit(self) -> PipelineSettings:
        _default_within("default_steps", self.default_steps, "max_steps", self.max_steps)
        return self


class _SizedSettings(PipelineSettings):
    default_width: int | None = Field(
        None,
        ge=8,
        le=8192,
        description="`width` when a request omits it (default: the pipeline's).",
    )
    default_height: int | None = Field(
        None,
        ge=8,
        le=8192,
        description="`height` when a request omits it (default: the pipeline's).",
    )


class ImageSettings(_SizedSettings):
    max_pixels: int = Field(
        1024 * 1024, ge=64, description="Largest width x height a request may ask."
    )
    max_images: int = Field(4, ge=1, le=64, description="Largest `num_images` a request may ask.")


class VideoSettings(_SizedSettings):
    required_vram_mb: int = Field(
        6000, ge=0, le=1048576, description="VRAM the gate frees before a run on a GPU."
    )
    max_pixels: int = Field(1280 * 720, ge=64, description="Largest width x height per frame.")
    max_frames: int = Field(
        257, ge=1, le=1024, description="Largest `num_frames` a request may ask."
    )
    default_frames: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="`num_frames` when a request omits it (default: the pipeline's).",
    )

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> VideoSettings:
        _default_within("default_frames", self.default_frames, "max_frames", self.max_frames)
        return self


class MusicSettings(PipelineSettings):
    max_duration_s: float = Field(
        47, gt=0, le=600, description="Longest `duration_s` a request may ask."
    )
    default_duration_s: float | None = Field(
        None,
        gt=0,
        le=600,
        description="`duration_s` when a request omits it (default: the "
        "pipeline's own, capped at `max_duration_s`).",
    )

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> MusicSettings:
        _default_within(
            "default_duration_s", self.default_duration_s, "max_duration_s", self.max_duration_s
        )
        return self


def _default_within(name: str, value: float | None, limit: str, most: float) -> None:
    """A configured default above its own maximum would make every request that omits
    the field a 422: refuse the config instead, naming both keys."""
    if value is not None and value > most:
        raise ValueError(f"{name} ({value:g}) is above {limit} ({most:g})")


class GenerationSettings(_Section):
    image: ImageSettings = Field(default_factory=ImageSettings, description="/generate-image.")
    video: VideoSettings = Field(default_factory=VideoSettings, description="/generate-video.")
    music: MusicSettings = Field(default_factory=MusicSettings, description="/generate-music.")


class SwarmSettings(_Section):
    degraded_threshold_mb: int = Field(
        5000, ge=0, description="Below this free VRAM every agent shares the fallback tier."
    )
    fallback_tier: Literal["fast", "medium", "deep", "reasoning"] = Field(
        "fast", description="Tier all agents share in degraded mode."
    )
    max_agents: int = Field(8, ge=1, le=64, description="Most agents one swarm request may name.")
    vision_keywords: list[str] = Field(
        ["image", "picture", "photo", "screenshot", "diagram", "look at", "see"],
        description="Words in a prompt that call for the vision model.",
    )


class QueueSettings(_Section):
    max_waiting: int = Field(
        16, ge=0, le=10000, description="Heavy tasks that may wait for the gate; more get 503."
    )
    max_wait_s: float = Field(
        600, gt=0, le=86400, description="Longest a heavy task waits for the gate before a 503."
    )


class Settings(BaseSettings):
    """The whole configuration of one Edison app."""

    model_config = SettingsConfigDict(
        env_prefix="EDISON__", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    server: ServerSettings = Field(default_factory=ServerSettings, description="HTTP server.")
    memory: MemorySettings = Field(default_factory=MemorySettings, description="Memory probe.")
    models: ModelsSettings = Field(default_factory=ModelsSettings, description="LLM tiers.")
    ladder: LadderSettings = Field(default_factory=LadderSettings, description="Load ladder.")
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="Generation endpoints."
    )
    swarm: SwarmSettings = Field(default_factory=SwarmSettings, description="Swarm policy.")
    queue: QueueSettings = Field(default_factory=QueueSettings, description="Heavy-task queue.")
    cluster: ClusterSettings | None = Field(
        None, description="Several hosts as one service (off without this section)."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Why: the YAML file arrives as init kwargs; environment variables must win over it.
        return (env_settings, init_settings)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative paths in a config file relative to the file's folder."""

    def fix(section: dict[str, Any] | None, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            p = Path(section[key]).expanduser()
            section[key] = str(p if p.is_absolute() else (base / p))

    fix(data.get("server"), "outputs_dir")
    fix(data.get("memory"), "state_dir")
    fix(data.get("models"), "llama_server_binary")
    for tier in (data.get("models") or {}).values():
        fix(tier, "path")
        fix(tier, "clip_path")
    for pipe in (data.get("generation") or {}).values():
        fix(pipe, "pipeline")


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "(top level)"
    msg = error["msg"]
    if error["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{loc}: {msg}"


def check_files(settings: Settings, source: str) -> None:
    """Fail when a model or pipeline path in config cannot be read."""
    problems = []
    for name, tier in settings.models.tiers().items():
        for key in ("path", "clip_path"):
            p = getattr(tier, key, None)
            if p is not None and not (p.is_file() and os.access(p, os.R_OK)):
                problems.append(f"models.{name}.{key}: cannot read file {p}")
    for name in KINDS:
        p = getattr(settings.generation, name).pipeline
        if p is not None and not (p / "model_index.json").is_file():
            problems.append(f"generation.{name}.pipeline: no diffusers pipeline at {p}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems), source=source, problems=problems)


def load_settings(path: str | Path | None = None, *, check_paths: bool = True) -> Settings:
    """Read, validate and return the settings; raise ConfigError naming file, key and problem."""
    path = Path(path or os.environ.get("EDISON_CONFIG") or DEFAULT_CONFIG)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        msg = f"{source}: cannot read config file ({exc.strerror})"
        raise ConfigError(msg, source=source) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}", source=source) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections", source=source)
    _resolve_paths(data, path.resolve().parent)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError(
            f"{source}: " + "; ".join(problems), source=source, problems=problems
        ) from None
    if check_paths:
        check_files(settings, source)
    return settings
