"""Response models shared by several routers. Request models, and response models that
one router alone answers with, live beside their router.

Routers build these from the services' dataclasses with ``model_validate(obj,
from_attributes=True)``; ``tests/unit/test_response_models.py`` walks each pair so that
no figure a service computes is dropped on the way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from app.report import MemoryReport
    from services.generation.jobs import Job, JobState


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str = Field(description="Stable machine-readable error code.", examples=["queue_full"])
    message: str = Field(description="What went wrong, for a person.")


class ErrorBody(BaseModel):
    """The one error body of the whole API."""

    error: ErrorDetail


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The body is not JSON (`invalid_json`), or the prompt does not fit the model's "
    "context (`context_length_exceeded`, with the numbers).",
    401: "Missing or wrong API key (`server.api_key`).",
    404: "No such tier, job or output.",
    409: "The job is not finished (`job_not_finished`): cancel it first.",
    413: "The body is larger than `server.max_body_mb`.",
    422: "Invalid request; `error.fields` names each bad field.",
    500: "The generation failed inside its pipeline (`internal_error`); Edison stays up.",
    502: "The model's worker broke off or failed (`upstream_error`).",
    503: "Short of memory or queue space, a model or pipeline unavailable, or not ready: "
    "see `Retry-After`.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these statuses, each with the common error body."""
    return {c: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[c]} for c in codes}


class GpuInfo(BaseModel):
    index: int = Field(description="GPU index as the driver numbers it.")
    name: str = Field(examples=["NVIDIA H200"])
    total_mb: float = Field(description="Total memory (capped by memory.vram_budget_mb).")
    used_mb: float = Field(description="Memory in use by every process on the card.")
    free_mb: float = Field(description="Free memory as the driver reports it (capped by budget).")
    budget_mb: float | None = Field(None, description="memory.vram_budget_mb when set.")


class StepReportInfo(BaseModel):
    ok: bool | None = Field(description="null: not tried.")
    reason: str
    ms: float
    permanent: bool = Field(description="A failure remembered for good (no NVML, no CUDA).")
    backed_off: bool = Field(description="Skipped by snapshots until a background retry works.")
    backed_off_until: float | None = Field(description="Unix time of the next retry.")
    backoff_s: float
    failures: int = Field(description="Failures in a row.")
    last_reason: str


class ProbeReportInfo(BaseModel):
    answered: str = Field(description="The step that answered the last snapshot.")
    steps: dict[str, StepReportInfo] = Field(description="nvml, torch, nvidia-smi.")


class DeviceBudgetInfo(BaseModel):
    device: str = Field(description="`cuda:<index>` or `cpu`.", examples=["cuda:0"])
    capacity_mb: float
    driver_free_mb: float
    held_mb: float = Field(description="What Edison's ledger holds on the device.")
    reserve_mb: float = Field(description="Headroom never handed out.")
    usable_mb: float = Field(
        description="min(driver_free, capacity - held) - reserve: what the gate decides on."
    )


class ReservationInfo(BaseModel):
    id: int
    device: str
    owner: str = Field(description="`model:<tier>`, `task:<reason>`.")
    kind: str = Field(description="model, task or pipeline.")
    mb: float = Field(description="The estimate, or the measured figure once settled.")
    settled: bool = Field(description="Whether `mb` was measured (after a load) or estimated.")
    created_at: float


class LoadedModelInfo(BaseModel):
    key: str = Field(description="The tier.")
    path: str
    n_gpu_layers: int = Field(description="GPU layers the load really used (the rung's).")
    n_ctx: int = Field(description="Context the load really used.")
    vram_estimate_mb: float = Field(description="GGUF-header estimate plus the CUDA context.")
    vram_measured_mb: float | None = Field(
        description="What the load measured on the GPU (see `settled_from`); null: nothing "
        "measured there."
    )
    rss_mb: float | None = Field(description="Resident memory of the worker process.")
    pid: int
    port: int
    rung: int = Field(description="Index of the ladder rung that loaded.")
    loaded_at: float
    last_used_at: float
    heavy: bool
    device: str
    ram_estimate_mb: float
    ready_ms: float = Field(description="Worker start to ready.")
    active: int = Field(description="Requests in flight on the model.")
    backend: str = Field(description="`llama-cpp-python` or `llama-server`.")
    parallel: int = Field(description="Requests the worker serves at once (its slots).")
    slot_ctx: int = Field(
        description="Context one request may fill: n_ctx, or its share per slot on llama-server."
    )
    devices: list[str] = Field(
        description="Every device the model is placed on (several when split across GPUs)."
    )
    settled_from: str = Field(
        description="What the ledger's figure for it came from: `nvml_process` (NVML lists "
        "the worker), `device_delta` (the device's used memory before and after the load: "
        "a container), `rss` (no GPU layers: its resident memory) or `estimate`."
    )
    projector_mb: float = Field(
        description="A vision projector's estimated need, included in the reservation."
    )


