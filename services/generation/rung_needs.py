"""A request's options on the placement ladder: each rung's need and speed, on one device.

A rung's need is its resident weights plus the request's working memory:

- **working memory** is learned per rung (``learning.py``'s model, keyed
  folder|dtype|device for full residency, as before the ladder, and ...|<rung> below it);
  before a rung is measured it is full residency's learned working memory, else the
  configured prior less the weights (``required_vram_mb`` was a whole-pipeline figure);
- **resident weights** come from the rung's rule over the folder's safetensors headers
  (``placement_ladder.py``), or from the measured weights for full residency; a plan the
  pipeline is loaded at now counts none (the ledger holds them already).

A need not yet measured at its rung says ``estimated`` (full residency's configured
figure, where it stands, says ``prior``); the registry's prediction for learning and for
the "can never fit" check says ``learned`` wherever the working memory is learned.
Speeds are seconds per step (``rung_speeds.py``), relative to full residency's; before
measured, the rung's prior times full's.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.generation.placement_ladder import (
    RUNGS,
    STEP_S_PRIOR,
    Context,
    RungLadder,
    RungOption,
    RungPlan,
    allowed_rungs,
)
from services.generation.placement_sizes import PipelineSizes
from services.generation.rung_speeds import RungSpeeds
from services.generation.sizing import RequestSize
from services.memory.learning import LearnedMemory, Prediction


def rung_key(base: str, rung: str) -> str:
    """The learned-model key of ``rung``: ``base`` (folder|dtype|device) for full
    residency, so state files from before the ladder keep their runs."""
    return base if rung == "full" else f"{base}|{rung}"


@dataclass(frozen=True)
class LadderRequest:
    """What the ladder of one request on one device is built from."""

    device: str
    base_key: str  # folder|dtype|device
    size: RequestSize
    steps: int
    sizes: PipelineSizes
    ctx: Context
    prior_mb: float  # the configured required_vram_mb / required_ram_mb
    placement: str  # generation.<kind>.placement
    fp8: str  # generation.<kind>.fp8
    pin: bool  # generation.<kind>.pin_memory
    loaded: RungPlan | None  # the plan the pipeline is loaded at on this device, if any
    unsupported: dict[str, str]  # rung -> why, for this folder


@dataclass(frozen=True)
class OptionNeed:
    """One option's prediction, as the registry keeps it for learning."""

    rung: str
    key: str
    prediction: Prediction
    size: RequestSize
    working_learned: bool  # its working memory is learned: its own fit's, or full's


def build_ladder(learned: LearnedMemory, speeds: RungSpeeds, r: LadderRequest) -> RungLadder:
    """Every option ``r`` has, fastest first (see the module docstring for the figures)."""
    names, skipped = allowed_rungs(
        r.placement, r.fp8, on_cpu=r.ctx.on_cpu, unsupported=r.unsupported
    )
    unit, value = r.size.unit, r.size.value
    weights = r.sizes.mb(r.sizes.elements, r.ctx.bytes_per)
    full = learned.predict(r.base_key, unit, value, prior_mb=r.prior_mb, resident_mb=0.0)
    working = full.working_mb if full.working_mb is not None else max(0.0, r.prior_mb - weights)
    full_step = speeds.step_s(r.base_key, value)
    options = []
    for name in names:
        rung = RUNGS[name]
        for plan in rung.plans(r.sizes):
            plan = RungPlan(plan.rung, plan.keep, pinned=r.pin)
            key = rung_key(r.base_key, name)
            held = r.loaded is not None and (r.loaded.rung, r.loaded.keep) == (name, plan.keep)
            est = rung.need(plan, r.sizes, r.ctx)
            device_mb, host_mb = (0.0, 0.0) if held else (est.device_mb, est.host_mb)
            if name == "full" and not held:
                device_mb = learned.resident_mb(key) or device_mb
            if name == "full":
                prior = max(r.prior_mb, device_mb)
                source = "prior" if prior == r.prior_mb else "estimated"
            else:
                prior, source = device_mb + working, "estimated"
            p = learned.predict(key, unit, value, prior_mb=prior, resident_mb=device_mb)
            if p.source == "learned":
                source = "learned"
            step = speeds.step_s(key, value)
            if step is not None and full_step is not None:
                speed, speed_source = step / full_step, "measured"
            else:
                speed, speed_source = rung.speed(plan), "prior"
                step = (full_step or STEP_S_PRIOR) * speed
            options.append(
                RungOption(
                    plan=plan,
                    need_mb=p.need_mb,
                    host_mb=round(host_mb, 1),
                    step_s=step,
                    speed=round(speed, 3),
                    source=source,
                    speed_source=speed_source,
                    detail=r.size.text,
                    predicted=OptionNeed(
                        name, key, p, r.size, full.working_mb is not None or source == "learned"
                    ),
                )
            )
    return RungLadder(r.device, tuple(options), r.steps, tuple(skipped))
