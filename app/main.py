"""The FastAPI application factory and its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app.errors import install_error_handlers
from app.guard import RequestGuard
from app.logging_setup import configure_logging, quiet_libraries
from app.openapi import configured_openapi
from app.report import memory_report
from app.schemas import error_responses
from app.security import bearer_scheme
from routers import chat, events, generate, health, jobs, models, openai_images, swarm, system
from services.errors import EdisonError
from services.events import EventBus
from services.generation.jobs import JobService
from services.generation.registry import PipelineRegistry
from services.llm.chat import ChatProxy
from services.llm.manager import ModelManager
from services.memory.gate import MemoryGate
from services.memory.placement import Placement, ledger_for
from services.memory.probe import MemoryProbe
from services.metrics import Metrics
from services.settings import KINDS, Settings, load_settings
from services.swarm.runner import SwarmService

log = logging.getLogger("edison.app")
SNAPSHOT_EVERY_S = 0.5

DESCRIPTION = """\
Edison lets one GPU serve LLM chat and image, video and music generation without
running out of VRAM. Every load and every heavy task goes through one memory ledger;
`GET /system/memory` shows the very figures the decisions are taken on.

Errors share one body: `{"error": {"code", "message", ...details}}`. A 503 carries
`Retry-After`.
"""


async def _startup_work(app: FastAPI) -> None:
    """Work that /ready waits for; /health answers meanwhile."""
    state = app.state
    settings: Settings = state.settings
    try:
        snap = await to_thread.run_sync(state.probe.snapshot)
        probe = f"probe: {snap.vram_source}, {len(snap.gpus)} GPU(s)"
        state.startup_detail = probe + "; loading models"
        log.info(
            "Memory probe: source=%s gpus=%d ram_available=%.0fMB",
            snap.vram_source,
            len(snap.gpus),
            snap.ram_available_mb,
        )
        if any(getattr(settings.generation, k).pipeline for k in KINDS):
            # The first generation would otherwise pay for importing torch and diffusers
            # (about 5 s on the GPU host) after /ready said yes.
            state.startup_detail = probe + "; importing the generation stack"
            await to_thread.run_sync(import_generation_stack)
            for kind in KINDS:
                if getattr(settings.generation, kind).pipeline is not None:
                    try:  # what each folder can do: /system/memory and the OpenAPI page show it
                        await state.pipelines.caps(kind)
                    except EdisonError as exc:  # its requests and its load say so, naming it
                        log.error("generation.%s: %s", kind, exc.message)
        outcome = await state.models.load_llm_models()
        loads = ", ".join(f"{e.tier}: {e.outcome}" for e in outcome) or "no tiers configured"
        state.startup_detail = f"{probe}; models: {loads}"
        warmed = []
        for kind in KINDS:
            cfg = getattr(settings.generation, kind)
            if cfg.preload and cfg.pipeline is not None:
                state.startup_detail = f"{probe}; models: {loads}; warming {kind}"
                try:
                    ms = await state.jobs.warm(kind)
                    warmed.append(f"{kind} warmed in {ms:.0f} ms")
                except Exception as exc:  # noqa: BLE001 - a broken pipeline must not stop start-up
                    warmed.append(f"{kind} failed: {getattr(exc, 'message', exc)}")
        state.startup_detail = f"{probe}; models: {loads}" + (
            f"; pipelines: {', '.join(warmed)}" if warmed else ""
        )
    except Exception as exc:  # noqa: BLE001 - a failed start-up step must not kill the app
        state.startup_detail = f"start-up failed: {exc}"
        log.exception("start-up work failed")
    finally:
        state.ready.set()


def import_generation_stack() -> None:
    """Import torch, diffusers and transformers, and route their chatter to the log."""
    from services.generation.capabilities import diffusers_name

    diffusers_name("DiffusionPipeline")  # under the lock that capability reads take
    importlib.import_module("transformers")
    quiet_libraries()


async def _memory_snapshots(app: FastAPI) -> None:
    """Publish the memory report after something happened, at most every 500 ms, while
    anyone listens to /events."""
    state = app.state
    bus: EventBus = state.events
    while True:
        await bus.changed.wait()
        bus.changed.clear()
        if bus.subscribers:
            try:
                report = await memory_report(
                    state.placement, state.models, state.gate, state.pipelines, state.jobs
                )
            except Exception:  # noqa: BLE001 - a failed probe must not end the stream
                log.exception("memory snapshot for /events failed")
            else:
                bus.publish("memory.snapshot", report)
        await asyncio.sleep(SNAPSHOT_EVERY_S)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    state = app.state
    mem = settings.memory
    state.probe = state.probe_override or MemoryProbe(
        timeout_s=mem.probe_timeout_s,
        vram_budget_mb=mem.vram_budget_mb,
        backoff_s=mem.probe_backoff_s,
        backoff_max_s=mem.probe_backoff_max_s,
    )
    state.ledger = ledger_for(settings)
    state.placement = Placement(settings, state.probe, state.ledger)
    state.events = EventBus()
    state.events.bind(asyncio.get_running_loop())
    state.models = ModelManager(
        settings, state.placement, events=state.events, **app.state.manager_options
    )
    state.chat = ChatProxy(state.models)
    state.swarm = SwarmService(settings, state.placement, state.models, state.chat)
    state.pipelines = PipelineRegistry(
        settings, state.placement, run_device=state.pipeline_run_device
    )
    state.gate = MemoryGate(
        settings, state.placement, state.models, pipelines=state.pipelines, events=state.events
    )
    state.metrics = Metrics()
    state.pipelines.on_measured = state.metrics.observe_prediction
    state.jobs = JobService(
        settings,
        state.gate,
        state.pipelines,
        observe=state.metrics.observe_task,
        events=state.events,
    )
    state.cluster = None
    if settings.cluster is not None:
        # Only here is the database client imported: one host has no database at all.
        from services.cluster.node import ClusterNode

        state.cluster = ClusterNode(settings, state.placement, state.models, state.gate, state.jobs)
        state.jobs = state.cluster.jobs  # any node accepts; jobs run where a line is free
    await state.models.start()
    await state.pipelines.start()
    await state.jobs.start()  # outputs and jobs retention, in the background
    if state.cluster is not None:
        await state.cluster.start()
    state.ready = asyncio.Event()
    state.startup_detail = "starting"
    settings.server.outputs_dir.mkdir(parents=True, exist_ok=True)
    startup = asyncio.create_task(_startup_work(app), name="edison-startup")
    snapshots = asyncio.create_task(_memory_snapshots(app), name="edison-memory-snapshots")
    try:
        yield
    finally:
        for task in (startup, snapshots):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if state.cluster is not None:
            await state.cluster.stop()
        state.jobs.cancel_all("server shutting down")
        await state.jobs.shutdown()
        await state.chat.aclose()
        await state.pipelines.shutdown()
        await state.models.shutdown()
        state.probe.shutdown()


def create_app(
    settings: Settings | None = None,
    *,
    probe: Any = None,
    pipeline_run_device: Callable[[str], str] | None = None,
    **manager_options: Any,
) -> FastAPI:
    """Build a fresh app; with no settings, read them from EDISON_CONFIG or config/edison.yaml.

    ``probe`` replaces the memory probe (tests: a GPU that reports given numbers);
    ``pipeline_run_device`` maps a placed device to the torch device pipelines run on
    (a simulated many-GPU host runs every ``cuda:N`` on the CPU);
    ``manager_options`` go to the ModelManager (``python``, ``worker_env``).
    """
    settings = settings or load_settings()
    configure_logging(settings.server.log_level)
    app = FastAPI(
        title="Edison",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.manager_options = manager_options
    app.state.probe_override = probe
    app.state.pipeline_run_device = pipeline_run_device
    key = settings.server.api_key
    app.add_middleware(
        RequestGuard,
        api_key=key.get_secret_value() if key is not None else None,
        max_body_mb=settings.server.max_body_mb,
    )
    if settings.server.cors_origins:  # outside the guard: it answers CORS preflights
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    install_error_handlers(app)
    protected = [Depends(bearer_scheme)]  # documents the key; RequestGuard checks it
    bodies = error_responses(400, 401, 413, 422)  # routes that read a JSON body
    if settings.cluster is not None:  # first: its /jobs, /outputs and /ready answer instead
        from routers import cluster

        app.include_router(cluster.public)
        app.include_router(
            cluster.router, dependencies=protected, responses=error_responses(401, 404, 503)
        )
    app.include_router(health.router)
    app.include_router(system.router, dependencies=protected, responses=error_responses(401))
    app.include_router(models.router, dependencies=protected, responses=error_responses(401))
    app.include_router(
        chat.router, dependencies=protected, responses=bodies | error_responses(404, 502, 503)
    )
    app.include_router(
        generate.router, dependencies=protected, responses=bodies | error_responses(500, 503)
    )
    app.include_router(jobs.router, dependencies=protected, responses=error_responses(401, 404))
    app.include_router(
        openai_images.router, dependencies=protected, responses=error_responses(401, 413)
    )
    app.include_router(
        swarm.router, dependencies=protected, responses=bodies | error_responses(502, 503)
    )
    app.include_router(events.router, dependencies=protected, responses=error_responses(401))
    # The page and its files are public, like /docs: every call the page makes carries
    # the API key, which it asks for and keeps in the browser's session storage.
    app.include_router(events.page)
    app.mount("/ui/static", StaticFiles(directory=events.STATIC), name="ui-static")
    app.openapi = functools.partial(configured_openapi, app, settings)  # type: ignore[method-assign]
    return app