class GateDecisionInfo(BaseModel):
    ok: bool
    reason: str = Field(description="The task, e.g. `image: a lighthouse`.")
    device: str
    required_mb: float = Field(description="What the task reserved.")
    need_source: str = Field(
        description="`learned` (predicted from measured runs), `prior` (the configured "
        "`required_vram_mb` / `required_ram_mb`) or `given`."
    )
    need_detail: str = Field(description="What the need is of, e.g. `1 x 512x512 image`.")
    usable_mb: float = Field(description="Usable at the last check.")
    freed_mb: float = Field(description="Driver-free memory gained while making room, measured.")
    waited_ms: float
    actions: list[str] = Field(description="What was unloaded, in order.")
    budget: DeviceBudgetInfo = Field(description="The figures of the last check.")
    ceiling_mb: float = Field(
        description="The most unloading everything Edison holds could make usable; a need "
        "above it is refused at once, unloading nothing."
    )
    at: float = Field(description="Unix time of the decision.")
    placed_because: str = Field(
        description="Why the task went to this device (with several: idle gate, pipeline "
        "loaded, free room, least to unload)."
    )
    rung: str | None = Field(
        None,
        description="The placement rung a generation runs at: `full`, `vae_tiling`, `fp8`, "
        "`offload_blocks`, `offload_model` or `sequential` (null: not a generation request).",
    )
    rung_because: str = Field(
        "",
        description="Why that rung: its need against what was usable (`estimated` before "
        "the rung was measured), its speed against full residency, the faster rungs' needs.",
    )


class HeavyTaskInfo(BaseModel):
    reason: str
    kind: str | None
    device: str
    required_mb: float
    queued_ms: float
    decision: GateDecisionInfo
    started_at: float
    running_s: float


class QueueEntryInfo(BaseModel):
    position: int = Field(description="1 is next.")
    reason: str
    kind: str | None
    ticket: str | None = Field(description="The waiting job's id.")
    queued_at: float
    device: str = Field(description="The device whose line it waits in.")


class LaneStateInfo(BaseModel):
    """One device's line and heavy slot."""

    device: str = Field(examples=["cuda:0"])
    state: str = Field(description="`idle` or `busy`.")
    current: HeavyTaskInfo | None = Field(description="The heavy task running on the device.")
    queue_length: int = Field(description="Tasks waiting in this device's line.")
    heavy_slot: str | None = Field(description="The heavy LLM tier loaded on the device.")


class GateInfo(BaseModel):
    state: str = Field(description="`idle` or `busy`.", examples=["idle"])
    current: HeavyTaskInfo | None = Field(None, description="The running heavy task.")
    queue_length: int = 0
    queue: list[QueueEntryInfo] = Field(
        default_factory=list, description="Who waits for the gate, in the order they run."
    )
    max_waiting: int = Field(description="`queue.max_waiting`: more waiting answer 503.")
    outcomes: dict[str, int] = Field(
        default_factory=dict, description="Decisions since start: ok, refused, queue_full, ..."
    )
    last_decisions: list[GateDecisionInfo] = Field(default_factory=list)
    devices: list[LaneStateInfo] = Field(
        default_factory=list,
        description="Each device's own line (a task on one never waits behind another's).",
    )


