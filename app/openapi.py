"""The OpenAPI document with the limits this configuration enforces.

Request models carry wide static bounds; the service refuses what the config does not
allow (`generation.<kind>.max_steps`, `max_pixels`, `max_images`, `max_frames`,
`max_duration_s`, `swarm.max_agents`, the configured tiers). Here the document is
narrowed to those very limits, so a request the schema calls valid is never refused for
a limit it did not state.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.settings import Settings


def _narrow(prop: dict[str, Any], *, maximum: float | None = None, note: str = "") -> None:
    """Lower the maximum of a number property (of its number branch when it is nullable)."""
    if maximum is not None:
        numbers = [b for b in prop.get("anyOf", [prop]) if b.get("type") in ("integer", "number")]
        for branch in numbers:
            branch["maximum"] = min(branch.get("maximum", maximum), maximum)
    if note:
        prop["description"] = f"{prop.get('description', '')} {note}".strip()


def configured_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    schemas = doc.get("components", {}).get("schemas", {})
    gen = settings.generation
    for name, kind in (
        ("ImageRequest", "image"),
        ("VideoRequest", "video"),
        ("MusicRequest", "music"),
    ):
        props = schemas.get(name, {}).get("properties", {})
        cfg = getattr(gen, kind)
        if "steps" in props:
            _narrow(props["steps"], maximum=cfg.max_steps, note=f"Default {cfg.default_steps}.")
        if kind in ("image", "video"):
            most = cfg.max_pixels
            for side in ("width", "height"):
                if side in props:
                    _narrow(
                        props[side],
                        maximum=most // 8,
                        note=f"width x height at most {most:,} pixels "
                        f"(`generation.{kind}.max_pixels`).",
                    )
        if kind == "image" and "num_images" in props:
            _narrow(props["num_images"], maximum=cfg.max_images)
        if kind == "video" and "num_frames" in props:
            _narrow(props["num_frames"], maximum=cfg.max_frames)
        if kind == "music" and "duration_s" in props:
            _narrow(props["duration_s"], maximum=cfg.max_duration_s)
    tiers = list(settings.models.tiers())
    agents = schemas.get("SwarmRequest", {}).get("properties", {}).get("agents")
    if agents is not None:
        agents["maxItems"] = min(
            agents.get("maxItems", settings.swarm.max_agents), settings.swarm.max_agents
        )
    agent_model = schemas.get("SwarmAgent", {}).get("properties", {}).get("model")
    if agent_model is not None:
        agent_model.pop("anyOf", None)
        agent_model["enum"] = tiers or ["fast"]
        agent_model["type"] = "string"
    openai_images = schemas.get("ImageGenerationRequest", {}).get("properties", {})
    if "n" in openai_images:
        _narrow(openai_images["n"], maximum=gen.image.max_images)
    chat_model = schemas.get("ChatRequest", {}).get("properties", {}).get("model")
    if chat_model is not None:
        chat_model["enum"] = ["auto", *tiers]
    # FastAPI documents its own 422 body on routes with parameters; Edison answers its
    # common error body there too.
    for item in doc.get("paths", {}).values():
        for op in item.values():
            resp = op.get("responses", {}).get("422")
            if resp and "HTTPValidationError" in str(resp):
                resp["description"] = "Invalid request; `error.fields` names each bad field."
                resp["content"] = {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                }
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = doc
    return doc
