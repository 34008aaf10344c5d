"""Typed dependency aliases: routers ask for services by type, never import instances.

Accessors are `async def` on purpose: FastAPI runs plain `def` dependencies in the
thread pool, a thread hop per dependency per request for a mere attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.chat_proxy import ChatProxy
from services.generation import JobService
from services.memory_ledger import MemoryLedger
from services.memory_probe import MemoryProbe
from services.model_manager import ModelManager
from services.settings import Settings
from services.swarm_safety import SwarmService


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_probe(request: Request) -> MemoryProbe:
    return request.app.state.probe


async def get_ledger(request: Request) -> MemoryLedger:
    return request.app.state.ledger


SettingsDep = Annotated[Settings, Depends(get_settings)]
ProbeDep = Annotated[MemoryProbe, Depends(get_probe)]
LedgerDep = Annotated[MemoryLedger, Depends(get_ledger)]


async def get_models(request: Request) -> ModelManager:
    return request.app.state.models


async def get_chat(request: Request) -> ChatProxy:
    return request.app.state.chat


ModelsDep = Annotated[ModelManager, Depends(get_models)]
ChatDep = Annotated[ChatProxy, Depends(get_chat)]


async def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


JobsDep = Annotated[JobService, Depends(get_jobs)]


async def get_swarm(request: Request) -> SwarmService:
    return request.app.state.swarm


SwarmDep = Annotated[SwarmService, Depends(get_swarm)]
