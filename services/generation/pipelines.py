"""Hosting one diffusers pipeline (image, video or music): load, run, write files, unload.

Framework-free and blocking: the caller runs these methods in a worker thread and decides
*when* to load or unload (the memory gate); this module only knows *how*. Families are told
apart by what their ``__call__`` accepts, so any StableDiffusion/SDXL, AnimateDiff/
TextToVideoSD/CogVideoX or StableAudio/AudioLDM/MusicLDM folder works without a table.
"""

from __future__ import annotations

import logging
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from services.errors import Cancelled, InsufficientMemory, ModelUnavailable
from services.generation.calls import call_kwargs
from services.generation.capabilities import (
    PipelineCaps,
    choose_dtype,
    diffusers_name,
    read_caps,
)
from services.generation.outputs import write_outputs
from services.generation.params import GenerationParams, RunResult
from services.generation.placement_ladder import (
    RUNGS,
    RungPlan,
    RungUnsupported,
    is_device_mismatch,
    set_vae_savers,
)
from services.memory.learning import PipelineModelView
from services.memory.peak import measure
from services.memory.placement import flush_gpu_memory
from services.settings import KINDS

log = logging.getLogger("edison.generation")

OOM_MESSAGES = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory")


@dataclass(frozen=True)
class PipelineInfo:
    """One pipeline host as an operator sees it: what it holds and where."""

    kind: str
    folder: str | None
    loaded: bool
    running: bool  # a run holds it now (set by the registry)
    device: str
    dtype: str | None  # torch dtype of the loaded weights
    class_name: str | None
    placement: str | None  # the rung it is loaded at (placement_ladder.py); None: not loaded
    weights_mb: float | None  # parameters and buffers of the loaded components, measured
    persisted_mb: float | None  # what runs left allocated since the load, measured
    loads: int  # loads since start
    last_used_at: float
    load_error: str | None
    sample_rate: int | None = None  # music
    max_duration_s: float | None = None  # music: the pipeline's longest clip
    memory_model: PipelineModelView | None = None  # the learned need (set by the registry)
    dtype_reason: str | None = None  # why that dtype (generation.<kind>.dtype)
    caps: PipelineCaps | None = None  # what the folder can do (read before the first load)
    placement_detail: str | None = None  # the rung as applied: what it keeps resident
    offloaded_mb: float | None = None  # weights an offload rung keeps in host RAM
    unsupported_rungs: dict[str, str] = field(default_factory=dict)  # set by the registry


class PipelineOOM(InsufficientMemory):
    """The accelerator ran out of memory during a load or run.

    The caller can free other models and retry at the next rung. It subclasses
    InsufficientMemory so that, if it ever escapes, the client gets the out-of-VRAM answer.
    """


