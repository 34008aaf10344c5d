"""Where a pipeline's weights live: a ladder of placements, fastest first.

1. ``full``: every component on the device.
2. ``vae_tiling``: the same, with the VAE decoding in tiles and slices (a smaller peak).
3. ``fp8``: the denoiser's weights stored in float8, each layer cast to the compute dtype
   as it runs (diffusers' layerwise casting).
4. ``offload_blocks``: diffusers' group offload at block level (CUDA streams prefetch the
   next block): the components that fit stay whole on the device, the denoiser first,
   the others stream block by block from host memory (pinned, when the ledger's RAM
   allows a pinned copy).
5. ``offload_model``: diffusers' model CPU offload, one whole component at a time.
6. ``sequential``: group offload at leaf level, one layer at a time.

Each rung is an object with a ``name``, ``plans`` (its variants, fastest first), ``need``
(resident weights on the device and in host RAM, from the folder's safetensors headers)
and ``apply(pipe, device, plan)``, which runs on a pipeline loaded on the CPU, before any
weight moves: a pipeline larger than the card loads. :func:`choose_rung` walks the
options a request has (each rung's need: resident weights plus working memory learned
per rung) and returns the fastest that fits, with its ``because``; the gate calls it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.errors import ModelUnavailable
from services.generation.placement_sizes import ComponentSize, PipelineSizes

log = logging.getLogger("edison.generation")

PINS = ("full", "offload_blocks", "offload_model", "sequential")  # generation.<kind>.placement
STEP_S_PRIOR = 1.0  # seconds per step at full residency before any run is measured
DEVICE_MISMATCH = "Expected all tensors to be on the same device"  # torch's fixed message


class RungUnsupported(ModelUnavailable):
    """The folder's model cannot run at this rung (the caller skips to the next)."""

    def __init__(self, rung: str, reason: str, *, kind: str) -> None:
        super().__init__(f"{kind} pipeline cannot use {rung}: {reason}", rung=rung, kind=kind)
        self.rung = rung
        self.reason = reason


@dataclass(frozen=True)
class RungPlan:
    """One placement to apply: the rung, and what it keeps whole on the device."""

    rung: str
    keep: tuple[str, ...] = ()  # offload_blocks: components kept whole on the device
    pinned: bool = True  # offloaded copies in pinned host memory (with CUDA streams)

    def describe(self) -> str:
        if self.rung != "offload_blocks":
            return self.rung
        kept = f"{', '.join(self.keep)} resident" if self.keep else "nothing resident"
        return f"offload_blocks ({kept}{'' if self.pinned else ', unpinned'})"


@dataclass(frozen=True)
class Context:
    """What a rung's need depends on besides the folder."""

    bytes_per: float  # bytes per element in the load dtype
    on_cpu: bool  # the work device is the CPU: offloading saves nothing there
    streams: bool  # CUDA streams: a prefetched block is in flight beside the running one

    @property
    def in_flight(self) -> int:
        return 2 if self.streams else 1


@dataclass(frozen=True)
class Resident:
    device_mb: float  # weights held on the work device while it runs (blocks in flight too)
    host_mb: float  # weights held in host RAM (offloaded copies)


class Rung:
    """A placement. Subclasses set the rule; the defaults are full residency's."""

    name = "full"
    speed_prior = 1.0  # seconds per step relative to full residency, before measured

    def plans(self, sizes: PipelineSizes) -> list[RungPlan]:
        return [RungPlan(self.name)]

    def speed(self, plan: RungPlan) -> float:
        return self.speed_prior

    def need(self, plan: RungPlan, sizes: PipelineSizes, ctx: Context) -> Resident:
        return Resident(sizes.mb(sizes.elements, ctx.bytes_per), 0.0)

    def unsupported(self, pipe: Any) -> str | None:
        """Why this pipeline cannot take the rung; None when it can."""
        return None

    def apply(self, pipe: Any, device: str, plan: RungPlan) -> None:
        pipe.to(device)


class VaeTiling(Rung):
    name, speed_prior = "vae_tiling", 1.02

    def apply(self, pipe: Any, device: str, plan: RungPlan) -> None:
        set_vae_savers(pipe, True)
        pipe.to(device)


