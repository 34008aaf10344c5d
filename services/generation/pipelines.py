"""Hosting one diffusers pipeline (image, video or music): load, run, write files, unload.

Framework-free and blocking: the caller runs these methods in a worker thread and decides
*when* to load or unload (the memory gate); this module only knows *how*. Families are told
apart by what their ``__call__`` accepts, so any StableDiffusion/SDXL, AnimateDiff/
TextToVideoSD/CogVideoX or StableAudio/AudioLDM/MusicLDM folder works without a table.
"""

from __future__ import annotations

import inspect
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from services.errors import Cancelled, InsufficientMemory, ModelUnavailable
from services.generation.outputs import max_audio_s, sample_rate, write_outputs
from services.generation.params import GenerationParams, RunResult
from services.memory.learning import PipelineModelView
from services.memory.peak import measure
from services.memory.placement import flush_gpu_memory
from services.settings import KINDS

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
    savers: bool | None  # False: all on the device; True: offload/slicing on; None: unknown
    weights_mb: float | None  # parameters and buffers of the loaded components, measured
    persisted_mb: float | None  # what runs left allocated since the load, measured
    loads: int  # loads since start
    last_used_at: float
    load_error: str | None
    sample_rate: int | None = None  # music
    max_duration_s: float | None = None  # music: the pipeline's longest clip
    memory_model: PipelineModelView | None = None  # the learned need (set by the registry)


