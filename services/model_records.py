"""What the ModelManager keeps about tiers and loaded models, and the fallback chains."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from services.llama_worker import LlamaWorker
from services.memory_ledger import Reservation
from services.settings import TierSettings

# Which tiers answer when a tier cannot: the seed's reasoning -> deep -> medium -> fast,
# and for fast, anything bigger rather than nothing.
FALLBACKS: dict[str, tuple[str, ...]] = {
    "reasoning": ("deep", "medium", "fast"),
    "deep": ("medium", "fast"),
    "medium": ("fast",),
    "vision": ("medium", "fast"),
    "fast": ("medium", "deep", "reasoning"),
}


@dataclass
class LoadAttempt:
    rung: int
    n_gpu_layers: int
    n_ctx: int
    estimate_mb: float
    ok: bool
    reason: str
    ms: float
    at: float = field(default_factory=time.time)


@dataclass
class LoadedModel:
    """A model that is serving: what was really used, estimated and measured."""

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
    device: str
    ram_estimate_mb: float
    ready_ms: float
    worker: LlamaWorker = field(repr=False)
    reservation: Reservation = field(repr=False)
    active: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def base_url(self) -> str:
        return self.worker.base_url

    def to_dict(self) -> dict[str, Any]:
        keys = (
            "key path n_gpu_layers n_ctx vram_estimate_mb vram_measured_mb rss_mb pid port rung "
            "loaded_at last_used_at heavy device ram_estimate_mb ready_ms active"
        ).split()
        return {k: getattr(self, k) for k in keys}


@dataclass
class TierState:
    name: str
    cfg: TierSettings
    heavy: bool
    status: str = "unloaded"  # unloaded | loading | loaded | unloading | failed
    last_error: str | None = None
    attempts: list[LoadAttempt] = field(default_factory=list)
    model: LoadedModel | None = None
    alias_of: str | None = None  # served by another tier's worker (same file, ctx, layers)
    loads: int = 0  # successful loads since start, for tests and benchmarks

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": self.name,
            "heavy": self.heavy,
            "status": self.status,
            "path": str(self.cfg.path),
            "n_gpu_layers": self.cfg.n_gpu_layers,
            "n_ctx": self.cfg.n_ctx,
            "preload": self.cfg.preload,
            "alias_of": self.alias_of,
            "last_error": self.last_error,
            "loads": self.loads,
            "attempts": [a.__dict__ for a in self.attempts],
            "loaded": self.model.to_dict() if self.model else None,
            "fallbacks": list(FALLBACKS[self.name]),
        }


@dataclass
class Resolution:
    """Which tier answers a request for ``requested``, and why if it is another."""

    requested: str
    tier: str
    model: LoadedModel
    fallback_reason: str | None = None
