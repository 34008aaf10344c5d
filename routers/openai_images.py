"""POST /v1/images/generations: OpenAI's image API on Edison's image pipeline.

The openai SDK's ``client.images.generate`` and Open WebUI's "OpenAI" image engine
call it unchanged. Each request is one generation job through the same ``JobService``,
gate and queue as ``/generate-image`` (a client that disconnects cancels it); the
answer has OpenAI's shape, and so have its errors (see app/errors.py).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.deps import JobsDep, SettingsDep
from app.errors import OpenAIInvalidRequest, is_invalid_json, validation_fields
from app.schemas import ErrorBody
from routers.generate import _wait_or_cancel
from services.errors import Cancelled, InvalidRequest, NotFound
from services.generation.jobs import Job
from services.generation.params import GenerationParams
from services.settings import Settings

# The bounds of each side that /generate-image's schema states (ImageRequest); the
# pipeline's size multiple and generation.image.max_pixels are JobService's to check.
SIDE_MIN, SIDE_MAX = 8, 8192
# OpenAI's names for the fields of GenerationParams that JobService names in its errors.
PARAM_OF = {"num_images": "n", "width": "size", "height": "size"}


class OpenAIRoute(APIRoute):
    """A route whose invalid requests answer 400 naming OpenAI's parameter, as OpenAI's
    own API does (Edison's routes answer 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                if is_invalid_json(exc):
                    raise  # 400 invalid_json, as everywhere
                first, *more = validation_fields(exc)
                also = "".join(f"; {f['field']}: {f['message']}" for f in more)
                raise OpenAIInvalidRequest(first["field"], first["message"] + also) from None

        return route


router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


class ImageGenerationRequest(BaseModel):
    """OpenAI's image generation request. Unknown fields are refused (400 naming them)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dusk", "size": "512x512", "response_format": "b64_json"}
            ]
        },
    )
    prompt: str = Field(min_length=1, max_length=4000, description="What to generate.")
    model: str | None = Field(
        "auto",
        description="The image pipeline's id as `GET /v1/models` lists it (its folder's "
        "name), or `auto`.",
    )
    n: int | None = Field(
        1, ge=1, le=64, strict=True, description="Images to generate (maximum from config)."
    )
    size: str | None = Field(
        "auto",
        description="`WIDTHxHEIGHT` in pixels (each side 8 to 8192, a multiple of the "
        "pipeline's size multiple, the area within `generation.image.max_pixels`), or "
        "`auto`: the configured default size, else the pipeline's own.",
        examples=["512x512"],
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        "url",
        description="`url` (the default, as OpenAI's): a link to `GET /outputs/{name}`, which "
        "takes the API key like every other route; `b64_json`: the PNG in the answer.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**32 - 1,
        strict=True,
        description="Edison's extension: the random seed (the answer's `edison.seed` reports "
        "the one used).",
    )
    stream: bool | None = Field(
        None,
        strict=True,
        description="Accepted as `false` only: Edison does not stream partial images.",
    )
    partial_images: int | None = Field(
        None, ge=0, le=3, description="Accepted and ignored (it applies to streaming only)."
    )
    output_compression: int | None = Field(
        None, ge=0, le=100, description="Accepted and ignored: the images are PNG."
    )
    quality: str | None = Field(None, description="Accepted and ignored.")
    style: str | None = Field(None, description="Accepted and ignored.")
    background: str | None = Field(None, description="Accepted and ignored.")
    moderation: str | None = Field(None, description="Accepted and ignored.")
    output_format: str | None = Field(None, description="Accepted and ignored: always PNG.")
    user: str | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    complexity: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("size")
    @classmethod
    def _size_form(cls, v: str | None) -> str | None:
        if v is None or v == "auto":
            return v
        w, sep, h = v.partition("x")
        if not (sep and w.isascii() and w.isdigit() and h.isascii() and h.isdigit()):
            raise ValueError(f"must be 'auto' or WIDTHxHEIGHT, e.g. '512x512' (got {v!r})")
        return v

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("streaming is not supported: send false or leave it out")
        return v


class ImageData(BaseModel):
    """One image: ``url`` or ``b64_json``, as the request's ``response_format`` asked."""

    url: str | None = Field(None, description="Absolute URL of the PNG (`GET /outputs/{name}`).")
    b64_json: str | None = Field(None, description="The PNG, base64-encoded.")


class EdisonImageInfo(BaseModel):
    """The ``edison`` field of the answer: the job behind it."""

    job_id: str = Field(description="The generation job (`GET /jobs/{job_id}`).")
    seed: int | None = Field(description="The seed used.")
    device: str | None = Field(description="Where it ran (`cuda:0`, `cpu`, ...).")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix seconds when the request was taken.")
    data: list[ImageData]
    size: str = Field(description="`WIDTHxHEIGHT` of the images made.", examples=["512x512"])
    output_format: Literal["png"] = "png"
    edison: EdisonImageInfo


def image_model_id(settings: Settings) -> str | None:
    """The id under which /v1 names the image pipeline: its folder's name (with
    ``-image`` added should that be ``auto`` or a chat tier's name); None without one."""
    folder = settings.generation.image.pipeline
    if folder is None:
        return None
    name = folder.name or folder.resolve().name
    taken = {"auto", *settings.models.tiers()}
    return f"{name}-image" if name in taken else name


def nearest_sizes(field: str, nearest: list[int], width: int, height: int) -> list[str]:
    """``WIDTHxHEIGHT`` sizes from the valid values either side of a refused side
    (JobService's ``nearest``). The other side keeps its value when it is on the same
    grid (the step between those values: one size multiple for both sides), else takes
    its own values either side; nearest first."""
    if not nearest:
        return []
    step = nearest[1] - nearest[0] if len(nearest) > 1 else nearest[0]
    other = height if field == "width" else width
    below = other // step * step
    others = [other] if other % step == 0 else [v for v in (below, below + step) if v >= step]
    pairs = [(v, o) if field == "width" else (o, v) for v in nearest for o in others]
    pairs.sort(key=lambda s: (abs(s[0] - width) + abs(s[1] - height), s))
    return [f"{w}x{h}" for w, h in pairs]


def _size_refused(size: str, why: str, nearest: list[str]) -> OpenAIInvalidRequest:
    tail = f"; nearest valid sizes: {', '.join(nearest)}" if nearest else ""
    return OpenAIInvalidRequest("size", f"{size}: {why}{tail}", nearest=nearest)


def _requested_size(size: str | None) -> tuple[int, int] | None:
    """Width and height asked for; None: the pipeline's default. Whether the pipeline
    makes that size is JobService's to check (with the nearest valid values)."""
    if size is None or size == "auto":
        return None
    width, height = (int(v) for v in size.split("x"))
    if not (SIDE_MIN <= width <= SIDE_MAX and SIDE_MIN <= height <= SIDE_MAX):
        raise _size_refused(size, f"each side must be {SIDE_MIN} to {SIDE_MAX} pixels", [])
    return width, height


def _as_openai(exc: InvalidRequest, size: tuple[int, int] | None) -> OpenAIInvalidRequest:
    """JobService's refusal, named as OpenAI names the parameter: a refused width or
    height is ``size``, with the nearest valid sizes when the service gave the nearest
    values."""
    first = (exc.details.get("fields") or [{}])[0]
    name, why = str(first.get("field")), str(first.get("message"))
    if name in ("width", "height") and size is not None:
        nearest = nearest_sizes(name, list(first.get("nearest") or []), *size)
        return _size_refused("{}x{}".format(*size), f"{name} {why}", nearest)
    return OpenAIInvalidRequest(PARAM_OF.get(name, name), why)


async def _image_data(
    request: Request, job: Job, settings: Settings, response_format: str
) -> list[ImageData]:
    if response_format == "url":
        return [ImageData(url=str(request.url_for("get_output", name=o.name))) for o in job.outputs]
    root = settings.server.outputs_dir
    out = []
    for o in job.outputs:
        png = await anyio.to_thread.run_sync((root / o.name).read_bytes)
        out.append(ImageData(b64_json=base64.b64encode(png).decode("ascii")))
    return out


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorBody,
        "description": "An invalid parameter, named in `error.param` (`size` lists the "
        "nearest valid sizes; `n` above `generation.image.max_images`; an unknown field).",
    },
    404: {"model": ErrorBody, "description": "No such image model (`error.param`: `model`)."},
    409: {"model": ErrorBody, "description": "The job was cancelled (`DELETE /jobs/{id}`)."},
    500: {"model": ErrorBody, "description": "The generation failed inside its pipeline."},
    503: {
        "model": ErrorBody,
        "description": "The queue is full (`queue_full`), memory is short or the pipeline is "
        "unavailable: see `Retry-After`.",
    },
}


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Text to image, OpenAI style, through the same queue and gate as /generate-image",
    description="OpenAI's image generation request and answer. `quality`, `style`, "
    "`background`, `moderation`, `output_format`, `output_compression`, `partial_images`, "
    "`complexity`, `user` and `safety_identifier` are accepted and ignored (the images are "
    "PNG, made as the pipeline makes them); `seed` is Edison's extension. Errors have "
    "OpenAI's shape (`error.type`, `error.param`) besides Edison's `error.code`.",
)
async def create_images(
    req: ImageGenerationRequest, request: Request, jobs: JobsDep, settings: SettingsDep
) -> ImagesResponse:
    created = int(time.time())
    model_id = image_model_id(settings)
    if req.model not in (None, "auto", model_id):
        offered = ", ".join(repr(m) for m in ("auto", model_id) if m)
        unknown = NotFound(
            f"No image model {req.model!r}; this server makes images with {offered}",
            fields=[{"field": "model", "message": "unknown image model"}],
        )
        unknown.code = "model_not_found"  # OpenAI's code for it
        raise unknown
    size = _requested_size(req.size)
    width, height = size or (None, None)
    params = GenerationParams(
        prompt=req.prompt, width=width, height=height, num_images=req.n or 1, seed=req.seed
    )
    try:
        job = await jobs.submit("image", params)
    except InvalidRequest as exc:
        raise _as_openai(exc, size) from None
    await _wait_or_cancel(request, jobs, job)
    if job.exc is not None:
        raise job.exc
    if job.status != "succeeded":
        raise Cancelled(job.error.message if job.error else "cancelled", job_id=job.id)
    first = job.outputs[0]
    return ImagesResponse(
        created=created,
        data=await _image_data(request, job, settings, req.response_format or "url"),
        size=f"{first.width}x{first.height}",
        edison=EdisonImageInfo(job_id=job.id, seed=job.seed, device=job.device),
    )
