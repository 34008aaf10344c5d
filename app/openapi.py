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

from services.generation.capabilities import PipelineCaps
from services.settings import KINDS, Settings


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
    complete = _describe_pipelines(app, settings, doc)
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
    if complete:  # else built again once every configured folder has been read
        app.openapi_schema = doc
    return doc


def caps_text(caps: PipelineCaps) -> str:
    """One paragraph on what a configured pipeline makes, for its endpoint's description."""
    parts = [f"**Configured pipeline: {caps.class_name}**"]
    if caps.kind in ("image", "video"):
        parts.append(
            f"width and height multiples of {caps.size_multiple}, "
            f"default {caps.default_width}x{caps.default_height}"
        )
    if caps.kind == "video":
        parts.append(f"frames {caps.frame_rule.text}, default {caps.default_frames or 'its own'}")
        if caps.video_audio:
            parts.append(f"the MP4 carries its audio track ({caps.sample_rate} Hz)")
    if caps.kind == "music":
        parts.append(
            f"{caps.sample_rate} Hz, default {caps.default_duration_s or 'its own'} s"
            + (f", at most {caps.max_duration_s:g} s" if caps.max_duration_s else "")
        )
    takes = caps.inputs
    inputs = [
        name
        for name, on in (
            ("image (required)" if takes.image_required else "image", takes.image),
            ("last_image", takes.last_image),
            ("lyrics", takes.lyrics),
            ("negative_prompt", takes.negative_prompt),
            ("guidance_scale", takes.guidance),
        )
        if on
    ]
    parts.append("takes " + (", ".join(inputs) if inputs else "the prompt alone"))
    if not takes.prompt:
        parts.append("no prompt")
    parts.append(f"weights stored as {caps.published_dtype or 'float32 (or unstated)'}")
    return "; ".join(parts) + "."


def _describe_pipelines(app: FastAPI, settings: Settings, doc: dict[str, Any]) -> bool:
    """Add each configured pipeline's capabilities to its endpoint's description; False
    while a configured folder has not been read yet (start-up reads them)."""
    registry = getattr(app.state, "pipelines", None)
    known = registry.known_caps() if registry is not None else {}
    complete = True
    for kind in KINDS:
        if getattr(settings.generation, kind).pipeline is None:
            continue
        caps = known.get(kind)
        op = doc.get("paths", {}).get(f"/generate-{kind}", {}).get("post")
        if caps is None or op is None:
            complete = complete and op is None
            continue
        op["description"] = f"{op.get('description', '')}\n\n{caps_text(caps)}".strip()
    return complete
