"""Response models shown on the docs page. Request models live beside their router."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str = Field(description="Stable machine-readable error code.", examples=["queue_full"])
    message: str = Field(description="What went wrong, for a person.")


class ErrorBody(BaseModel):
    """The one error body of the whole API."""

    error: ErrorDetail


class GpuInfo(BaseModel):
    index: int = Field(description="GPU index as the driver numbers it.")
    name: str = Field(examples=["NVIDIA H200"])
    total_mb: float = Field(description="Total memory (capped by memory.vram_budget_mb).")
    used_mb: float = Field(description="Memory in use by every process on the card.")
    free_mb: float = Field(description="Free memory as the driver reports it (capped by budget).")
    budget_mb: float | None = Field(None, description="memory.vram_budget_mb when set.")


class DeviceBudgetInfo(BaseModel):
    device: str = Field(description="`cuda:<index>` or `cpu`.", examples=["cuda:0"])
    capacity_mb: float
    driver_free_mb: float
    held_mb: float = Field(description="What Edison's ledger holds on the device.")
    reserve_mb: float = Field(description="Headroom never handed out.")
    usable_mb: float = Field(
        description="min(driver_free, capacity - held) - reserve: what the gate decides on."
    )


class LoadedModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    key: str
    path: str
    n_gpu_layers: int
    n_ctx: int
    vram_estimate_mb: float
    vram_measured_mb: float | None
    rss_mb: float | None
    pid: int
    port: int
    rung: int
    loaded_at: float
    last_used_at: float
    heavy: bool


class GateInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: str = Field(description="`idle` or `busy`.", examples=["idle"])
    current: dict[str, Any] | None = Field(None, description="The running heavy task.")
    queue_length: int = 0
    last_decisions: list[dict[str, Any]] = Field(default_factory=list)


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
    device: DeviceBudgetInfo = Field(description="The figures the gate and loader decide on.")
    reservations: list[dict[str, Any]] = Field(description="The memory ledger's entries.")
    loaded_models: list[LoadedModelInfo]
    heavy_slot: str | None = Field(description="Key of the heavy model loaded, if any.")
    gate: GateInfo


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    ready: bool
    detail: str = ""