class Fp8(Rung):
    name, speed_prior = "fp8", 1.1

    def need(self, plan: RungPlan, sizes: PipelineSizes, ctx: Context) -> Resident:
        den = sizes.denoiser
        mb = sizes.mb(sizes.elements, ctx.bytes_per)
        if den is not None and ctx.bytes_per > 1:
            mb -= sizes.mb(den.elements - den.fp8_kept, ctx.bytes_per - 1)
        return Resident(mb, 0.0)

    def unsupported(self, pipe: Any) -> str | None:
        import torch

        den = denoiser(pipe)
        if den is None or not hasattr(den, "enable_layerwise_casting"):
            return "no diffusers denoiser with layerwise casting"
        if not hasattr(torch, "float8_e4m3fn"):
            return "this torch has no float8_e4m3fn"
        return None

    def apply(self, pipe: Any, device: str, plan: RungPlan) -> None:
        import torch

        den = denoiser(pipe)
        den.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=den.dtype)
        pipe.to(device)


class OffloadBlocks(Rung):
    name, speed_prior = "offload_blocks", 1.5
    level = "block_level"

    def plans(self, sizes: PipelineSizes) -> list[RungPlan]:
        # Keep whole what helps most per MB: the denoiser (it runs every step), then the
        # smaller components; every prefix of that order but the whole, longest first.
        order = [c.name for c in sizes.components if c.group_offload]
        return [RungPlan(self.name, tuple(order[:n])) for n in range(len(order) - 1, -1, -1)]

    def speed(self, plan: RungPlan) -> float:
        keeps_denoiser = any(name in ("transformer", "unet") for name in plan.keep)
        return 1.05 if keeps_denoiser else self.speed_prior

    def peak(self, c: ComponentSize, ctx: Context) -> float:
        """Elements of ``c`` on the device while it runs."""
        return c.unmatched + ctx.in_flight * c.largest_block

    def need(self, plan: RungPlan, sizes: PipelineSizes, ctx: Context) -> Resident:
        if ctx.on_cpu:
            return Rung.need(self, plan, sizes, ctx)
        whole = [c for c in sizes.components if c.name in plan.keep or not c.group_offload]
        moved = [c for c in sizes.components if c not in whole]
        on_device = sum(c.elements for c in whole) + max(
            (self.peak(c, ctx) for c in moved), default=0
        )
        host = sum(c.elements for c in moved)
        return Resident(sizes.mb(on_device, ctx.bytes_per), sizes.mb(host, ctx.bytes_per))

    def unsupported(self, pipe: Any) -> str | None:
        den = denoiser(pipe)
        if den is not None and not getattr(den, "_supports_group_offloading", True):
            return f"{type(den).__name__} does not support group offload"
        return None

    def apply(self, pipe: Any, device: str, plan: RungPlan) -> None:
        import torch
        from diffusers.hooks import apply_group_offloading

        on_cuda = device.startswith("cuda")
        for name, comp in pipe.components.items():
            if not isinstance(comp, torch.nn.Module):
                continue
            if name in plan.keep or not getattr(comp, "_supports_group_offloading", True):
                comp.to(device)
                continue
            kwargs: dict[str, Any] = dict(
                onload_device=torch.device(device),
                offload_device=torch.device("cpu"),
                offload_type=self.level,
                use_stream=on_cuda,
                low_cpu_mem_usage=not plan.pinned,
            )
            if self.level == "block_level":
                kwargs["num_blocks_per_group"] = 1  # streams allow one (diffusers 0.42)
            if hasattr(comp, "enable_group_offload"):
                comp.enable_group_offload(**kwargs)
            else:  # a transformers text encoder: diffusers' hook on a plain module
                apply_group_offloading(comp, **kwargs)


