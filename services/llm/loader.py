"""Loading one tier: walk the ladder of GPU layers x context sizes from the rung that fits.

Placement (``services/memory/placement.py``) picks the start rung from the GGUF-header
estimate and what is usable now; this module starts a worker at that rung, and on a
failure at the next one, until one is ready. Every attempt reserves its need in the
ledger first and settles it to the measured figure once the worker is up. The
ModelManager calls :meth:`LadderLoader.load` under its load lock.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from services.errors import ModelLoadFailed
from services.llm.records import LoadAttempt, LoadedModel, TierState
from services.llm.worker import LlamaWorker, WorkerSpec, WorkerStartFailed
from services.memory.gguf_estimate import Estimate, InvalidModelFile, estimate, read_gguf_info
from services.memory.ledger import CPU
from services.memory.placement import (
    Placement,
    estimate_on,
    load_need_mb,
    load_rungs,
    start_rung,
)
from services.memory.probe import rss_mb
from services.settings import Settings

log = logging.getLogger("edison.models")

OnExit = Callable[[LlamaWorker, int], None]


class LadderLoader:
    """Starts workers for tiers; one per ModelManager."""

    def __init__(
        self,
        settings: Settings,
        placement: Placement,
        on_exit: OnExit,
        *,
        python: str = sys.executable,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.placement = placement
        self.ledger = placement.ledger
        self.on_exit = on_exit
        self.python = python
        self.worker_env = worker_env

    async def load(self, tier: TierState) -> LoadedModel:
        """Load ``tier`` at the first rung that fits, walking down on failures.

        Appends each attempt to ``tier.attempts``; raises InvalidModelFile (a file that
        cannot be loaded at any rung), InsufficientMemory (nothing fits in RAM on a
        CPU-only host) or ModelLoadFailed (every rung failed).
        """
        path = Path(tier.cfg.path)
        try:
            info = await anyio.to_thread.run_sync(read_gguf_info, path)
        except InvalidModelFile as exc:
            tier.attempts.append(LoadAttempt(-1, 0, 0, 0, False, exc.message, 0))
            raise
        view = await self.placement.view()
        device = view.device
        rungs = load_rungs(
            tier.cfg.n_gpu_layers, tier.cfg.n_ctx, self.settings.ladder, info, device
        )
        overhead = self.placement.worker_overhead_mb(device)
        start = start_rung(
            info, rungs, view.budget.usable_mb, device, overhead_mb=overhead, what=tier.name
        )
        if start.index:
            log.info(
                "Load of %s starts at rung %d (layers=%d, ctx=%d): %.0f MB usable on %s",
                tier.name,
                start.index,
                *rungs[start.index],
                start.usable_mb,
                device,
            )
        for i in range(start.index, len(rungs)):
            n_layers, n_ctx = rungs[i]
            est = estimate(info, n_layers, n_ctx)
            need = load_need_mb(est, device, overhead)
            model = await self._try_rung(tier, i, n_layers, n_ctx, est, need, device)
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
        worker = LlamaWorker(spec, python=self.python, on_exit=self.on_exit, env=self.worker_env)
        t0 = time.perf_counter()
        try:
            await worker.start(self.settings.models.load_timeout_s)
        except WorkerStartFailed as exc:
            self.ledger.release(res)
            why = ("missing file: " if exc.missing_file else "") + exc.reason
            if exc.timed_out:
                why = f"not ready within {self.settings.models.load_timeout_s:g} s"
            ms = (time.perf_counter() - t0) * 1000
            tier.attempts.append(LoadAttempt(rung, n_layers, n_ctx, need_mb, False, why, ms))
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
        measured = await anyio.to_thread.run_sync(
            self.placement.probe.process_vram_mb, [worker.pid]
        )
        vram = measured.get(worker.pid) if measured is not None else None
        rss = rss_mb(worker.pid)
        settle = rss if device == CPU else vram
        if settle is not None:
            self.ledger.settle(res, settle)
            # What this worker cost beyond its estimate teaches the next load's need.
            if device == CPU or spec.n_gpu_layers:
                learned = self.placement.learned
                if learned.record_worker_load(device, estimate_on(est, device), settle):
                    await anyio.to_thread.run_sync(learned.save)
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
