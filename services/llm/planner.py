"""Planning a load: which device, which start rung, and what a load needs on top of its
GGUF estimate (a vision projector, llama-server's prompt cache).

Part of the LadderLoader (``loader.py``), which walks the ladder this plans; kept here so
each file holds one idea. Placement (``services/memory/placement.py``) decides the
arithmetic; this reads the model's header and asks it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from services.llm.records import LoadAttempt, TierState
from services.memory.devices import LoadOption, SplitPlan, choose_load_device, split_plan
from services.memory.gguf_estimate import (
    GGUFInfo,
    InvalidModelFile,
    estimate,
    projector_dim,
    projector_mb,
    read_gguf_info,
)
from services.memory.ledger import CPU
from services.memory.placement import Placement, load_rungs, start_rung
from services.memory.probe import MemorySnapshot
from services.settings import Settings


def projector_need_mb(path: Path) -> float:
    """What a vision projector (mmproj GGUF) needs where it loads, in MB: its weights and
    its image encoder's buffers (``gguf_estimate.projector_mb``). Blocking (reads the
    file): run it in a thread."""
    return float(projector_mb(Path(path)))


@dataclass(frozen=True)
class DeviceCandidate:
    """A device a load may go to; ``evicts`` is the heavy tier that must leave it first,
    giving back ``extra_mb``."""

    device: str
    extra_mb: float = 0.0
    evicts: str | None = None


@dataclass(frozen=True)
class LoadPlan:
    """Where a load goes, and why (logged as ``placed on ... because ...``)."""

    device: str  # where the ledger books it; the first card of a split
    because: str
    evicts: tuple[str, ...] = ()  # heavy tiers to unload first
    split: SplitPlan | None = None
    split_rung: int = 0
    fits: bool = True  # False: only a CPU rung is left on the device (unknown: True)
    info: GGUFInfo | None = field(default=None, repr=False)  # the header, when plan read it


class LoadPlanning:
    """The LadderLoader's planning. A mixin: the loader sets ``settings`` and
    ``placement``."""

    settings: Settings
    placement: Placement

    async def _info(self, tier: TierState) -> GGUFInfo:
        """The model's GGUF header, and its projector checked against it (a projector
        whose embeddings have another width fails every image chat, llama.cpp only says so
        at the first image): InvalidModelFile, recorded as an attempt, before any worker."""
        try:
            info = await anyio.to_thread.run_sync(read_gguf_info, Path(tier.cfg.path))
            clip = getattr(tier.cfg, "clip_path", None)
            dim = None if clip is None else await anyio.to_thread.run_sync(projector_dim, clip)
            if dim is not None and dim != info.n_embd:
                raise InvalidModelFile(
                    f"the projector {clip} makes {dim}-wide embeddings; the model "
                    f"{tier.cfg.path} takes {info.n_embd}-wide ones: not a pair",
                    path=str(clip),
                )
            return info
        except InvalidModelFile as exc:
            tier.attempts.append(LoadAttempt(-1, 0, 0, 0, False, exc.message, 0, "model"))
            raise

    async def _projector_mb(self, tier: TierState) -> float:
        """The tier's vision projector's need (0 without one); it lands where the layers
        do: in VRAM on a GPU rung, in RAM on a CPU rung."""
        clip = getattr(tier.cfg, "clip_path", None)
        if clip is None:
            return 0.0
        return await anyio.to_thread.run_sync(projector_need_mb, Path(clip))

    async def plan(
        self,
        tier: TierState,
        candidates: Sequence[DeviceCandidate],
        snap: MemorySnapshot,
        *,
        must_fit: bool = False,
    ) -> LoadPlan:
        """Where ``tier`` should load among ``candidates`` (see ``services/memory/devices``),
        decided on ``snap``: the device where its best rung fits now, or a split across
        GPUs when the tier allows it and no single one fits. One candidate: that one,
        without reading a thing unless ``must_fit`` asks whether a GPU rung fits there.
        """
        lone = len(candidates) == 1 and not must_fit
        if lone and not (tier.cfg.allow_split and candidates[0].device != CPU):
            c = candidates[0]
            return LoadPlan(c.device, "the only device", (c.evicts,) if c.evicts else ())
        info = await self._info(tier)
        projector = await self._projector_mb(tier)
        options, usable = [], {}
        for c in candidates:
            budget = self.placement.view_of(snap, device=c.device).budget
            usable[c.device] = budget.usable_mb + c.extra_mb
            rungs = self._rungs(tier, info, c.device)
            overhead = self.placement.worker_overhead_mb(c.device, self._backend(tier))
            start = start_rung(
                info,
                rungs,
                usable[c.device],
                c.device,
                overhead_mb=overhead + projector + self._cache_on(tier, c.device),
                what=tier.name,
                **self._slots(tier),
            )
            heavy = self.placement.heavy_tasks(c.device)
            # On a GPU a CPU rung (0 layers) always "fits" (it takes no VRAM): what counts
            # here is whether a rung with layers on the card does.
            fits = start.fits and (c.device == CPU or rungs[start.index][0] != 0)
            options.append(
                LoadOption(c.device, start.index, fits, usable[c.device], heavy, c.evicts)
            )
        choice = choose_load_device(options)
        gpus = [c for c in candidates if c.device != CPU]
        if not choice.option.fits and tier.cfg.allow_split and len(gpus) > 1:
            split = self._split(tier, info, gpus, usable, projector)
            if split is not None:
                return dataclasses.replace(split, info=info)
        evicts = (choice.option.evicts,) if choice.option.evicts else ()
        return LoadPlan(
            choice.option.device, choice.because, evicts, fits=choice.option.fits, info=info
        )

    def _slots(self, tier: TierState) -> dict[str, Any]:
        """The estimate's keywords for a llama-server tier: its slots (a KV cache per slot,
        a graph for one slot's cells) and flash attention, which its ``auto`` turns on
        (llama-cpp-python leaves it off: the defaults)."""
        models = self.settings.models
        if models.backend_of(tier.cfg) != "llama-server":
            return {}
        return {"slots": models.parallel_of(tier.cfg), "flash_attn": True}

    def _backend(self, tier: TierState) -> str:
        return self.settings.models.backend_of(tier.cfg)

    def _cache_ram_mb(self, tier: TierState) -> int | None:
        """llama-server's prompt-cache cap for this tier (None on llama-cpp-python)."""
        if self._backend(tier) != "llama-server":
            return None
        return self.settings.models.llama_server_cache_ram_mb

    def _cache_on(self, tier: TierState, device: str) -> float:
        """The prompt cache's share of the need on ``device``: it lives in RAM, so it
        counts in the need only on a CPU host (on a GPU host, in the RAM need)."""
        return float(self._cache_ram_mb(tier) or 0) if device == CPU else 0.0

    def _rungs(self, tier: TierState, info: GGUFInfo, device: str) -> list[tuple[int, int]]:
        cfg = tier.cfg
        return load_rungs(cfg.n_gpu_layers, cfg.n_ctx, self.settings.ladder, info, device)

    def _split(
        self,
        tier: TierState,
        info: GGUFInfo,
        gpus: Sequence[DeviceCandidate],
        usable: dict[str, float],
        projector: float = 0.0,
    ) -> LoadPlan | None:
        """The first GPU rung whose estimate the GPUs hold together, as a split plan."""
        backend = self._backend(tier)
        overhead = max(self.placement.worker_overhead_mb(c.device, backend) for c in gpus)
        for i, (n_layers, n_ctx) in enumerate(self._rungs(tier, info, gpus[0].device)):
            if n_layers == 0:
                break
            est = estimate(info, n_layers, n_ctx, **self._slots(tier))
            sp = split_plan(
                {c.device: usable[c.device] for c in gpus}, est.vram_mb + projector, overhead
            )
            if sp is not None:
                evicts = tuple(c.evicts for c in gpus if c.evicts and c.device in sp.devices)
                shares = ", ".join(
                    f"{d} {s:.0%}" for d, s in zip(sp.devices, sp.shares, strict=True)
                )
                why = f"no single GPU holds rung {i}: split across {shares}"
                return LoadPlan(sp.devices[0], why, evicts, split=sp, split_rung=i)
        return None