class OffloadModel(Rung):
    name, speed_prior = "offload_model", 2.5

    def need(self, plan: RungPlan, sizes: PipelineSizes, ctx: Context) -> Resident:
        if ctx.on_cpu:
            return Rung.need(self, plan, sizes, ctx)
        largest = max((c.elements for c in sizes.components), default=0)
        return Resident(sizes.mb(largest, ctx.bytes_per), sizes.mb(sizes.elements, ctx.bytes_per))

    def unsupported(self, pipe: Any) -> str | None:
        if getattr(pipe, "model_cpu_offload_seq", None) is None:
            return f"{type(pipe).__name__} has no model_cpu_offload_seq"
        return None

    def apply(self, pipe: Any, device: str, plan: RungPlan) -> None:
        pipe.enable_model_cpu_offload(device=device)


class Sequential(OffloadBlocks):
    name, speed_prior = "sequential", 6.0
    level = "leaf_level"

    def plans(self, sizes: PipelineSizes) -> list[RungPlan]:
        return [RungPlan(self.name)]

    def speed(self, plan: RungPlan) -> float:
        return self.speed_prior

    def peak(self, c: ComponentSize, ctx: Context) -> float:
        return ctx.in_flight * c.largest_leaf


RUNGS: dict[str, Rung] = {
    r.name: r for r in (Rung(), VaeTiling(), Fp8(), OffloadBlocks(), OffloadModel(), Sequential())
}
ORDER = tuple(RUNGS)


def allowed_rungs(
    placement: str, fp8: str, *, on_cpu: bool, unsupported: dict[str, str]
) -> tuple[list[str], list[str]]:
    """The rungs a request may take, fastest first, and why the others are skipped.

    ``placement`` pins one rung (``auto``: the whole ladder). On the CPU, offloading to
    the CPU saves nothing: auto keeps full, VAE tiling and fp8."""
    if placement != "auto":
        names, skipped = [placement], [f"placement pinned to {placement}"]
    else:
        names = [n for n in ORDER if not (on_cpu and n in PINS[1:])]
        skipped = ["offload rungs: the device is the CPU"] if on_cpu else []
        if fp8 == "off":
            names.remove("fp8")
            skipped.append("fp8: off in config")
    for name in [n for n in names if n in unsupported]:
        names.remove(name)
        skipped.append(f"{name}: unsupported ({unsupported[name]})")
    return names, skipped


# ---- options and the walk ---------------------------------------------------------


@dataclass(frozen=True)
class RungOption:
    """One placement a request could run at, with its predicted need and speed."""

    plan: RungPlan
    need_mb: float  # on the work device: resident weights + working memory
    host_mb: float  # host RAM for the offloaded weights (0 on the CPU)
    step_s: float  # predicted seconds per step
    speed: float  # step_s relative to full residency
    source: str  # learned | estimated | prior (the configured figure)
    speed_source: str  # measured | prior
    detail: str = ""  # what the need is of: "1 x 512x512 image"
    predicted: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def rung(self) -> str:
        return self.plan.rung

    @property
    def label(self) -> str:
        return self.plan.describe()


@dataclass(frozen=True)
class RungChoice:
    option: RungOption | None  # None: no rung fits
    because: str


def choose_rung(
    options: Sequence[RungOption], usable_mb: float, host_usable_mb: float
) -> RungChoice:
    """The fastest option whose need fits ``usable_mb`` on the device and whose offloaded
    weights fit ``host_usable_mb`` of RAM. Pinned copies need twice the offloaded weights
    of RAM while they are made: short of that, the option runs unpinned."""
    if not options:
        return RungChoice(None, "no rung is allowed")
    fits = [o for o in options if o.need_mb <= usable_mb and o.host_mb <= host_usable_mb]
    if not fits:
        least = min(options, key=lambda o: o.need_mb)
        ram = f" and {least.host_mb:.0f} MB of RAM" if least.host_mb else ""
        host = f", {host_usable_mb:.0f} MB of RAM" if least.host_mb else ""
        return RungChoice(
            None,
            f"no rung fits: the smallest, {least.label}, needs {least.need_mb:.0f} MB{ram} "
            f"({least.source}); {usable_mb:.0f} MB usable{host}",
        )
    best = min(fits, key=lambda o: (o.step_s, options.index(o)))
    because = (
        f"{best.label} is the fastest rung that fits: {best.need_mb:.0f} MB of "
        f"{usable_mb:.0f} MB usable ({best.source}), {best.speed:.2f}x full's step time "
        f"({best.speed_source})"
    )
    faster = [o for o in options if o.step_s < best.step_s and o not in fits]
    if faster:
        because += "; " + ", ".join(f"{o.label} needs {o.need_mb:.0f} MB" for o in faster[:2])
    if best.plan.pinned and best.host_mb and 2 * best.host_mb > host_usable_mb:
        best = dataclasses.replace(best, plan=dataclasses.replace(best.plan, pinned=False))
        because += f"; unpinned: pinning needs {2 * best.host_mb:.0f} MB of RAM"
    return RungChoice(best, because)


