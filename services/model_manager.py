"""ModelManager: the one owner of every loaded LLM and every load.

Each model runs in its own ``llama_cpp.server`` worker process (services/llama_worker.py);
unloading ends the process, after which the driver really has the memory back. Tiers:
``fast`` stays resident; ``medium``, ``deep``, ``reasoning`` and ``vision`` share the
heavy slot (one at a time). A load walks the ladder of GPU layers x context sizes,
starting at the first rung whose GGUF-header estimate fits the device, and every load
reserves its estimate in the memory ledger before it starts.

The gate, the chat endpoints, the swarm and /system/memory all go through this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from services.errors import InsufficientMemory, ModelLoadFailed, ModelUnavailable, UnknownTier
from services.gguf_estimate import (
    Estimate,
    GGUFInfo,
    InvalidModelFile,
    estimate,
    ladder,
    read_gguf_info,
)
from services.llama_worker import (
    LlamaWorker,
    WorkerSpec,
    WorkerStartFailed,
    wait_gpu_memory_released,
)
from services.memory_ledger import CPU, MemoryLedger, device_name
from services.memory_probe import MemoryProbe, rss_mb
from services.model_records import FALLBACKS, LoadAttempt, LoadedModel, Resolution, TierState
from services.settings import HEAVY_TIERS, TIER_NAMES, Settings

log = logging.getLogger("edison.models")

# Per-worker overheads the GGUF estimate does not see. RAM: a llama_cpp.server process
# with a tiny model measured 80 MB RSS here. VRAM: each worker process holds its own
# CUDA context (Ollama reserves 457 MiB per device); see docs/gpu-validation.md.
WORKER_RAM_MB = 80.0
CUDA_CONTEXT_MB = 400.0
DRAIN_TIMEOUT_S = 30.0  # longest an eviction waits for requests in flight on the model


class ModelManager:
    """One per app. Async API; blocking work (probes, GGUF reads) goes to threads."""

    def __init__(
        self,
        settings: Settings,
        probe: MemoryProbe,
        ledger: MemoryLedger,
        *,
        python: str = sys.executable,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.ledger = ledger
        self.python = python
        self.worker_env = worker_env
        self.tiers: dict[str, TierState] = {
            name: TierState(name, cfg, name in HEAVY_TIERS)
            for name, cfg in settings.models.tiers().items()
        }
        # Why: loads and unloads change which workers exist and what the ledger holds;
        # one at a time (as Ollama does) keeps the heavy-slot rule and the memory check
        # true. It is an asyncio lock: requests to loaded models and /system/memory
        # never wait on it.
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # ---- views ---------------------------------------------------------------------
    @property
    def heavy_slot(self) -> str | None:
        for t in self.tiers.values():
            if t.heavy and t.model is not None and t.alias_of is None:
                return t.name
        return None

    def loaded_info(self) -> list[dict[str, Any]]:
        return [t.model.to_dict() for t in self.tiers.values() if t.model and not t.alias_of]

    def describe(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.tiers.values()]

    def loads_total(self) -> int:
        return sum(t.loads for t in self.tiers.values())

    def _tier(self, key: str) -> TierState:
        if key not in self.tiers:
            raise UnknownTier(
                f"Unknown tier {key!r}; configured tiers: {', '.join(self.tiers) or 'none'}",
                tier=key,
                tiers=list(self.tiers),
            )
        return self.tiers[key]

    # ---- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_idle(), name="edison-idle-reaper")

    async def shutdown(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for task in list(self._background):
            task.cancel()
        await self.unload_all(reason="shutdown")

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run coro in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def load_llm_models(self) -> dict[str, str]:
        """The eager loader: fast -> medium -> deep -> reasoning -> vision, as far as
        ``preload``, memory and the heavy slot allow. Returns what happened per tier."""
        outcome: dict[str, str] = {}
        for name in TIER_NAMES:
            tier = self.tiers.get(name)
            if tier is None:
                continue
            if not tier.cfg.preload:
                outcome[name] = "on demand"
                continue
            if tier.heavy and self.heavy_slot not in (None, name):
                outcome[name] = f"skipped: heavy slot holds {self.heavy_slot}"
                continue
            try:
                await self.load(name, reason="startup")
                outcome[name] = "loaded"
            except Exception as exc:  # noqa: BLE001 - one tier failing must not stop the others
                outcome[name] = f"failed: {exc}"
        log.info("Eager load: %s", ", ".join(f"{k}={v}" for k, v in outcome.items()))
        return outcome

    # ---- loading -------------------------------------------------------------------
    async def load(self, key: str, *, reason: str = "request") -> LoadedModel:
        """Load a tier (evicting the heavy slot's occupant if needed) and return its model."""
        tier = self._tier(key)
        model = tier.model
        if model is not None and tier.status == "loaded" and model.worker.alive:
            return model  # the common case never waits behind another tier's load
        async with self._lock:
            return await self._load_locked(tier, reason)

    async def _load_locked(self, tier: TierState, reason: str) -> LoadedModel:
        if tier.model is not None and tier.model.worker.alive:
            return tier.model
        twin = self._twin(tier)
        if twin is not None:
            tier.model, tier.alias_of, tier.status = twin.model, twin.name, "loaded"
            log.info(
                "Model %s served by the %s worker (same file, context, layers)",
                tier.name,
                twin.name,
            )
            return twin.model  # type: ignore[return-value]
        if tier.heavy and (occupant := self.heavy_slot) not in (None, tier.name):
            await self._unload_locked(self.tiers[occupant], f"heavy slot wanted by {tier.name}")
        tier.status, tier.last_error, tier.attempts = "loading", None, []
        try:
            model = await self._walk_ladder(tier)
        except Exception as exc:
            tier.status = "failed"
            tier.last_error = getattr(exc, "message", None) or str(exc)
            raise
        tier.model, tier.status = model, "loaded"
        tier.loads += 1
        log.info(
            "Model loaded: tier=%s reason=%s rung=%d layers=%d ctx=%d device=%s "
            "estimate=%.0fMB measured=%s rss=%s ready=%.0fms",
            tier.name,
            reason,
            model.rung,
            model.n_gpu_layers,
            model.n_ctx,
            model.device,
            model.vram_estimate_mb if model.device != CPU else model.ram_estimate_mb,
            "n/a" if model.vram_measured_mb is None else f"{model.vram_measured_mb:.0f}MB",
            "n/a" if model.rss_mb is None else f"{model.rss_mb:.0f}MB",
            model.ready_ms,
        )
        return model

    def _twin(self, tier: TierState) -> TierState | None:
        for other in self.tiers.values():
            if (
                other is not tier
                and other.model is not None
                and other.alias_of is None
                and other.model.worker.alive
                and Path(other.cfg.path).resolve() == Path(tier.cfg.path).resolve()
                and (other.cfg.n_ctx, other.cfg.n_gpu_layers)
                == (tier.cfg.n_ctx, tier.cfg.n_gpu_layers)
            ):
                return other
        return None

    def _rungs(self, tier: TierState, info: GGUFInfo, device: str) -> list[tuple[int, int]]:
        lad = self.settings.ladder
        rungs = ladder(
            tier.cfg.n_gpu_layers,
            tier.cfg.n_ctx,
            lad.gpu_layers,
            lad.context,
            info.n_layer,
            info.n_ctx_train,
        )
        if device == CPU:
            # Without a GPU only the context matters: every layer count is the same load.
            seen: dict[int, None] = {}
            for _, ctx in rungs:
                seen.setdefault(ctx)
            rungs = [(0, c) for c in seen]
        return rungs

    async def _walk_ladder(self, tier: TierState) -> LoadedModel:
        path = Path(tier.cfg.path)
        try:
            info = await anyio.to_thread.run_sync(read_gguf_info, path)
        except InvalidModelFile as exc:
            tier.attempts.append(LoadAttempt(-1, 0, 0, 0, False, exc.message, 0))
            raise
        snap = await anyio.to_thread.run_sync(self.probe.snapshot)
        device = device_name(snap, self.settings.memory.device)
        rungs = self._rungs(tier, info, device)
        usable = self.ledger.budget(snap, device).usable_mb

        def need(est: Estimate) -> float:
            if device == CPU:
                return est.ram_mb + est.vram_mb + WORKER_RAM_MB
            return est.vram_mb + (CUDA_CONTEXT_MB if est.n_gpu_layers else 0.0)

        fits = [i for i, (n, c) in enumerate(rungs) if need(estimate(info, n, c)) <= usable]
        if fits:
            start = fits[0]
        elif device != CPU:
            # No rung fits the card beside what it holds: the CPU rungs need no VRAM.
            start = next((i for i, (n, _) in enumerate(rungs) if n == 0), len(rungs) - 1)
        else:
            smallest = need(estimate(info, *rungs[-1]))
            raise InsufficientMemory(
                f"Not enough RAM to load {tier.name}: needs {smallest:.0f} MB, "
                f"{usable:.0f} MB usable",
                device=CPU,
                required_mb=round(smallest),
                free_mb=round(usable),
                tier=tier.name,
            )
        if start:
            log.info(
                "Load of %s starts at rung %d (layers=%d, ctx=%d): %.0f MB usable on %s",
                tier.name,
                start,
                *rungs[start],
                usable,
                device,
            )
        for i in range(start, len(rungs)):
            n_layers, n_ctx = rungs[i]
            est = estimate(info, n_layers, n_ctx)
            model = await self._try_rung(tier, i, n_layers, n_ctx, est, need(est), device)
            if model is not None:
                return model
            if tier.attempts[-1].reason.startswith("missing file"):
                break
        tried = "; ".join(
            f"rung {a.rung} (layers={a.n_gpu_layers}, ctx={a.n_ctx}): {a.reason}"
            for a in tier.attempts
        )
        raise ModelLoadFailed(
            f"Could not load {tier.name}: every rung failed. {tried}",
            tier=tier.name,
            attempts=[a.__dict__ for a in tier.attempts],
        )

    async def _try_rung(
        self,
        tier: TierState,
        rung: int,
        n_layers: int,
        n_ctx: int,
        est: Estimate,
        need_mb: float,
        device: str,
    ) -> LoadedModel | None:
        cfg = tier.cfg
        spec = WorkerSpec(
            key=tier.name,
            model_path=Path(cfg.path),
            n_gpu_layers=n_layers if device != CPU else 0,
            n_ctx=n_ctx,
            n_threads=self.settings.models.n_threads,
            chat_format=cfg.chat_format,
            clip_path=getattr(cfg, "clip_path", None),
        )
        res = self.ledger.reserve(device, need_mb, f"model:{tier.name}", "model")
        worker = LlamaWorker(
            spec, python=self.python, on_exit=self._on_worker_exit, env=self.worker_env
        )
        t0 = time.perf_counter()
        try:
            await worker.start(self.settings.models.load_timeout_s)
        except WorkerStartFailed as exc:
            self.ledger.release(res)
            why = ("missing file: " if exc.missing_file else "") + exc.reason
            if exc.timed_out:
                why = f"not ready within {self.settings.models.load_timeout_s:g} s"
            tier.attempts.append(
                LoadAttempt(
                    rung, n_layers, n_ctx, need_mb, False, why, (time.perf_counter() - t0) * 1000
                )
            )
            log.warning(
                "Load attempt failed: tier=%s rung=%d layers=%d ctx=%d: %s",
                tier.name,
                rung,
                n_layers,
                n_ctx,
                why,
            )
            return None
        except BaseException:
            self.ledger.release(res)
            await worker.stop(self.settings.models.unload_timeout_s)
            raise
        ms = (time.perf_counter() - t0) * 1000
        assert worker.pid is not None
        measured = await anyio.to_thread.run_sync(self.probe.process_vram_mb, [worker.pid])
        vram = measured.get(worker.pid) if measured is not None else None
        rss = rss_mb(worker.pid)
        settle = rss if device == CPU else vram
        if settle is not None:
            self.ledger.settle(res, settle)
        tier.attempts.append(LoadAttempt(rung, n_layers, n_ctx, need_mb, True, "ready", ms))
        now = time.time()
        model = LoadedModel(
            key=tier.name,
            path=str(cfg.path),
            n_gpu_layers=spec.n_gpu_layers,
            n_ctx=n_ctx,
            vram_estimate_mb=round(need_mb if device != CPU else 0.0, 1),
            vram_measured_mb=vram,
            rss_mb=rss,
            pid=worker.pid,
            port=worker.port,
            rung=rung,
            loaded_at=now,
            last_used_at=now,
            heavy=tier.heavy,
            device=device,
            ram_estimate_mb=round(need_mb if device == CPU else est.ram_mb, 1),
            ready_ms=round(worker.ready_ms, 1),
            worker=worker,
            reservation=res,
        )
        model.idle.set()
        return model

    def _on_worker_exit(self, worker: LlamaWorker, code: int) -> None:
        """A worker died on its own (crash, OOM kill, kill -9): mark its tiers unloaded."""
        for tier in self.tiers.values():
            if tier.model is not None and tier.model.worker is worker:
                if tier.alias_of is None:
                    self.ledger.release(tier.model.reservation)
                tier.model, tier.alias_of, tier.status = None, None, "unloaded"
                tier.last_error = f"worker exited with code {code}: {worker.stderr_tail(3)[-300:]}"
                log.warning(
                    "Model %s worker (pid %s) died with code %d", tier.name, worker.pid, code
                )

    # ---- using ---------------------------------------------------------------------
    async def resolve(self, key: str, *, fallback: bool = True) -> Resolution:
        """Load ``key`` (or the first tier of its fallback chain that loads) and return it."""
        if key not in TIER_NAMES:
            self._tier(key)  # raises UnknownTier listing the configured tiers
        chain = [key, *FALLBACKS[key]] if fallback else [key]
        reasons: list[str] = []
        for name in chain:
            if name not in self.tiers:
                reasons.append(f"{name}: not configured")
                continue
            try:
                model = await self.load(name)
            except (ModelLoadFailed, InsufficientMemory) as exc:
                reasons.append(f"{name}: {exc.message}")
                continue
            why = "; ".join(reasons) if name != key else None
            return Resolution(key, name, model, why)
        if key not in self.tiers and not fallback:
            self._tier(key)
        raise ModelUnavailable(
            f"No tier could serve {key!r}: " + "; ".join(reasons), tier=key, tried=chain
        )

    @contextlib.asynccontextmanager
    async def use(self, key: str, *, fallback: bool = True) -> AsyncIterator[Resolution]:
        """Resolve a tier and hold it in use: it is not evicted while the block runs
        (evictions wait up to DRAIN_TIMEOUT_S for blocks in flight)."""
        for _ in range(3):  # a worker may die between the load and this line: load again
            res = await self.resolve(key, fallback=fallback)
            model = res.model
            if model.worker.alive and self.tiers[res.tier].model is model:
                break
        else:
            raise ModelUnavailable(f"The {res.tier} worker kept dying right after loading")
        model.active += 1
        model.idle.clear()
        try:
            yield res
        finally:
            model.active -= 1
            model.last_used_at = time.time()
            if model.active == 0:
                model.idle.set()

    # ---- unloading -----------------------------------------------------------------
    async def unload(self, key: str, *, reason: str = "request") -> dict[str, Any]:
        tier = self._tier(key)
        async with self._lock:
            return await self._unload_locked(tier, reason)

    async def unload_heavy_slot(self, *, reason: str = "request") -> dict[str, Any]:
        async with self._lock:
            slot = self.heavy_slot
            if slot is None:
                return {"unloaded": [], "freed_mb": 0.0, "held_mb": 0.0}
            return await self._unload_locked(self.tiers[slot], reason)

    async def unload_all(self, *, reason: str = "request") -> dict[str, Any]:
        """End every worker, then flush (gc, torch.cuda.empty_cache where CUDA)."""
        async with self._lock:
            before = await self._free_mb()
            unloaded, held = [], 0.0
            for tier in self.tiers.values():
                if tier.model is not None and tier.alias_of is None:
                    out = await self._unload_locked(tier, reason, measure=False)
                    unloaded += out["unloaded"]
                    held += out["held_mb"]
            await anyio.to_thread.run_sync(flush_gpu_memory)
            freed = max(0.0, await self._free_mb() - before) if unloaded else 0.0
            return {"unloaded": unloaded, "freed_mb": round(freed, 1), "held_mb": round(held, 1)}

    async def _unload_locked(
        self, tier: TierState, reason: str, *, measure: bool = True
    ) -> dict[str, Any]:
        model = tier.model
        if model is None:
            return {"unloaded": [], "freed_mb": 0.0, "held_mb": 0.0}
        if tier.alias_of is not None:
            tier.model, tier.alias_of, tier.status = None, None, "unloaded"
            return {"unloaded": [tier.name], "freed_mb": 0.0, "held_mb": 0.0}
        before = await self._free_mb() if measure else 0.0
        if model.active:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    await model.idle.wait()
        sharing = [t for t in self.tiers.values() if t.model is model]
        for t in sharing:
            t.status = "unloading"
        try:
            await model.worker.stop(self.settings.models.unload_timeout_s)
        finally:
            for t in sharing:
                t.model, t.alias_of, t.status = None, None, "unloaded"
        names = [t.name for t in sharing]
        if model.device != CPU:
            await wait_gpu_memory_released(
                self.probe,
                model.pid,
                self.settings.memory.recovery_wait_s,
                self.settings.memory.recovery_poll_s,
            )
        held = model.reservation.mb
        self.ledger.release(model.reservation)
        freed = max(0.0, await self._free_mb() - before) if measure else 0.0
        log.info(
            "Model unloaded: tier=%s reason=%s held=%.0fMB freed=%.0fMB",
            tier.name,
            reason,
            held,
            freed,
        )
        return {"unloaded": names, "freed_mb": round(freed, 1), "held_mb": round(held, 1)}

    async def _free_mb(self) -> float:
        """Driver-reported free memory on the work device (RAM available on the CPU)."""
        snap = await anyio.to_thread.run_sync(self.probe.snapshot)
        device = device_name(snap, self.settings.memory.device)
        return self.ledger.budget(snap, device).driver_free_mb

    def ensure_loaded_soon(self, key: str) -> None:
        """Bring a tier back in the background (used after heavy tasks)."""
        tier = self.tiers.get(key)
        if tier is None or tier.model is not None or tier.status == "loading":
            return

        async def reload() -> None:
            try:
                await self.load(key, reason="reload after heavy task")
            except Exception as exc:  # noqa: BLE001 - logged; the next request retries
                log.warning("Background reload of %s failed: %s", key, exc)

        self.spawn(reload(), f"edison-reload-{key}")

    async def _reap_idle(self) -> None:
        """Unload heavy models idle longer than their keep_alive (never fast by default)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for tier in self.tiers.values():
                m = tier.model
                keep = tier.cfg.keep_alive_s
                if keep is None:
                    keep = self.settings.models.heavy_keep_alive_s if tier.heavy else 0
                if m is None or tier.alias_of or m.active or keep <= 0:
                    continue
                if now - m.last_used_at >= keep:
                    with contextlib.suppress(Exception):
                        await self.unload(tier.name, reason=f"idle {keep:g} s")


def flush_gpu_memory(collect: bool = True) -> None:
    """The seed's _flush_gpu_memory: gc, then torch's cache where CUDA is in use.

    torch.cuda.empty_cache() frees only torch's own cache (pipelines); llama.cpp memory
    is given back by ending its worker process. ``collect=False`` skips the full gc: with
    torch and diffusers imported it costs about 0.24 s of held GIL (docs/benchmarks.md),
    worth paying only when objects were just dropped.
    """
    if collect:
        gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
