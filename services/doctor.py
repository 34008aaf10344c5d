"""`edison doctor`: what this machine offers Edison, and why each probe step said what it said."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from services.memory_probe import MemoryProbe
from services.settings import Settings


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        return {"installed": False, "reason": str(exc)}
    info: dict[str, Any] = {
        "installed": True,
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if info["cuda_available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _llama_info() -> dict[str, Any]:
    try:
        import llama_cpp
    except ImportError as exc:
        return {"installed": False, "reason": str(exc)}
    return {
        "installed": True,
        "version": llama_cpp.__version__,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    }


def diagnose(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings()
    probe = MemoryProbe(
        timeout_s=settings.memory.probe_timeout_s, vram_budget_mb=settings.memory.vram_budget_mb
    )
    try:
        snap = probe.snapshot()
    finally:
        probe.shutdown()
    return {
        "snapshot": snap.to_dict(),
        "probe": {
            "answered": probe.report.answered,
            "steps": {k: asdict(v) for k, v in probe.report.steps.items()},
        },
        "torch": _torch_info(),
        "llama_cpp": _llama_info(),
    }


def format_report(report: dict[str, Any]) -> str:
    snap = report["snapshot"]
    lines = [
        f"RAM: {snap['ram_available_mb']:.0f} MB available of {snap['ram_total_mb']:.0f} MB",
        f"VRAM source: {snap['vram_source']}",
    ]
    for g in snap["gpus"]:
        lines.append(
            f"  GPU {g['index']} {g['name']}: {g['free_mb']:.0f} MB free of {g['total_mb']:.0f} MB"
        )
    if not snap["gpus"]:
        lines.append("  no GPU: models and pipelines run on the CPU")
    lines.append("Probe ladder:")
    for name, step in report["probe"]["steps"].items():
        state = {True: "answered", False: "failed", None: "not tried"}[step["ok"]]
        lines.append(f"  {name:<11} {state:<9} {step['ms']:7.1f} ms  {step['reason']}")
    t = report["torch"]
    if t["installed"]:
        lines.append(
            f"torch {t['version']}: CUDA build {t['cuda_build'] or 'none'}, "
            f"CUDA available: {t['cuda_available']}"
        )
    else:
        lines.append(f"torch: not installed ({t['reason']})")
    lc = report["llama_cpp"]
    if lc["installed"]:
        lines.append(f"llama-cpp-python {lc['version']}: GPU offload built in: {lc['gpu_offload']}")
    else:
        lines.append(f"llama-cpp-python: not installed ({lc['reason']})")
    return "\n".join(lines)