def worth_unloading(
    now: RungOption | None, then: RungOption | None, steps: int, reload_s: float, what: str
) -> tuple[bool, str]:
    """Unload ``what`` (chat models) only when no rung fits without it, or when the faster
    rung it buys saves more time over this request's steps than reloading it costs."""
    if now is None:
        return True, f"no rung fits without unloading {what}"
    if then is None or then.step_s >= now.step_s:
        return False, f"kept {what}: unloading buys no faster rung than {now.label}"
    saved = steps * (now.step_s - then.step_s)
    if saved > reload_s:
        return True, (
            f"unloading {what} buys {then.label} over {now.label}: ~{saved:.1f} s saved "
            f"over {steps} steps, more than its {reload_s:.1f} s reload"
        )
    return False, (
        f"kept {what}: {then.label} would save ~{saved:.1f} s over {steps} steps, less "
        f"than its {reload_s:.1f} s reload; {now.label} instead"
    )


@dataclass(frozen=True)
class RungLadder:
    """A request's options on one device, fastest first, and what the gate needs to walk
    them: :meth:`choose` and :meth:`worth_unloading` (the gate imports nothing of this)."""

    device: str
    options: tuple[RungOption, ...]
    steps: int
    skipped: tuple[str, ...] = ()

    def choose(self, usable_mb: float, host_usable_mb: float) -> RungChoice:
        choice = choose_rung(self.options, usable_mb, host_usable_mb)
        if self.skipped:  # a rung left out is part of why this one was chosen
            because = f"{choice.because}; skipped: {'; '.join(self.skipped)}"
            choice = dataclasses.replace(choice, because=because)
        return choice

    @property
    def least(self) -> RungOption | None:
        """The option that needs the least of the device."""
        return min(self.options, key=lambda o: o.need_mb, default=None)

    def worth_unloading(
        self, now: RungOption | None, then: RungOption | None, reload_s: float, what: str
    ) -> tuple[bool, str]:
        return worth_unloading(now, then, self.steps, reload_s, what)

    def after(self, option: RungOption, *, skip_rung: bool = False) -> RungOption | None:
        """The next option down the ladder (less resident) after ``option``; with
        ``skip_rung``, the first of another rung (the model cannot take this one)."""
        places = [(o.rung, o.plan.keep) for o in self.options]
        here = (option.rung, option.plan.keep)
        i = places.index(here) if here in places else len(places)
        later = self.options[i + 1 :]
        return next((o for o in later if not skip_rung or o.rung != option.rung), None)


# ---- helpers the rungs and the host share ------------------------------------------


def denoiser(pipe: Any) -> Any:
    """The pipeline's transformer or UNet, when it has one."""
    return getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)


def set_vae_savers(pipe: Any, on: bool) -> None:
    """VAE tiling and slicing on or off (through the pipeline where it still offers it)."""
    vae = getattr(pipe, "vae", None)
    verb = "enable" if on else "disable"
    for name in ("slicing", "tiling"):
        _try_call(pipe, f"{verb}_vae_{name}") or _try_call(vae, f"{verb}_{name}")


def _try_call(obj: Any, method: str) -> bool:
    fn = getattr(obj, method, None)
    if fn is None:
        return False
    try:
        fn()
    except (NotImplementedError, ValueError, AttributeError):
        return False
    return True


def is_device_mismatch(exc: BaseException | None) -> bool:
    """True when a run failed because a layer met a tensor on another device: a model
    whose forward does not follow an offload hook (e.g. one that casts by weight device)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, RuntimeError) and DEVICE_MISMATCH in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
