"""Jobs and their files: GET/DELETE /jobs/{id}, GET /outputs/{name}."""

from __future__ import annotations

import re

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.deps import JobsDep, SettingsDep
from app.schemas import JobView, job_view
from services.errors import NotFound

router = APIRouter(tags=["jobs"])
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
MEDIA = {".png": "image/png", ".mp4": "video/mp4", ".gif": "image/gif", ".wav": "audio/wav"}


@router.get(
    "/jobs/{job_id}", response_model=JobView, summary="A job's status, progress and outputs"
)
async def get_job(job_id: str, jobs: JobsDep) -> JobView:
    return job_view(jobs.get(job_id))


@router.delete(
    "/jobs/{job_id}",
    response_model=JobView,
    summary="Cancel a queued job, or a running one at its next step",
)
async def cancel_job(job_id: str, jobs: JobsDep) -> JobView:
    return job_view(jobs.cancel(job_id))


@router.get("/outputs/{name}", summary="A generated file", response_class=FileResponse)
async def get_output(name: str, settings: SettingsDep) -> FileResponse:
    root = settings.server.outputs_dir.resolve()
    if not SAFE_NAME.match(name) or ".." in name:
        raise NotFound(f"No output named {name!r}")
    path = (root / name).resolve()
    if path.parent != root or not path.is_file():
        raise NotFound(f"No output named {name!r}")
    return FileResponse(path, media_type=MEDIA.get(path.suffix, "application/octet-stream"))