class PipelineOOM(InsufficientMemory):
    """The accelerator ran out of memory during a load or run.

    The caller can free other models and retry with ``savers=True``. It subclasses
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

    def __init__(self, kind: str, folder: Path | None, device: str, outputs_dir: Path) -> None:
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
        self._pipe: Any = None
        # False: everything on the device; True: offload/slicing on; None: unknown (after an OOM).
        self._savers: bool | None = False
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
        pipe = self._pipe
        music = pipe is not None and self.kind == "music"
        return PipelineInfo(
            kind=self.kind,
            folder=str(self.folder) if self.folder is not None else None,
            loaded=pipe is not None,
            running=running,
            device=self.device,
            dtype=self.dtype if pipe is not None else None,
            class_name=type(pipe).__name__ if pipe is not None else None,
            savers=self._savers if pipe is not None else None,
            weights_mb=self.weights_mb if pipe is not None else None,
            persisted_mb=round(self.persisted_mb, 2) if pipe is not None else None,
            loads=self.loads,
            last_used_at=self.last_used_at,
            load_error=self.load_error,
            sample_rate=sample_rate(pipe) if music else None,
            max_duration_s=max_audio_s(pipe) if music else None,
        )

    @property
    def resident_mb(self) -> float | None:
        """What the loaded pipeline holds on its device: weights plus what runs left."""
        return None if self.weights_mb is None else self.weights_mb + self.persisted_mb

    def longest_clip_s(self) -> float | None:
        """The loaded music pipeline's longest clip; None when unknown or unlimited."""
        pipe = self._pipe
        return max_audio_s(pipe) if pipe is not None and self.kind == "music" else None

    # -- load / unload -----------------------------------------------------------------

    def load(self) -> float:
        """Load the pipeline onto the device; return the milliseconds it took (0 if loaded)."""
        with self._lock:
            return self._load_locked()

    def unload(self) -> None:
        """Drop the pipeline and hand its memory back (waits for a run in progress)."""
        with self._lock:
            self._unload_locked()

    def _load_locked(self) -> float:
        if self._pipe is not None:
            return 0.0
        folder = self.folder
        if folder is None:
            self._fail("no pipeline folder is configured")
        if not (folder / "model_index.json").is_file():
            self._fail(f"no diffusers pipeline at {folder} (model_index.json missing)")
        t_import, fresh = time.perf_counter(), "diffusers" not in sys.modules
        import torch
        from diffusers import DiffusionPipeline

        self.import_ms = (time.perf_counter() - t_import) * 1000 if fresh else 0.0
        start = time.perf_counter()
        dtype = getattr(torch, load_dtype(self.device))
        oom = None
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, **{_dtype_kwarg(): dtype})
            pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
        except Exception as exc:
            if not is_cuda_oom(exc):
                self._fail(f"{type(exc).__name__}: {exc}")
            oom = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            pipe = None
        if oom is not None:
            # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
            flush_gpu_memory()
            raise PipelineOOM(
                f"out of memory loading the {self.kind} pipeline: {oom}",
                kind=self.kind,
                device=self.device,
            )
        self._pipe = pipe
        self._savers = False
        self.load_error = None
        self.last_used_at = time.time()
        self.loads += 1
        self.runs_since_load = 0
        self.weights_mb = _weights_mb(pipe)
        self.persisted_mb = 0.0
        self.dtype = str(dtype).removeprefix("torch.")
        return (time.perf_counter() - start) * 1000

    def _fail(self, reason: str) -> NoReturn:
        self.load_error = reason
        raise ModelUnavailable(f"{self.kind} pipeline unavailable: {reason}", kind=self.kind)

    def _unload_locked(self) -> None:
        pipe, self._pipe = self._pipe, None
        self._savers = False
        if pipe is not None and hasattr(pipe, "remove_all_hooks"):
            pipe.remove_all_hooks()
        del pipe
        flush_gpu_memory()

    def _apply_savers(self, savers: bool) -> None:
        """Switch between full speed (everything on the device) and the memory savers."""
        if savers == self._savers:
            return
        pipe, on_cuda = self._pipe, self.device.startswith("cuda")
        vae = getattr(pipe, "vae", None)
        if savers:
            if on_cuda:
                pipe.enable_model_cpu_offload(device=self.device)
            for name in ("slicing", "tiling"):
                _try_call(pipe, f"enable_vae_{name}") or _try_call(vae, f"enable_{name}")
        else:
            if on_cuda:
                pipe.remove_all_hooks()
                pipe.to(self.device)
            for name in ("slicing", "tiling"):
                _try_call(pipe, f"disable_vae_{name}") or _try_call(vae, f"disable_{name}")
        self._savers = savers

    # -- run -----------------------------------------------------------------------------

    def run(
        self,
        params: GenerationParams,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        savers: bool = False,
        write: bool = True,
    ) -> RunResult:
        """Generate, write the files under ``outputs_dir``, and say what was written."""
        with self._lock:
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"{self.kind} generation cancelled before it started")
            self.import_ms = 0.0
            load_ms = self._load_locked()
            first_run = self.runs_since_load == 0
            pipe = self._pipe
            seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
            kwargs = self._call_kwargs(pipe, params, seed, on_step, should_cancel)
            start = time.perf_counter()
            oom = None
            try:
                # Inside the try: moving weights back onto the card can run out of memory too.
                self._apply_savers(savers)
                with measure(self.device) as meter:
                    out = pipe(**kwargs)
            except Exception as exc:
                if not is_cuda_oom(exc):
                    raise
                oom = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            finally:
                self.last_used_at = time.time()
            if oom is not None:
                # Outside the except block: the traceback's frames hold the activations that
                # filled the card, and they must be gone before the caller retries. Where the
                # weights sit is unknown now, so the next run re-applies its placement in full.
                self._savers = None
                flush_gpu_memory()
                raise PipelineOOM(
                    f"out of memory running the {self.kind} pipeline: {oom}",
                    kind=self.kind,
                    device=self.device,
                    savers=savers,
                )
            run_ms = (time.perf_counter() - start) * 1000
            outputs = write_outputs(self.kind, self.outputs_dir, pipe, out, params) if write else []
            peak = meter.reading
            if peak is not None and peak.sane:
                self.persisted_mb += peak.persisted_mb
            self.runs_since_load += 1
            return RunResult(
                outputs,
                seed,
                load_ms,
                run_ms,
                used_savers=savers,
                peak=peak,
                import_ms=self.import_ms,
                first_run=first_run,
            )

    def _call_kwargs(
        self,
        pipe: Any,
        params: GenerationParams,
        seed: int,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> dict:
        import torch

        accepted = inspect.signature(pipe.__call__).parameters
        # Why a CPU generator: the same seed gives the same noise on any device, with or
        # without CPU offload, and diffusers moves the noise to the execution device itself.
        kwargs: dict[str, Any] = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "generator": torch.Generator(device="cpu").manual_seed(seed),
        }
        if self.kind in ("image", "video"):
            kwargs.update(width=params.width, height=params.height, output_type="pil")
        if self.kind == "image":
            kwargs["num_images_per_prompt"] = params.num_images
        elif self.kind == "video":
            kwargs["num_frames"] = params.num_frames
        elif self.kind == "music":
            kwargs["num_waveforms_per_prompt"] = 1
            if "audio_end_in_s" in accepted:  # StableAudio
                kwargs.update(audio_start_in_s=0.0, audio_end_in_s=params.duration_s)
            else:  # AudioLDM, MusicLDM
                kwargs["audio_length_in_s"] = params.duration_s
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k in accepted}

        total = params.steps
        calls = 0

        def step_done() -> None:
            nonlocal calls
            calls += 1
            if on_step is not None:
                on_step(min(calls, total), total)
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"{self.kind} generation cancelled after step {calls}")

        if "callback_on_step_end" in accepted:

            def on_step_end(_pipe: Any, _i: int, _t: Any, tensors: dict) -> dict:
                step_done()
                return tensors

            kwargs["callback_on_step_end"] = on_step_end
        elif "callback" in accepted:  # StableAudio, AudioLDM, MusicLDM: the older hook
            kwargs["callback"] = lambda _i, _t, _latents: step_done()
            if "callback_steps" in accepted:
                kwargs["callback_steps"] = 1
        return kwargs


def load_dtype(device: str) -> str:
    """The dtype a pipeline is loaded in on ``device``: float16 on CUDA, float32 on the CPU."""
    return "float16" if device.startswith("cuda") else "float32"


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


def _dtype_kwarg() -> str:
    """diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` (the old name warns)."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"


def _try_call(obj: Any, method: str) -> bool:
    """Call ``obj.method()`` when it exists; True when it ran."""
    fn = getattr(obj, method, None)
    if fn is None:
        return False
    try:
        fn()
    except (NotImplementedError, ValueError, AttributeError):
        return False
    return True