def is_cuda_oom(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it wraps) is torch's out-of-memory error."""
    import torch

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is an alias
            return True
        # Why the text check: cuBLAS/cuDNN allocation failures surface as a plain RuntimeError
        # with no OOM type; only torch's own fixed messages are matched, never a library's.
        if type(exc) is RuntimeError and any(m in str(exc) for m in OOM_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class PipelineHost:
    """Owns one diffusers pipeline for one kind ("image" | "video" | "music").

    Every method blocks; call them from a worker thread. ``describe`` and ``loaded`` never
    wait, so a status page can read them while a run is in progress.
    """

    def __init__(
        self,
        kind: str,
        folder: Path | None,
        device: str,
        outputs_dir: Path,
        *,
        dtype: str = "auto",
        caps: PipelineCaps | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {KINDS}")
        self.kind = kind
        self.folder = Path(folder) if folder is not None else None
        self.device = device
        self.outputs_dir = Path(outputs_dir)
        self.last_used_at = 0.0
        self.load_error: str | None = None
        self.loads = 0
        self.runs_since_load = 0
        self.import_ms = 0.0  # importing the generation stack inside the last load
        self.persisted_mb = 0.0  # what runs left allocated since the load (first-call init)
        self.weights_mb: float | None = None
        self.dtype: str | None = None
        self.dtype_setting = dtype  # generation.<kind>.dtype
        self.dtype_reason: str | None = None
        self.caps = caps
        self._pipe: Any = None
        self.plan: RungPlan | None = None  # the placement it is (or was last) loaded at
        self.offloaded_mb: float | None = None  # weights an offload rung keeps in host RAM
        self._reload = False  # an OOM left an offload rung's hooks half way: load again
        # Why: load, run and unload all mutate self._pipe. Without the lock an unload from the
        # idle reaper could free the weights under a running denoising loop, or two loads could
        # race and hold the pipeline twice in VRAM.
        self._lock = threading.Lock()

    # -- state -------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def describe(self, *, running: bool = False) -> PipelineInfo:
        """A snapshot for status pages; never waits for a run."""
        pipe, caps = self._pipe, self.caps
        music = caps is not None and self.kind == "music"
        return PipelineInfo(
            kind=self.kind,
            folder=str(self.folder) if self.folder is not None else None,
            loaded=pipe is not None,
            running=running,
            device=self.device,
            dtype=self.dtype if pipe is not None else None,
            class_name=type(pipe).__name__ if pipe is not None else None,
            placement=self.plan.rung if pipe is not None and self.plan else None,
            weights_mb=self.weights_mb if pipe is not None else None,
            persisted_mb=round(self.persisted_mb, 2) if pipe is not None else None,
            loads=self.loads,
            last_used_at=self.last_used_at,
            load_error=self.load_error,
            sample_rate=caps.sample_rate if music else None,
            max_duration_s=caps.max_duration_s if music else None,
            dtype_reason=self.dtype_reason if pipe is not None else None,
            caps=caps,
            placement_detail=self.plan.describe() if pipe is not None and self.plan else None,
            offloaded_mb=self.offloaded_mb if pipe is not None else None,
        )

    @property
    def resident_mb(self) -> float | None:
        """What the loaded pipeline holds on its device: weights plus what runs left."""
        return None if self.weights_mb is None else self.weights_mb + self.persisted_mb

    # -- load / unload -----------------------------------------------------------------

    def load(self, plan: RungPlan | None = None) -> float:
        """Load the pipeline at ``plan`` (default: the last one, else full residency), or
        move the loaded one there; return the milliseconds it took (0 if nothing moved)."""
        with self._lock:
            return self._place(plan)

    def unload(self) -> None:
        """Drop the pipeline and hand its memory back (waits for a run in progress)."""
        with self._lock:
            self._unload_locked()

    def _load_locked(self, plan: RungPlan | None = None) -> float:
        if self._pipe is not None:
            return 0.0
        plan = plan or self.plan or RungPlan("full")
        folder = self.folder
        if folder is None:
            self._fail("no pipeline folder is configured")
        t_import, fresh = time.perf_counter(), "diffusers" not in sys.modules
        import torch

        DiffusionPipeline = diffusers_name("DiffusionPipeline")  # noqa: N806

        self.import_ms = (time.perf_counter() - t_import) * 1000 if fresh else 0.0
        if self.caps is None:
            try:
                self.caps = read_caps(self.kind, folder)
            except ModelUnavailable as exc:
                self._fail(exc.message)
        start = time.perf_counter()
        dtype_name, self.dtype_reason = choose_dtype(self.dtype_setting, self.caps, self.device)
        log.info(
            "Pipeline %s (%s) loads in %s on %s: %s",
            self.kind,
            self.caps.class_name,
            dtype_name,
            self.device,
            self.dtype_reason,
        )
        dtype = getattr(torch, dtype_name)
        oom = unsupported = None
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, **{_dtype_kwarg(): dtype})
            pipe.set_progress_bar_config(disable=True)
            total_mb = _weights_mb(pipe)
            # Still on the CPU: the rung's hooks go on before any weight moves, so a
            # pipeline larger than the card loads (the rung moves only what it keeps).
            self._apply_rung(pipe, plan)
        except RungUnsupported as exc:
            unsupported, pipe = (exc.rung, exc.reason), None
        except Exception as exc:
            if not is_cuda_oom(exc):
                self._fail(f"{type(exc).__name__}: {exc}")
            oom = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            pipe = None
        if unsupported is not None:
            # Outside the except block, once the pipeline (hooked half way) is gone.
            flush_gpu_memory()
            raise RungUnsupported(*unsupported, kind=self.kind)
        if oom is not None:
            # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
            flush_gpu_memory()
            raise PipelineOOM(
                f"out of memory loading the {self.kind} pipeline: {oom}",
                kind=self.kind,
                device=self.device,
            )
        self._pipe = pipe
        self.plan, self._reload = plan, False
        self.load_error = None
        self.last_used_at = time.time()
        self.loads += 1
        self.runs_since_load = 0
        self.weights_mb, self.offloaded_mb = _held_mb(pipe, self.device, total_mb)
        self.persisted_mb = 0.0
        self.dtype = str(dtype).removeprefix("torch.")
        return (time.perf_counter() - start) * 1000

    def _fail(self, reason: str) -> NoReturn:
        self.load_error = reason
        raise ModelUnavailable(f"{self.kind} pipeline unavailable: {reason}", kind=self.kind)

    def _unload_locked(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None and hasattr(pipe, "remove_all_hooks"):
            pipe.remove_all_hooks()
        del pipe
        flush_gpu_memory()

    def _apply_rung(self, pipe: Any, plan: RungPlan) -> None:
        """Put ``pipe`` (on the CPU) at ``plan``; RungUnsupported when its model cannot."""
        rung = RUNGS[plan.rung]
        why = rung.unsupported(pipe)
        if why is None:
            try:
                rung.apply(pipe, self.device, plan)
                return
            except (ValueError, NotImplementedError) as exc:  # diffusers refusing a hook
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise RungUnsupported(plan.rung, why, kind=self.kind)

    def _place(self, plan: RungPlan | None) -> float:
        """Load at ``plan``, or move the loaded pipeline there: VAE tiling toggles in place;
        any other change loads again from the folder (each rung's hooks hold the weights
        their own way, and a rung below full never had them all on the device)."""
        current = self.plan
        target = plan or current or RungPlan("full")
        if self._pipe is None or (target == current and not self._reload):
            return self._load_locked(plan)
        light = ("full", "vae_tiling")
        if current is not None and {target.rung, current.rung} <= set(light) and not self._reload:
            set_vae_savers(self._pipe, target.rung == "vae_tiling")
            self.plan = target
            return 0.0
        self._unload_locked()
        return self._load_locked(target)

    # -- run -----------------------------------------------------------------------------

    def run(
        self,
        params: GenerationParams,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        plan: RungPlan | None = None,
        write: bool = True,
    ) -> RunResult:
        """Generate, write the files under ``outputs_dir``, and say what was written."""
        with self._lock:
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"{self.kind} generation cancelled before it started")
            self.import_ms = 0.0
            load_ms = self._place(plan)
            first_run = self.runs_since_load == 0
            pipe = self._pipe
            seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
            kwargs = call_kwargs(
                self.caps, params, seed, on_step=on_step, should_cancel=should_cancel
            )
            start = time.perf_counter()
            rung = self.plan.rung if self.plan is not None else "full"
            oom = mismatch = None
            try:
                with measure(self.device) as meter:
                    out = pipe(**kwargs)
            except Exception as exc:
                first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if rung != "full" and is_device_mismatch(exc):
                    mismatch = first
                elif is_cuda_oom(exc):
                    oom = first
                else:
                    raise
            finally:
                self.last_used_at = time.time()
            if mismatch is not None:  # a forward that does not follow the rung's hooks
                self._unload_locked()
                raise RungUnsupported(rung, mismatch, kind=self.kind)
            if oom is not None:
                # Outside the except block: the traceback's frames hold the activations that
                # filled the card, and they must be gone before the caller retries. An
                # offload rung's hooks may have stopped half way: the next run loads again.
                self._reload = rung not in ("full", "vae_tiling")
                flush_gpu_memory()
                raise PipelineOOM(
                    f"out of memory running the {self.kind} pipeline at {rung}: {oom}",
                    kind=self.kind,
                    device=self.device,
                    rung=rung,
                )
            run_ms = (time.perf_counter() - start) * 1000
            outputs = write_outputs(self.caps, self.outputs_dir, pipe, out, params) if write else []
            peak = meter.reading
            if peak is not None and peak.sane:
                self.persisted_mb += peak.persisted_mb
            self.runs_since_load += 1
            return RunResult(
                outputs,
                seed,
                load_ms,
                run_ms,
                used_savers=rung != "full",
                peak=peak,
                import_ms=self.import_ms,
                first_run=first_run,
            )


def _weights_mb(pipe: Any) -> float:
    """Bytes of every parameter and buffer of the pipeline's torch modules, in MB: what the
    loaded pipeline holds on its device (before any offload)."""
    import torch

    total = 0
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            for t in (*component.parameters(), *component.buffers()):
                total += t.numel() * t.element_size()
    return round(total / (1024 * 1024), 2)


def _held_mb(pipe: Any, device: str, total_mb: float) -> tuple[float, float]:
    """(on the device, in host RAM) of the loaded pipeline's weights, in MB: a tensor counts
    where it sits now (an offload rung's copies sit on the CPU between runs). On the CPU
    everything is on the device; what an offload rung keeps off the device entirely (leaf
    offload may leave nothing there) is the rest of ``total_mb``."""
    import torch

    kind = torch.device(device).type
    on, total = 0, 0
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            for t in (*component.parameters(), *component.buffers()):
                size = t.numel() * t.element_size()
                total += size
                on += size if t.device.type == kind else 0
    mb = 1024 * 1024
    if kind == "cpu":
        return round(total / mb, 2), 0.0
    return round(on / mb, 2), round(max(0.0, total_mb - on / mb), 2)


def _dtype_kwarg() -> str:
    """diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` (the old name warns)."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"
