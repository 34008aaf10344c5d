"""What the ModelManager keeps about tiers and loaded models, and the fallback chains."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from services.llm.worker import LlamaWorker
from services.memory.ledger import Reservation
from services.settings import TierSettings

# A field declared with ``repr=False`` is internal (a process handle, an event, a ledger
# entry): it is never part of an answer. Every other field is, and a test walks the
# response models against these dataclasses so that none is dropped on the way.

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
    # Why it failed (services/llm/failures.py): memory | model | backend | timeout | crash;
    # None when it loaded. Only "memory" walks the ladder on.
    failure: str | None = None
    at: float = field(default_factory=time.time)

    @property
    def walks(self) -> bool:
        return self.failure == "memory"


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
    # A model split across GPUs: the other cards' entries, and every card it is on.
    split_reservations: tuple[Reservation, ...] = field(default=(), repr=False)
    devices: tuple[str, ...] = ()
    backend: str = "llama-cpp-python"
    parallel: int = 1  # requests the worker serves at once (llama-server slots)
    slot_ctx: int = 0  # the context one request may fill (n_ctx / slots on llama-server)
    # Where the ledger's figure came from (services/llm/settle.py): nvml_process,
    # device_delta, rss, or estimate.
    settled_from: str = "estimate"
    projector_mb: float = 0.0  # the vision projector's need, included in the reservation
    active: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    # On a GPU host, the RAM the load booked beside its VRAM (all of it on a CPU rung).
    ram_reservation: Reservation | None = field(default=None, repr=False)
    # A projector llama-cpp-python loads at the first image: booked on its estimate until
    # then, and measured again after it (ModelManager.settle_projector).
    projector_pending_mb: float = field(default=0.0, repr=False)
    # Being unloaded: gets no new requests; the unload waits for those in flight.
    draining: bool = field(default=False, repr=False)

    @property
    def base_url(self) -> str:
        return self.worker.base_url

    @property
    def reservations(self) -> tuple[Reservation, ...]:
        """The device entries: its card (or cards, when split); on a CPU host its RAM."""
        return (self.reservation, *self.split_reservations)

    @property
    def all_reservations(self) -> tuple[Reservation, ...]:
        """Every ledger entry of this worker: the device ones and its RAM on a GPU host."""
        ram = (self.ram_reservation,) if self.ram_reservation is not None else ()
        return (*self.reservations, *ram)

    def on(self, device: str) -> bool:
        """True when this model is placed on ``device`` (one of its cards, when split)."""
        return device in (self.devices or (self.device,))


@dataclass
class TierState:
    """What the manager keeps about one tier (internal; see :class:`TierView`)."""

    name: str
    cfg: TierSettings
    heavy: bool
    status: str = "unloaded"  # unloaded | loading | loaded | draining | unloading | failed
    last_error: str | None = None
    attempts: list[LoadAttempt] = field(default_factory=list)
    model: LoadedModel | None = None
    alias_of: str | None = None  # served by another tier's worker (same file, ctx, layers)
    loads: int = 0  # successful loads since start
    unloads: int = 0  # worker processes ended by an unload since start (deaths not counted)

    def view(self) -> TierView:
        return TierView(
            tier=self.name,
            heavy=self.heavy,
            status=self.status,
            path=str(self.cfg.path),
            n_gpu_layers=self.cfg.n_gpu_layers,
            n_ctx=self.cfg.n_ctx,
            preload=self.cfg.preload,
            alias_of=self.alias_of,
            last_error=self.last_error,
            loads=self.loads,
            unloads=self.unloads,
            attempts=list(self.attempts),
            loaded=self.model,
            fallbacks=list(FALLBACKS[self.name]),
        )


@dataclass(frozen=True)
class TierView:
    """One tier as an operator sees it: configuration, state, load history."""

    tier: str
    heavy: bool
    status: str
    path: str
    n_gpu_layers: int  # configured
    n_ctx: int  # configured
    preload: bool
    alias_of: str | None
    last_error: str | None
    loads: int
    unloads: int
    attempts: list[LoadAttempt]  # the rungs the last load tried
    loaded: LoadedModel | None
    fallbacks: list[str]


@dataclass(frozen=True)
class EagerLoad:
    """What the start-up loader did with one tier."""

    tier: str
    outcome: str  # loaded | on demand | skipped: ... | failed: ...


@dataclass(frozen=True)
class UnloadResult:
    """What an unload did: the tiers it ended, memory measured back, what the ledger held."""

    unloaded: list[str] = field(default_factory=list)
    freed_mb: float = 0.0
    held_mb: float = 0.0
    settling: bool = False  # a release the driver was not seen to confirm (no NVML)


@dataclass
class Resolution:
    """Which tier answers a request for ``requested``, and why if it is another."""

    requested: str
    tier: str
    model: LoadedModel
    fallback_reason: str | None = None
    residency_wait_s: float | None = None  # waited for a heavy model's min residency


@dataclass
class Lease:
    """A request's hold on the model that answers it (``ModelManager.acquire``).

    ``release`` is synchronous and idempotent, so every path can call it, a cancelled
    one included: an async release in a cancelled task never runs."""

    resolution: Resolution
    model: LoadedModel = field(repr=False)
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        m = self.model
        m.active -= 1
        m.last_used_at = time.time()
        if m.active == 0:
            m.idle.set()
