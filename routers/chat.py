"""POST /v1/chat/completions: OpenAI-compatible, proxied to the answering tier's worker."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.deps import ChatDep
from app.streaming import ClosingStreamingResponse
from services.llm.chat import ChatRouting
from services.llm.chat_checks import (
    FLOAT_BOUNDS,
    INT_BOUNDS,
    LOGIT_BIAS_BOUNDS,
    MAX_STOP,
)

router = APIRouter(tags=["chat"])
_Bias = Annotated[
    float,
    Field(strict=True, ge=LOGIT_BIAS_BOUNDS[0], le=LOGIT_BIAS_BOUNDS[1], allow_inf_nan=False),
]


def _number(name: str, description: str) -> Any:
    """A nullable number with the bounds services/llm/chat_checks.py enforces: strict
    (no strings or booleans), finite."""
    lo, hi = FLOAT_BOUNDS[name]
    return Field(None, ge=lo, le=hi, strict=True, allow_inf_nan=False, description=description)


def _integer(name: str, description: str) -> Any:
    lo, hi = INT_BOUNDS[name]
    return Field(None, ge=lo, le=hi, strict=True, description=description)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"] = Field(
        description="`developer` (OpenAI's newer name) is sent to the worker as `system`."
    )
    content: str | list[dict[str, Any]] | None = Field(
        None,
        description="Text, or OpenAI content parts: `text` and `image_url` for a user; "
        "`text` parts of other roles are joined. Null only on an assistant message with "
        "`tool_calls`.",
    )
    tool_calls: list[dict[str, Any]] | None = Field(
        None,
        description="An assistant's calls: `{id, type: function, function: {name, arguments}}`.",
    )
    tool_call_id: str | None = Field(
        None, description="Required on a `tool` message: the call it answers."
    )
    name: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="`json_schema` is sent to the worker as `json_object` with its schema."
    )
    json_schema: dict[str, Any] | None = Field(None, description="`{name, schema}`.")


class EdisonRouting(BaseModel):
    """The `edison` field of a chat answer: which tier answered, and why."""

    tier: str = Field(description="The tier that answered.")
    requested: str = Field(description="The `model` the request asked for.")
    route: str = Field(description="Why that tier was asked (auto, images, ...).")
    fallback_reason: str | None = Field(
        None, description="Why another tier answered than the one asked for."
    )
    max_tokens_clamped_to: int | None = Field(
        None,
        description="The `max_tokens` sent to the worker when Edison lowered the request's "
        "(or set it, when none was given) to what the context leaves after the prompt.",
    )
    device: str | None = Field(
        None, description="Where the answering worker is placed (`cuda:1`, `cpu`, ...)."
    )
    residency_wait_s: float | None = Field(
        None,
        description="Seconds this request waited for a heavy model's `models.min_residency_s` "
        "before its tier could take that device's heavy slot.",
    )


class ChatRequest(BaseModel):
    """OpenAI chat request. Sampling parameters are checked against OpenAI's bounds;
    other fields pass through to the llama.cpp worker."""

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
    stream: bool = Field(False, strict=True, description="A JSON boolean (not 0 or 1).")
    max_tokens: int | None = _integer(
        "max_tokens", "Lowered to what the context leaves after the prompt (see `edison`)."
    )
    max_completion_tokens: int | None = _integer(
        "max_completion_tokens", "OpenAI's newer name for `max_tokens`."
    )
    temperature: float | None = _number("temperature", "Sampling temperature.")
    top_p: float | None = _number("top_p", "Nucleus sampling mass.")
    presence_penalty: float | None = _number("presence_penalty", "Penalty for tokens seen.")
    frequency_penalty: float | None = _number("frequency_penalty", "Penalty per occurrence.")
    n: int | None = _integer("n", "Choices to return: the llama.cpp workers return one.")
    seed: int | None = _integer("seed", "Sampling seed.")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"A stop sequence, or a list of at most {MAX_STOP}."
    )
    logit_bias: dict[str, _Bias] | None = Field(
        None, description="Token id (a string of digits) to a bias."
    )
    logprobs: bool | None = Field(None, strict=True)
    top_logprobs: int | None = _integer("top_logprobs", "Most likely tokens per position.")
    response_format: ResponseFormat | None = None
    top_k: int | None = _integer("top_k", "llama.cpp: sample from the k most likely tokens.")
    min_p: float | None = _number("min_p", "llama.cpp: minimum probability, relative.")
    repeat_penalty: float | None = _number("repeat_penalty", "llama.cpp: repetition penalty.")
    min_tokens: int | None = _integer("min_tokens", "llama.cpp: tokens before a stop.")
    mirostat_mode: int | None = _integer("mirostat_mode", "llama.cpp: 0 off, 1 or 2.")
    mirostat_tau: float | None = _number("mirostat_tau", "llama.cpp: Mirostat target.")
    mirostat_eta: float | None = _number("mirostat_eta", "llama.cpp: Mirostat rate.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError(f"must be a string or a list of at most {MAX_STOP} strings")
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences ({len(v)} given)")
        return v


@router.post(
    "/v1/chat/completions",
    summary="Chat completion, streaming or not; says which tier answered",
    description="The `edison` field of the body and the `X-Edison-Tier` header name the tier "
    "that answered, and why when it is not the one asked for; `X-Edison-Max-Tokens` (and "
    "`edison.max_tokens_clamped_to`) the `max_tokens` sent when Edison lowered it to what "
    "the context leaves after the prompt.",
    responses={
        200: {
            "description": "An OpenAI chat completion, or with `stream: true` its chunks as "
            "server-sent events (`data: {...}`, then `data: [DONE]`).",
            "content": {
                "application/json": {},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    },
)
async def chat_completions(req: ChatRequest, chat: ChatDep, request: Request) -> Any:
    body = req.model_dump(exclude_unset=True, exclude_none=True)
    body.setdefault("model", "auto")
    if getattr(request.app.state, "cluster", None) is not None:  # to the node holding the tier
        from routers.cluster import chat_elsewhere

        if (answer := await chat_elsewhere(request, body)) is not None:
            return answer
    if req.stream:
        opened = await chat.stream(body)
        # The lease on the model ends however the response ends (a client gone at once).
        return ClosingStreamingResponse(
            opened.chunks,
            on_close=opened.close,
            media_type="text/event-stream",
            headers={**_headers(opened.routing), "Cache-Control": "no-cache"},
        )
    done = await chat.complete(body)
    edison = EdisonRouting.model_validate(done.routing, from_attributes=True)
    data = {**done.body, "edison": edison.model_dump(exclude_none=True)}
    return JSONResponse(data, headers=_headers(done.routing))


def _headers(routing: ChatRouting) -> dict[str, str]:
    out = {"X-Edison-Tier": routing.tier}
    if routing.max_tokens_clamped_to is not None:
        out["X-Edison-Max-Tokens"] = str(routing.max_tokens_clamped_to)
    return out
