"""Tiers and operator endpoints: list, load, unload, unload all."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from app.deps import ModelsDep, PipelinesDep, SettingsDep
from app.schemas import LoadedModelInfo, error_responses
from routers.openai_images import image_model_id

router = APIRouter(tags=["models"])


class OpenAIModel(BaseModel):
    id: str = Field(
        description="Tier name (or `auto`), to pass as `model` in chat requests; the image "
        "pipeline's id, as `model` of `POST /v1/images/generations`."
    )
    object: str = "model"
    owned_by: str = "edison"
    status: str = Field(description="unloaded, loading, loaded or failed.", examples=["loaded"])
    heavy: bool = Field(description="Whether the tier uses the heavy slot.")
    kind: str = Field(
        "chat",
        description="What the model makes: `chat` (`/v1/chat/completions`) or `image` "
        "(`/v1/images/generations`).",
    )
    nodes: list[str] | None = Field(
        None,
        description="Cluster mode: the nodes that have the tier loaded (a chat goes to one "
        "of them); null on one host.",
    )


class OpenAIModelList(BaseModel):
    object: str = "list"
    data: list[OpenAIModel]


class LoadAttemptInfo(BaseModel):
    rung: int = Field(description="Ladder index; -1: the file failed before any rung.")
    n_gpu_layers: int
    n_ctx: int
    estimate_mb: float = Field(description="What the rung was estimated to need.")
    ok: bool
    reason: str = Field(description="`ready`, or why the attempt failed.")
    ms: float
    failure: str | None = Field(
        None,
        description="Why it failed: `memory` (the ladder walks on to a smaller rung), "
        "`model`, `backend`, `timeout` or `crash` (the tier fails at once).",
    )
    at: float


class TierInfo(BaseModel):
    tier: str
    heavy: bool
    status: str = Field(
        description="unloaded, loading, loaded, draining (being unloaded: no new requests), "
        "unloading or failed."
    )
    path: str
    n_gpu_layers: int = Field(description="Configured GPU layers (-1: all).")
    n_ctx: int = Field(description="Configured context.")
    preload: bool
    alias_of: str | None = Field(description="Tier whose worker serves this one (same file).")
    last_error: str | None
    loads: int = Field(description="Successful loads since start.")
    unloads: int = Field(description="Unloads since start (the worker ended on purpose).")
    attempts: list[LoadAttemptInfo] = Field(description="Rungs tried by the last load.")
    loaded: LoadedModelInfo | None = Field(description="The running model when loaded.")
    fallbacks: list[str] = Field(description="Tiers that answer when this one cannot.")


class ModelsView(BaseModel):
    heavy_slot: str | None
    tiers: list[TierInfo]


class UnloadResultOut(BaseModel):
    unloaded: list[str] = Field(description="Tiers unloaded.")
    freed_mb: float = Field(description="Free memory gained on the device, measured.")
    held_mb: float = Field(description="What the ledger held for them.")
    settling: bool = Field(
        description="Whether a release was not confirmed (no NVML): the driver may lag."
    )


@router.get(
    "/v1/models",
    response_model=OpenAIModelList,
    summary="Tiers and the image pipeline, OpenAI style",
)
async def openai_models(
    models: ModelsDep, pipelines: PipelinesDep, settings: SettingsDep, request: Request
) -> OpenAIModelList:
    auto = "loaded" if models.loaded_models() else "unloaded"
    data = [OpenAIModel(id="auto", status=auto, heavy=False)]
    data += [OpenAIModel(id=t.tier, status=t.status, heavy=t.heavy) for t in models.describe()]
    cluster = getattr(request.app.state, "cluster", None)
    if cluster is not None:  # the cluster's tiers, and where each is loaded
        from routers.cluster import cluster_models

        data = await cluster_models(request, data)
    image = image_model_id(settings)
    if image is not None:  # an image task takes its device's heavy slot, as a heavy tier
        host = pipelines.host_of("image")
        status = "loaded" if host is not None and host.loaded else "unloaded"
        data.append(OpenAIModel(id=image, status=status, heavy=True, kind="image"))
    return OpenAIModelList(data=data)


@router.get(
    "/models", response_model=ModelsView, summary="Every tier with its state and load history"
)
async def list_models(models: ModelsDep) -> ModelsView:
    tiers = [TierInfo.model_validate(t, from_attributes=True) for t in models.describe()]
    return ModelsView(heavy_slot=models.heavy_slot, tiers=tiers)


@router.post("/models/unload-all", response_model=UnloadResultOut, summary="End every worker")
async def unload_all(models: ModelsDep) -> UnloadResultOut:
    out = await models.unload_all(reason="operator")
    return UnloadResultOut.model_validate(out, from_attributes=True)


@router.post(
    "/models/{key}/load",
    response_model=TierInfo,
    summary="Load a tier now",
    responses=error_responses(404, 503),
)
async def load(key: str, models: ModelsDep) -> TierInfo:
    await models.load(key, reason="operator")
    return TierInfo.model_validate(models.tier_view(key), from_attributes=True)


@router.post(
    "/models/{key}/unload",
    response_model=UnloadResultOut,
    summary="Unload a tier now",
    responses=error_responses(404),
)
async def unload(key: str, models: ModelsDep) -> UnloadResultOut:
    out = await models.unload(key, reason="operator")
    return UnloadResultOut.model_validate(out, from_attributes=True)
