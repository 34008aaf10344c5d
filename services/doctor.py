"""`edison doctor`: what this machine offers Edison, and why each probe step said what it said."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from services.llm.backend_llama_server import default_binary, inspect_binary
from services.memory.probe import MemoryProbe, MemorySnapshot, ProbeReport, StepReport
from services.settings import Settings


@dataclass(frozen=True)
class TorchInfo:
    installed: bool
    version: str | None = None
    cuda_build: str | None = None  # the CUDA version torch was built for; None: a CPU build
    cuda_available: bool = False
    devices: list[str] = field(default_factory=list)
    reason: str | None = None  # why it is not installed


@dataclass(frozen=True)
class LlamaCppInfo:
    installed: bool
    version: str | None = None
    gpu_offload: bool = False  # built with a GPU backend (CUDA, ...)
    reason: str | None = None


@dataclass(frozen=True)
class LlamaServerInfo:
    """The llama-server binary the llama-server backend runs."""

    path: str
    usable: bool
    version: str | None = None
    gpu_offload: bool = False  # it lists a GPU it can offload to
    devices: list[str] = field(default_factory=list)
    reason: str | None = None  # why it cannot run


@dataclass(frozen=True)
class BackendChoice:
    """Which backend the configuration gives each tier."""

    default: str
    tiers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DoctorReport:
    snapshot: MemorySnapshot
    probe: ProbeReport
    torch: TorchInfo
    llama_cpp: LlamaCppInfo
    llama_server: LlamaServerInfo
    backends: BackendChoice


def _torch_info() -> TorchInfo:
    try:
        import torch
    except ImportError as exc:
        return TorchInfo(False, reason=str(exc))
    available = torch.cuda.is_available()
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if available
        else []
    )
    return TorchInfo(True, torch.__version__, torch.version.cuda, available, devices)


def _llama_info() -> LlamaCppInfo:
    try:
        import llama_cpp
    except ImportError as exc:
        return LlamaCppInfo(False, reason=str(exc))
    return LlamaCppInfo(True, llama_cpp.__version__, bool(llama_cpp.llama_supports_gpu_offload()))


def _llama_server_info(path: Path) -> LlamaServerInfo:
    b = inspect_binary(path)
    return LlamaServerInfo(b.path, b.usable, b.version, b.gpu_offload, list(b.devices), b.reason)


def _backends(settings: Settings) -> BackendChoice:
    models = settings.models
    tiers = {name: models.backend_of(t) for name, t in models.tiers().items()}
    return BackendChoice(models.backend_choice().backend, tiers)  # `auto` resolved


def diagnose(settings: Settings | None = None) -> DoctorReport:
    settings = settings or Settings()
    probe = MemoryProbe(
        timeout_s=settings.memory.probe_timeout_s,
        vram_budget_mb=settings.memory.vram_budget_mb,
        backoff_s=settings.memory.probe_backoff_s,
        backoff_max_s=settings.memory.probe_backoff_max_s,
    )
    try:
        snap = probe.snapshot()
    finally:
        probe.shutdown()
    server = _llama_server_info(settings.models.llama_server_binary or default_binary())
    return DoctorReport(
        snap, probe.report, _torch_info(), _llama_info(), server, _backends(settings)
    )


def _backoff_line(step: StepReport) -> str:
    """Why a step is skipped by snapshots, and when the background retries it."""
    when = "now"
    if step.backed_off_until is not None:
        when = time.strftime("%H:%M:%S", time.localtime(step.backed_off_until))
    failures = f"{step.failures} failure{'s' if step.failures != 1 else ''} in a row"
    return (
        f"backed off ({failures}, back-off {step.backoff_s:g} s): skipped by snapshots, "
        f"retried in the background at {when}; last failure: {step.last_reason}"
    )


def format_report(report: DoctorReport) -> str:
    snap = report.snapshot
    lines = [
        f"RAM: {snap.ram_available_mb:.0f} MB available of {snap.ram_total_mb:.0f} MB",
        f"VRAM source: {snap.vram_source}",
    ]
    for g in snap.gpus:
        lines.append(f"  GPU {g.index} {g.name}: {g.free_mb:.0f} MB free of {g.total_mb:.0f} MB")
    if not snap.gpus:
        lines.append("  no GPU: models and pipelines run on the CPU")
    lines.append("Probe ladder:")
    for name, step in report.probe.steps.items():
        state = {True: "answered", False: "failed", None: "not tried"}[step.ok]
        permanent = " (permanent: not retried)" if step.permanent else ""
        lines.append(f"  {name:<11} {state:<9} {step.ms:7.1f} ms  {step.reason}{permanent}")
        if step.backed_off:
            lines.append(f"  {'':<11} {_backoff_line(step)}")
    t = report.torch
    if t.installed:
        lines.append(
            f"torch {t.version}: CUDA build {t.cuda_build or 'none'}, "
            f"CUDA available: {t.cuda_available}"
        )
    else:
        lines.append(f"torch: not installed ({t.reason})")
    lc = report.llama_cpp
    if lc.installed:
        lines.append(f"llama-cpp-python {lc.version}: GPU offload built in: {lc.gpu_offload}")
    else:
        lines.append(f"llama-cpp-python: not installed ({lc.reason})")
    ls = report.llama_server
    if ls.usable:
        offload = ", ".join(ls.devices) if ls.devices else "none (CPU build or no GPU)"
        lines.append(f"llama-server {ls.version} at {ls.path}: GPU offload: {offload}")
    else:
        lines.append(f"llama-server: cannot run ({ls.reason})")
    b = report.backends
    per_tier = ", ".join(f"{t} {name}" for t, name in b.tiers.items()) or "no tiers"
    lines.append(f"Worker backend: {b.default} by default; tiers: {per_tier}")
    return "\n".join(lines)
