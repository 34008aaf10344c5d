"""Typed dependency aliases: routers ask for services by type, never import instances.

Accessors are `async def` on purpose: FastAPI runs plain `def` dependencies in the
thread pool, a thread hop per dependency per request for a mere attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.events import EventBus
from services.generation.jobs import JobService
from services.generation.registry import PipelineRegistry
from services.llm.chat import ChatProxy
from services.llm.manager import ModelManager
from services.memory.gate import MemoryGate
from services.memory.placement import Placement
from services.metrics import Metrics
from services.settings import Settings
from services.swarm.runner import SwarmService


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_placement(request: Request) -> Placement:
    return request.app.state.placement


async def get_models(request: Request) -> ModelManager:
    return request.app.state.models


async def get_chat(request: Request) -> ChatProxy:
    return request.app.state.chat


async def get_gate(request: Request) -> MemoryGate:
    return request.app.state.gate


async def get_pipelines(request: Request) -> PipelineRegistry:
    return request.app.state.pipelines


async def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


async def get_swarm(request: Request) -> SwarmService:
    return request.app.state.swarm


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_events(request: Request) -> EventBus:
    return request.app.state.events


SettingsDep = Annotated[Settings, Depends(get_settings)]
PlacementDep = Annotated[Placement, Depends(get_placement)]
ModelsDep = Annotated[ModelManager, Depends(get_models)]
ChatDep = Annotated[ChatProxy, Depends(get_chat)]
GateDep = Annotated[MemoryGate, Depends(get_gate)]
PipelinesDep = Annotated[PipelineRegistry, Depends(get_pipelines)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
SwarmDep = Annotated[SwarmService, Depends(get_swarm)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EventsDep = Annotated[EventBus, Depends(get_events)]
