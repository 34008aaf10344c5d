"""Typed dependency aliases: routers ask for services by type, never import instances.

Accessors are `async def` on purpose: FastAPI runs plain `def` dependencies in the
thread pool, a thread hop per dependency per request for a mere attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.memory_ledger import MemoryLedger
from services.memory_probe import MemoryProbe
from services.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_probe(request: Request) -> MemoryProbe:
    return request.app.state.probe


async def get_ledger(request: Request) -> MemoryLedger:
    return request.app.state.ledger


SettingsDep = Annotated[Settings, Depends(get_settings)]
ProbeDep = Annotated[MemoryProbe, Depends(get_probe)]
LedgerDep = Annotated[MemoryLedger, Depends(get_ledger)]