class PipelineModelInfo(BaseModel):
    """A pipeline's learned memory model: working MB = (a + b x size) x margin."""

    key: str = Field(description="folder|dtype|device: runs of other pipelines never mix.")
    unit: str = Field(description="What size counts: `latent elements` or `audio samples`.")
    samples: int = Field(description="Measured runs kept.")
    learned: bool = Field(description="Whether predictions come from the fit yet.")
    a_mb: float | None
    b_mb_per_unit: float | None
    margin: float | None = Field(description="p95 of measured / fitted, x margin_factor, >= 1.1.")
    resident_mb: float | None = Field(description="Weights and what runs left, measured.")
    oom_marks: int = Field(description="CUDA out-of-memory events that floor predictions.")
    dropped: int = Field(description="Impossible measurements refused.")
    last_size: float | None
    last_predicted_mb: float | None = Field(description="Working MB the last run was predicted.")
    last_measured_mb: float | None = Field(description="Working MB it really took.")


class WorkerOverheadInfo(BaseModel):
    device: str
    mb: float = Field(description="What an LLM worker needs beyond its GGUF estimate.")
    samples: int = Field(description="Loads measured on the device.")
    source: str = Field(description="`learned` or `prior` (memory.worker_overhead_prior_mb).")
    backend: str = Field(description="The worker backend it is of (learned per backend).")


class DeviceReportInfo(BaseModel):
    """One device Edison places work on."""

    budget: DeviceBudgetInfo
    worker_overhead: WorkerOverheadInfo
    lane: LaneStateInfo


class PipelineInputsInfo(BaseModel):
    """The request inputs a pipeline takes besides the prompt."""

    prompt: bool = Field(description="Takes `prompt` (Stable Video Diffusion does not).")
    image: bool = Field(description="Takes `image`.")
    image_required: bool = Field(description="Cannot run without `image` (image-to-video).")
    last_image: bool = Field(description="Takes `last_image` (Wan image-to-video).")
    lyrics: bool = Field(description="Takes `lyrics` (ACE-Step).")
    negative_prompt: bool
    guidance: bool = Field(description="Takes `guidance_scale`.")


class FrameRuleInfo(BaseModel):
    step: int = Field(description="Frame counts of the form step x k + 1; 1: any count.")
    text: str = Field(examples=["4k+1"])


class PipelineCapsInfo(BaseModel):
    """What a pipeline folder can do, read from the folder: what requests are checked
    against, and how its calls are built."""

    class_name: str = Field(examples=["WanPipeline"])
    denoiser: str | None = Field(description="`transformer` (a DiT) or `unet`.")
    size_multiple: int = Field(description="`width` and `height` must be multiples of it.")
    frame_rule: FrameRuleInfo
    default_width: int | None
    default_height: int | None
    default_frames: int | None
    default_fps: float | None = Field(description="The frame rate the pipeline assumes.")
    default_duration_s: float | None = Field(description="Music: the pipeline's own default.")
    max_duration_s: float | None = Field(description="Music: its longest clip.")
    sample_rate: int | None = Field(description="Music, and a video pipeline's audio track.")
    audio_channels: int | None
    published_dtype: str | None = Field(description="The 16-bit dtype its weights are stored in.")
    inputs: PipelineInputsInfo
    frame_rate_param: str | None = Field(description="The call argument `fps` goes to.")
    duration_param: str | None = Field(description="The call argument `duration_s` goes to.")
    guidance_param: str | None = Field(description="The call argument `guidance_scale` goes to.")
    video_audio: bool = Field(description="A video pipeline whose MP4 carries an audio track.")
    min_steps: int = Field(description="Fewest `steps` its scheduler runs (LTX: 2).")
    max_frames: int | None = Field(description="Most frames it makes (AnimateDiff: 32).")
    source: str = Field(description="`config`: read from the folder's config files.")


