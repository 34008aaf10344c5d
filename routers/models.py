"""Tiers and operator endpoints: list, load, unload, unload all."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.deps import ModelsDep

router = APIRouter(tags=["models"])


class OpenAIModel(BaseModel):
    id: str = Field(description="Tier name (or `auto`), to pass as `model` in chat requests.")
    object: str = "model"
    owned_by: str = "edison"
    status: str = Field(description="unloaded, loading, loaded or failed.", examples=["loaded"])
    heavy: bool = Field(description="Whether the tier uses the heavy slot.")


class OpenAIModelList(BaseModel):
    object: str = "list"
    data: list[OpenAIModel]


class TierInfo(BaseModel):
    tier: str
    heavy: bool
    status: str
    path: str
    n_gpu_layers: int = Field(description="Configured GPU layers (-1: all).")
    n_ctx: int = Field(description="Configured context.")
    preload: bool
    alias_of: str | None = Field(description="Tier whose worker serves this one (same file).")
    last_error: str | None
    loads: int = Field(description="Successful loads since start.")
    attempts: list[dict[str, Any]] = Field(description="Rungs tried by the last load.")
    loaded: dict[str, Any] | None = Field(description="The LoadedModel when loaded.")
    fallbacks: list[str] = Field(description="Tiers that answer when this one cannot.")


class ModelsView(BaseModel):
    heavy_slot: str | None
    tiers: list[TierInfo]


class UnloadResult(BaseModel):
    unloaded: list[str] = Field(description="Tiers unloaded.")
    freed_mb: float = Field(description="Free memory gained on the device, measured.")
    held_mb: float = Field(description="What the ledger held for them.")


@router.get("/v1/models", response_model=OpenAIModelList, summary="Tiers, OpenAI style")
async def openai_models(models: ModelsDep) -> dict[str, Any]:
    data = [
        {"id": "auto", "status": "loaded" if models.loaded_info() else "unloaded", "heavy": False}
    ]
    data += [{"id": t.name, "status": t.status, "heavy": t.heavy} for t in models.tiers.values()]
    return {"object": "list", "data": data}


@router.get(
    "/models", response_model=ModelsView, summary="Every tier with its state and load history"
)
async def list_models(models: ModelsDep) -> dict[str, Any]:
    return {"heavy_slot": models.heavy_slot, "tiers": models.describe()}


@router.post("/models/unload-all", response_model=UnloadResult, summary="End every worker")
async def unload_all(models: ModelsDep) -> dict[str, Any]:
    return await models.unload_all(reason="operator")


@router.post("/models/{key}/load", response_model=TierInfo, summary="Load a tier now")
async def load(key: str, models: ModelsDep) -> dict[str, Any]:
    await models.load(key, reason="operator")
    return models.tiers[key].to_dict()


@router.post("/models/{key}/unload", response_model=UnloadResult, summary="Unload a tier now")
async def unload(key: str, models: ModelsDep) -> dict[str, Any]:
    return await models.unload(key, reason="operator")
