"""Jobs and their files: GET /jobs/{id}, POST /jobs/{id}/cancel, DELETE /jobs/{id},
GET /outputs/{name}."""

from __future__ import annotations

import re

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from app.deps import JobsDep, SettingsDep
from app.schemas import JobView, error_responses, job_view
from services.errors import NotFound

router = APIRouter(tags=["jobs"])
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
MEDIA = {".png": "image/png", ".mp4": "video/mp4", ".gif": "image/gif", ".wav": "audio/wav"}


@router.get(
    "/jobs/{job_id}", response_model=JobView, summary="A job's status, progress and outputs"
)
async def get_job(job_id: str, jobs: JobsDep) -> JobView:
    return job_view(jobs.get(job_id))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobView,
    summary="Cancel a queued job, or a running one at its next step",
    description="Answers the job: `cancelled` at once when it was queued; a running one "
    "stops at its next step (poll `GET /jobs/{id}`). A finished job is answered as it is. "
    "The job stays listed until `DELETE /jobs/{id}` or retention forgets it.",
)
async def cancel_job(job_id: str, jobs: JobsDep) -> JobView:
    return job_view(jobs.cancel(job_id))


@router.delete(
    "/jobs/{job_id}",
    status_code=204,
    response_class=Response,
    summary="Forget a finished job and delete its files",
    description="Only a finished job (succeeded, failed or cancelled): one still queued or "
    "running answers 409 `job_not_finished` (cancel it first with "
    "`POST /jobs/{id}/cancel`). Afterwards `GET /jobs/{id}` and its output URLs answer 404.",
    responses=error_responses(409),
)
async def delete_job(job_id: str, jobs: JobsDep) -> Response:
    await jobs.remove(job_id)
    return Response(status_code=204)


@router.get("/outputs/{name}", summary="A generated file", response_class=FileResponse)
async def get_output(name: str, settings: SettingsDep) -> FileResponse:
    root = settings.server.outputs_dir.resolve()
    if not SAFE_NAME.match(name) or ".." in name:
        raise NotFound(f"No output named {name!r}")
    path = (root / name).resolve()
    if path.parent != root or not path.is_file():
        raise NotFound(f"No output named {name!r}")
    return FileResponse(path, media_type=MEDIA.get(path.suffix, "application/octet-stream"))