class PipelineInfoOut(BaseModel):
    kind: str = Field(examples=["image"])
    folder: str | None
    loaded: bool
    running: bool = Field(description="A run holds the pipeline now.")
    device: str
    dtype: str | None = Field(description="Weights' dtype while loaded.", examples=["float16"])
    class_name: str | None
    placement: str | None = Field(
        description="The placement rung it is loaded at (`full`, `vae_tiling`, `fp8`, "
        "`offload_blocks`, `offload_model`, `sequential`); null while not loaded.",
        examples=["full"],
    )
    weights_mb: float | None = Field(description="Parameters and buffers held, measured.")
    persisted_mb: float | None = Field(description="What runs left allocated since the load.")
    loads: int = Field(description="Loads since start.")
    last_used_at: float
    load_error: str | None
    sample_rate: int | None = Field(None, description="Music: output sample rate.")
    max_duration_s: float | None = Field(None, description="Music: the longest clip.")
    memory_model: PipelineModelInfo | None = Field(
        None, description="What a request is predicted to need, learned from measured runs."
    )
    dtype_reason: str | None = Field(
        None, description="Why that dtype (`generation.<kind>.dtype`), while loaded."
    )
    caps: PipelineCapsInfo | None = Field(
        None, description="What the folder can do; null until it has been read."
    )
    placement_detail: str | None = Field(
        None, description="The rung as applied, e.g. what block offload keeps resident."
    )
    offloaded_mb: float | None = Field(
        None, description="Weights an offload rung keeps in host RAM (held in the ledger)."
    )
    unsupported_rungs: dict[str, str] = Field(
        default_factory=dict,
        description="Rungs this folder's model cannot take, and why (skipped from then on).",
    )


class LlmBackendInfo(BaseModel):
    configured: str = Field(description="`models.backend` as configured (`auto` by default).")
    backend: str = Field(description="What it means here: `llama-server` or `llama-cpp-python`.")
    because: str = Field(description="Why: configured, or what `auto` found.")
    fallback: bool = Field(
        description="True when `auto` fell back to llama-cpp-python: no llama-server binary."
    )


class SystemMemory(BaseModel):
    """Memory now, with what is loaded and what the gate is doing."""

    ram_total_mb: float
    ram_available_mb: float
    ram_used_mb: float
    gpus: list[GpuInfo]
    vram_source: str = Field(
        description="Probe step that answered: nvml, torch, nvidia-smi or none.",
        examples=["nvml"],
    )
    timestamp: float = Field(description="Unix time of the snapshot.")
    probe_ms: float = Field(description="How long the probe took.")
    probe: ProbeReportInfo = Field(
        description="What each step of the probe ladder said; a backed-off step says why."
    )
    device: DeviceBudgetInfo = Field(description="The figures the gate and loader decide on.")
    worker_overhead: WorkerOverheadInfo = Field(
        description="What an LLM worker costs on the device beyond its GGUF estimate."
    )
    reservations: list[ReservationInfo] = Field(description="The memory ledger's entries.")
    loaded_models: list[LoadedModelInfo]
    heavy_slot: str | None = Field(description="Key of the heavy model loaded, if any.")
    gate: GateInfo
    pipelines: list[PipelineInfoOut] = Field(
        description="Generation pipelines Edison has hosted: loaded or not, what they hold."
    )
    jobs: list[JobView] = Field(
        description="Generation jobs not done: running first, then by place in line."
    )
    devices: list[DeviceReportInfo] = Field(
        description="Every device Edison places work on, with its budget, line and heavy slot "
        "(`device` above is the first)."
    )
    llm_backend: LlmBackendInfo = Field(
        description="The worker backend of LLM tiers without their own `backend`."
    )


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    ready: bool
    detail: str = ""


class OutputInfo(BaseModel):
    url: str = Field(description="Where to fetch the file: GET /outputs/{name}.")
    name: str
    media_type: str = Field(examples=["image/png"])
    width: int | None = Field(None, description="Image and video: pixels.")
    height: int | None = Field(None, description="Image and video: pixels.")
    frames: int | None = Field(None, description="Video: frames in the file.")
    fps: int | None = Field(None, description="Video: frames per second.")
    duration_s: float | None = Field(None, description="Video and music: seconds.")
    sample_rate: int | None = Field(None, description="Music: samples per second.")
    channels: int | None = Field(None, description="Music: audio channels.")


class JobProgressInfo(BaseModel):
    done: int = Field(description="Steps done.")
    total: int = Field(description="Steps in all.")


