"""POST /generate-image, /generate-video, /generate-music: gated diffusers pipelines.

Each request becomes a job. Without `Prefer: respond-async` the answer waits for the
job (a client that disconnects cancels it); with it, 202 and a status URL at once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.deps import JobsDep
from app.schemas import ErrorBody, JobView, job_view
from services.generation.jobs import Job, JobService
from services.generation.params import GenerationParams

router = APIRouter(tags=["generation"])


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1, max_length=4000, description="What to generate.")
    negative_prompt: str | None = Field(None, max_length=4000, description="What to avoid.")
    steps: int | None = Field(
        None, ge=1, le=1000, description="Denoising steps (default and maximum from config)."
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Random seed; the response reports the one used."
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


def _multiple_of_8(v: int | None) -> int | None:
    if v is not None and v % 8:
        raise ValueError("must be a multiple of 8")
    return v


class ImageRequest(_Common):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a lighthouse at dusk",
                    "width": 512,
                    "height": 512,
                    "steps": 20,
                    "seed": 7,
                }
            ]
        },
    )
    width: int = Field(512, ge=8, le=8192, description="Pixels, a multiple of 8.")
    height: int = Field(512, ge=8, le=8192, description="Pixels, a multiple of 8.")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Classifier-free guidance.")
    num_images: int = Field(1, ge=1, le=64, description="Images to generate (maximum from config).")

    _w = field_validator("width", "height")(classmethod(lambda cls, v: _multiple_of_8(v)))


class VideoRequest(_Common):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "waves on a beach",
                    "num_frames": 16,
                    "fps": 8,
                    "width": 256,
                    "height": 256,
                }
            ]
        },
    )
    num_frames: int = Field(16, ge=1, le=1024, description="Frames (maximum from config).")
    fps: int = Field(8, ge=1, le=60, description="Frames per second of the file.")
    width: int = Field(256, ge=8, le=4096, description="Pixels, a multiple of 8.")
    height: int = Field(256, ge=8, le=4096, description="Pixels, a multiple of 8.")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Classifier-free guidance.")
    format: Literal["mp4", "gif"] = Field("mp4", description="Container of the output.")

    _w = field_validator("width", "height")(classmethod(lambda cls, v: _multiple_of_8(v)))


class MusicRequest(_Common):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "calm piano", "duration_s": 10, "steps": 50}]},
    )
    duration_s: float = Field(10.0, gt=0, le=600, description="Seconds (maximum from config).")


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


async def _submit(
    request: Request, jobs: JobService, kind: str, params: GenerationParams, prefer: str | None
) -> JobView | JSONResponse:
    job = await jobs.submit(kind, params)  # checks limits and fit: 422 naming the field
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
    return GenerationParams(**data)


@router.post(
    "/generate-image",
    response_model=JobView,
    responses=RESPONSES,
    summary="Text to image (PNG), behind the memory gate",
)
async def generate_image(
    req: ImageRequest,
    request: Request,
    jobs: JobsDep,
    prefer: PreferHeader = None,
) -> JobView | JSONResponse:
    return await _submit(request, jobs, "image", _params(req), prefer)


@router.post(
    "/generate-video",
    response_model=JobView,
    responses=RESPONSES,
    summary="Text to video (MP4, or GIF on request), behind the memory gate",
)
async def generate_video(
    req: VideoRequest,
    request: Request,
    jobs: JobsDep,
    prefer: PreferHeader = None,
) -> JobView | JSONResponse:
    return await _submit(request, jobs, "video", _params(req), prefer)


@router.post(
    "/generate-music",
    response_model=JobView,
    responses=RESPONSES,
    summary="Text to audio (WAV at the pipeline's sample rate), behind the memory gate",
)
async def generate_music(
    req: MusicRequest,
    request: Request,
    jobs: JobsDep,
    prefer: PreferHeader = None,
) -> JobView | JSONResponse:
    return await _submit(request, jobs, "music", _params(req), prefer)
