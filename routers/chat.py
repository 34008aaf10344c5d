"""POST /v1/chat/completions: OpenAI-compatible, proxied to the answering tier's worker."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.deps import ChatDep

router = APIRouter(tags=["chat"])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = Field(
        description="Text, or OpenAI content parts (`text`, `image_url`)."
    )


class EdisonRouting(BaseModel):
    """The `edison` field of a chat answer: which tier answered, and why."""

    tier: str = Field(description="The tier that answered.")
    requested: str = Field(description="The `model` the request asked for.")
    route: str = Field(description="Why that tier was asked (auto, images, ...).")
    fallback_reason: str | None = Field(
        None, description="Why another tier answered than the one asked for."
    )


class ChatRequest(BaseModel):
    """OpenAI chat request; other OpenAI fields (temperature, stop, ...) pass through."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "model": "auto",
                    "messages": [{"role": "user", "content": "Hello"}],
                    "max_tokens": 32,
                }
            ]
        },
    )
    model: str = Field(
        "auto", description="A tier (fast, medium, deep, reasoning, vision) or auto."
    )
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)


@router.post(
    "/v1/chat/completions",
    summary="Chat completion, streaming or not; says which tier answered",
    description="The `edison` field of the body and the `X-Edison-Tier` header name the tier "
    "that answered, and why when it is not the one asked for.",
)
async def chat_completions(req: ChatRequest, chat: ChatDep) -> Any:
    body = req.model_dump(exclude_unset=True, exclude_none=True)
    body.setdefault("model", "auto")
    if req.stream:
        opened = await chat.stream(body)
        return StreamingResponse(
            opened.chunks,
            media_type="text/event-stream",
            headers={"X-Edison-Tier": opened.routing.tier, "Cache-Control": "no-cache"},
        )
    done = await chat.complete(body)
    edison = EdisonRouting.model_validate(done.routing, from_attributes=True)
    data = {**done.body, "edison": edison.model_dump(exclude_none=True)}
    return JSONResponse(data, headers={"X-Edison-Tier": done.routing.tier})