class JobTimingsInfo(BaseModel):
    queued: float | None = Field(None, description="Waiting for the gate, ms.")
    load: float | None = Field(None, description="Loading the pipeline, ms (0: it was loaded).")
    run: float | None = Field(None, description="Running the pipeline, ms.")
    total: float | None = Field(None, description="Request to done, ms.")
    imports: float | None = Field(
        None, description="Importing torch/diffusers inside this job's load, ms (null: before)."
    )
    warmup: float | None = Field(
        None,
        description="Set when this was the first run after a load: `run`, which then also "
        "loaded the device's kernels, ms (preload does this at start-up instead).",
    )


class GenerationParamsInfo(BaseModel):
    prompt: str
    negative_prompt: str | None
    steps: int | None = Field(description="Denoising steps (the config's default filled in).")
    guidance_scale: float | None
    seed: int | None = Field(description="As asked (null: Edison picks one; see the job's seed).")
    width: int | None
    height: int | None
    num_images: int
    num_frames: int | None
    fps: int | None
    video_format: str
    duration_s: float | None
    lyrics: str | None = None
    round_to_valid: bool = False


class AdjustmentInfo(BaseModel):
    """A value changed on request (`round_to_valid`) to one the pipeline makes exactly."""

    field: str = Field(examples=["num_frames"])
    asked: float = Field(examples=[8])
    used: float = Field(examples=[9])


class JobView(BaseModel):
    job_id: str
    kind: str
    params: GenerationParamsInfo = Field(
        description="What the request asked for, with the defaults filled in (the request's, "
        "else the config's, else the pipeline's own) and `adjustments` applied. Input images "
        "are not echoed."
    )
    adjustments: list[AdjustmentInfo] = Field(
        default_factory=list,
        description="What `round_to_valid` changed: the request's value and the one produced.",
    )
    status: str = Field(description="queued, running, succeeded, failed or cancelled.")
    progress: JobProgressInfo
    outputs: list[OutputInfo]
    seed: int | None = Field(description="The seed used (reported when the request gave none).")
    gate: GateDecisionInfo | None = Field(description="How the gate made room for the job.")
    timings_ms: JobTimingsInfo
    error: ErrorDetail | None = Field(description="Why it failed or was cancelled.")
    created_at: float
    started_at: float | None = Field(description="When it got the gate.")
    finished_at: float | None
    position: int | None = Field(
        description="Place in line: 0 running, 1 next, ...; null once done."
    )
    eta_s: float | None = Field(
        description="Seconds until it is expected to finish, from the measured durations of "
        "past jobs of its kind and size (its own progress once running); null once done."
    )
    device: str | None = Field(
        description="The device whose line the job waits in, or that it ran on "
        "(`cuda:1`, `cpu`); null before it is placed."
    )


def job_view(job: Job | JobState) -> JobView:
    """A generation job (or a frozen copy of one) as the API shows it (the error in the
    common error shape)."""
    error = job.error
    return JobView(
        job_id=job.id,
        kind=job.kind,
        params=GenerationParamsInfo.model_validate(job.params, from_attributes=True),
        adjustments=[
            AdjustmentInfo.model_validate(a, from_attributes=True) for a in job.adjustments
        ],
        status=job.status,
        progress=JobProgressInfo.model_validate(job.progress, from_attributes=True),
        outputs=[OutputInfo.model_validate(o, from_attributes=True) for o in job.outputs],
        seed=job.seed,
        gate=None
        if job.gate is None
        else GateDecisionInfo.model_validate(job.gate, from_attributes=True),
        timings_ms=JobTimingsInfo.model_validate(job.timings_ms, from_attributes=True),
        error=None
        if error is None
        else ErrorDetail(code=error.code, message=error.message, **error.details),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        position=job.position,
        eta_s=job.eta_s,
        device=job.device,
    )


def system_memory_view(report: MemoryReport) -> SystemMemory:
    """The memory report as the API shows it (jobs in the job answer's shape)."""
    fields = {f: getattr(report, f) for f in SystemMemory.model_fields if f != "jobs"}
    return SystemMemory.model_validate(
        {**fields, "jobs": [job_view(j) for j in report.jobs]}, from_attributes=True
    )


# SystemMemory names JobView, defined after it.
SystemMemory.model_rebuild()
