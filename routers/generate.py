"""POST /generate-image, /generate-video, /generate-music: gated diffusers pipelines.

Each request becomes a job. Without `Prefer: respond-async` the answer waits for the
job (a client that disconnects cancels it); with it, 202 and a status URL at once.
Fields a request leaves out take the config's default, else the pipeline's own; what
the pipeline can make (its size multiple, frame rule and inputs) is checked before the
job is queued (see services/generation/checks.py) and shown per pipeline in
`GET /system/memory`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.deps import JobsDep
from app.schemas import ErrorBody, JobView, job_view
from services.generation.jobs import Job, JobService
from services.generation.params import GenerationParams

router = APIRouter(tags=["generation"])

DATA_URL = "A data URL (data:image/png;base64,...) of a PNG, JPEG or WebP image"
ROUND = (
    "Round a `width`, `height` or `num_frames` the pipeline cannot make to the nearest one "
    "it can, instead of a 422; the job's `adjustments` say what was produced."
)


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str | None = Field(
        None,
        max_length=4000,
        description="What to generate (required, except by pipelines that take none, such as "
        "Stable Video Diffusion).",
    )
    negative_prompt: str | None = Field(None, max_length=4000, description="What to avoid.")
    steps: int | None = Field(
        None, ge=1, le=1000, description="Denoising steps (default and maximum from config)."
    )
    guidance_scale: float | None = Field(
        None, ge=0, le=50, description="Classifier-free guidance (default: the pipeline's)."
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Random seed; the response reports the one used."
    )


class _Sized(_Common):
    width: int | None = Field(
        None,
        ge=8,
        le=8192,
        description="Pixels, a multiple of the pipeline's `size_multiple` (8, 16 or 32). "
        "Default: `generation.<kind>.default_width`, else the pipeline's own.",
    )
    height: int | None = Field(
        None,
        ge=8,
        le=8192,
        description="Pixels, a multiple of the pipeline's `size_multiple`. Default: "
        "`generation.<kind>.default_height`, else the pipeline's own.",
    )
    round_to_valid: bool = Field(False, description=ROUND)


class ImageRequest(_Sized):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [{"prompt": "a lighthouse at dusk", "width": 512, "height": 512, "seed": 7}]
        },
    )
    num_images: int = Field(1, ge=1, le=64, description="Images to generate (maximum from config).")
    image: str | None = Field(
        None,
        max_length=64 * 1024 * 1024,
        description=f"Image-to-image pipelines: the input. {DATA_URL}.",
    )


class VideoRequest(_Sized):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "waves on a beach", "num_frames": 17, "fps": 8},
                {"prompt": "the boat sails away", "image": "data:image/png;base64,..."},
            ]
        },
    )
    num_frames: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Frames, by the pipeline's frame rule (`4k+1` for Wan and CogVideoX, "
        "`8k+1` for LTX; any for others). Default: the config's, else the pipeline's.",
    )
    fps: int | None = Field(
        None,
        ge=1,
        le=60,
        description="Frames per second of the file, also passed to pipelines that take a "
        "frame rate (LTX). Default: the pipeline's, else 8.",
    )
    format: Literal["mp4", "gif"] = Field("mp4", description="Container of the output.")
    image: str | None = Field(
        None,
        max_length=64 * 1024 * 1024,
        description=f"Image-to-video pipelines (required there): the first frame. {DATA_URL}.",
    )
    last_image: str | None = Field(
        None,
        max_length=64 * 1024 * 1024,
        description=f"Pipelines that take one (Wan image-to-video): the last frame. {DATA_URL}.",
    )


class MusicRequest(_Common):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "calm piano", "duration_s": 10},
                {"prompt": "upbeat pop", "lyrics": "[verse]\nhello sun", "duration_s": 20},
            ]
        },
    )
    duration_s: float | None = Field(
        None,
        gt=0,
        le=600,
        description="Seconds, passed to the pipeline (it generates that length). Default: "
        "`generation.music.default_duration_s`, else the pipeline's own (at most the maximum).",
    )
    lyrics: str | None = Field(
        None, max_length=20000, description="Pipelines that sing (ACE-Step): the lyrics."
    )


class Accepted(BaseModel):
    job_id: str
    status_url: str
    position: int | None = Field(description="Place in line: 0 running, 1 next, ...")
    eta_s: float | None = Field(description="Seconds until it is expected to finish.")


RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": Accepted, "description": "With `Prefer: respond-async`: the job was queued."},
    503: {"model": ErrorBody, "description": "insufficient_vram, queue_full, model_unavailable."},
}
PreferHeader = Annotated[
    str | None, Header(description="`respond-async` to get 202 and a job URL at once.")
]


async def submit_and_answer(
    request: Request, jobs: JobService, kind: str, params: GenerationParams, prefer: str | None
) -> JobView | JSONResponse:
    """Queue the job (checked first: 422 naming the field); answer 202 at once when asked
    to, else wait for it."""
    job = await jobs.submit(kind, params)
    if prefer and "respond-async" in prefer.lower():
        accepted = Accepted(
            job_id=job.id, status_url=f"/jobs/{job.id}", position=job.position, eta_s=job.eta_s
        )
        return JSONResponse(
            accepted.model_dump(),
            status_code=202,
            headers={"Location": f"/jobs/{job.id}"},
        )
    await _wait_or_cancel(request, jobs, job)
    if job.exc is not None:
        raise job.exc
    return job_view(job)


async def _wait_or_cancel(request: Request, jobs: JobService, job: Job) -> None:
    """Wait for the job; a client that goes away cancels it (and so frees the gate)."""
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    jobs.cancel(job.id, "client disconnected")
                    return

        tg.start_soon(watch)
        await job.done.wait()
        tg.cancel_scope.cancel()


def _params(req: _Common) -> GenerationParams:
    """The pipeline arguments: the request fields carry GenerationParams' own names
    (``format`` is ``video_format`` there)."""
    data = req.model_dump()
    if "format" in data:
        data["video_format"] = data.pop("format")
    data["prompt"] = data["prompt"] or ""
    return GenerationParams(**data)


def _route(kind: str, model: type[_Common], summary: str) -> None:
    async def endpoint(
        req: model,  # type: ignore[valid-type]
        request: Request,
        jobs: JobsDep,
        prefer: PreferHeader = None,
    ) -> JobView | JSONResponse:
        return await submit_and_answer(request, jobs, kind, _params(req), prefer)

    endpoint.__name__ = f"generate_{kind}"
    endpoint.__annotations__["req"] = model  # a type, not the string "model"
    router.add_api_route(
        f"/generate-{kind}",
        endpoint,
        methods=["POST"],
        response_model=JobView,
        responses=RESPONSES,
        summary=summary,
    )


_route("image", ImageRequest, "Text (or image) to image (PNG), behind the memory gate")
_route("video", VideoRequest, "Text or image to video (MP4, or GIF on request), behind the gate")
_route("music", MusicRequest, "Text (and lyrics) to audio (WAV), behind the memory gate")
