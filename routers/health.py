"""Liveness and readiness. Never behind the API key, never waiting on a lock."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.errors import error_body
from app.schemas import ErrorBody, Health, Ready

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Ready,
    summary="Readiness: start-up work (first probe, eager model loads) is done",
    responses={503: {"model": ErrorBody, "description": "Start-up work still under way."}},
)
async def ready(request: Request) -> Ready | JSONResponse:
    if request.app.state.ready.is_set():
        return Ready(ready=True, detail=request.app.state.startup_detail)
    return JSONResponse(
        error_body(
            "not_ready", "Start-up work is still under way", detail=request.app.state.startup_detail
        ),
        status_code=503,
        headers={"Retry-After": "1"},
    )
