"""Cluster mode only: /system/cluster, and the cluster's view of /jobs/{id}, /outputs/{name}
and /ready. Included before the single-host routers, so these answer first; never
included without a ``cluster`` section.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from app.deps import SettingsDep
from app.errors import error_body
from app.schemas import ErrorBody, JobView, Ready, job_view
from app.streaming import ClosingStreamingResponse
from routers import health, system
from routers import jobs as single_host_jobs
from services.cluster.chat import ROUTED_HEADER, cluster_tiers, loaded_here, route_chat
from services.cluster.jobs import ClusterJob, ClusterJobs
from services.cluster.node import ClusterNode
from services.cluster.schema import queue_name
from services.cluster.store import DatabaseDown, QueueStats
from services.errors import NotFound

router = APIRouter()
public = APIRouter()


class RunInfo(BaseModel):
    node: str
    worker_id: int | None = None
    started_at: str | None = None


class RefusalInfo(BaseModel):
    node: str
    message: str


class ClusterJobView(JobView):
    node: str | None = Field(description="The node that runs the job or ran it last.")
    attempts: int = Field(
        description="Runs started, the one under way included (2 after a node died mid-job)."
    )
    submitted_by: str = Field(description="The node that accepted the request.")
    runs: list[RunInfo] = Field(description="Each run: the node and when it started.")
    refusals: list[RefusalInfo] = Field(
        description="Nodes that handed the job back because they can never hold it, and why."
    )


def _view(c: ClusterJob) -> ClusterJobView:
    return ClusterJobView(
        **job_view(c.job).model_dump(),
        node=c.node,
        attempts=c.attempts,
        submitted_by=c.submitted_by,
        runs=[
            RunInfo(**{k: r.get(k) for k in ("node", "worker_id", "started_at")}) for r in c.runs
        ],
        refusals=[RefusalInfo(node=r["node"], message=r["message"]) for r in c.refusals],
    )


def _node(request: Request) -> ClusterNode:
    return request.app.state.cluster


def _jobs(request: Request) -> ClusterJobs:
    return request.app.state.cluster.jobs


@router.get(
    "/jobs/{job_id}",
    response_model=ClusterJobView,
    tags=["jobs"],
    summary="A job's status, progress, node, attempts and outputs, from any node",
)
async def get_job(job_id: str, request: Request) -> ClusterJobView:
    jobs = _jobs(request)
    try:
        return _view(await jobs.view(job_id))
    except NotFound:
        return _local_view(jobs, job_id)


def _local_view(jobs: ClusterJobs, job_id: str) -> Any:
    return job_view(jobs.local.get(job_id))  # a warm-up or other local-only job


@router.delete(
    "/jobs/{job_id}",
    response_model=ClusterJobView,
    tags=["jobs"],
    summary="Cancel from any node: a queued job never starts, a running one stops at its "
    "next step on its node",
)
async def cancel_job(job_id: str, request: Request) -> ClusterJobView:
    return _view(await _jobs(request).cancel_async(job_id))


@router.get(
    "/outputs/{name}",
    tags=["jobs"],
    summary="A generated file: served here, or proxied from the node that wrote it",
    response_class=FileResponse,
)
async def get_output(name: str, request: Request, settings: SettingsDep) -> Any:
    try:
        return await single_host_jobs.get_output(name, settings)
    except NotFound:
        pass
    url = await _node(request).store.output_node(name)
    if url is None or url == _node(request).cfg.public_url:
        raise NotFound(f"No output named {name!r}")
    client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))
    upstream = await client.send(client.build_request("GET", f"{url}/outputs/{name}"), stream=True)
    if upstream.status_code != 200:
        await upstream.aclose()
        await client.aclose()
        raise NotFound(f"No output named {name!r} (its node answered {upstream.status_code})")

    async def close() -> None:
        await upstream.aclose()
        await client.aclose()

    return ClosingStreamingResponse(
        upstream.aiter_raw(),
        media_type=upstream.headers.get("content-type"),
        on_close=close,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics, with the cluster's queue depths and job attempts",
    response_class=PlainTextResponse,
    tags=["system"],
)
async def cluster_metrics(request: Request) -> PlainTextResponse:
    """The single-host metrics plus, per kind's queue, jobs queued and running on every
    node and the attempts the engine recorded (read from the database at each scrape)."""
    node, state = _node(request), request.app.state
    try:
        stats = {s.queue: s for s in await node.store.queue_stats()}
    except DatabaseDown:
        state.metrics.observe_cluster_down()
    else:
        for kind in sorted(node.cluster_kinds()):
            stats.setdefault(queue_name(kind), QueueStats(queue_name(kind), 0, 0, 0, 0))
        for s in stats.values():
            state.metrics.observe_cluster_queue(
                s.queue, queued=s.queued, running=s.running, attempts=s.attempts,
                retried=s.retried,
            )  # fmt: skip
    return await system.metrics(state.placement, state.models, state.gate, state.metrics)


class DeviceInfo(BaseModel):
    device: str
    capacity_mb: float
    usable_mb: float


class NodeInfo(BaseModel):
    name: str
    public_url: str
    alive: bool = Field(description="Its heartbeat is fresh, by the database's clock.")
    heartbeat_age_s: float | None = Field(description="Seconds since its last heartbeat.")
    kinds: list[str] = Field(description="Generation kinds it runs.")
    devices: list[DeviceInfo]
    tiers_loaded: list[str]
    running_jobs: int = 0


class QueueDepth(BaseModel):
    queue: str
    queued: int
    running: int
    attempts: int = Field(
        description="Attempts the engine recorded over the queue's jobs (runs, requeues, "
        "hand-backs)."
    )


class ClusterInfo(BaseModel):
    this_node: str
    database_ok: bool
    nodes: list[NodeInfo]
    queues: list[QueueDepth]


@router.get(
    "/system/cluster",
    response_model=ClusterInfo,
    tags=["system"],
    summary="The cluster's nodes (heartbeat, devices, loaded tiers) and queue depths",
)
async def system_cluster(request: Request) -> ClusterInfo:
    view = await _node(request).view()
    return ClusterInfo(
        this_node=view.this_node,
        database_ok=view.database_ok,
        nodes=[
            NodeInfo(
                name=n.name,
                public_url=n.public_url,
                alive=n.alive,
                heartbeat_age_s=None if n.heartbeat_age_s is None else round(n.heartbeat_age_s, 2),
                kinds=n.kinds,
                devices=[
                    DeviceInfo(**{k: d[k] for k in ("device", "capacity_mb", "usable_mb")})
                    for d in n.meta.get("devices", [])
                ],
                tiers_loaded=n.meta.get("tiers_loaded", []),
                running_jobs=n.meta.get("running_jobs", 0),
            )
            for n in view.nodes
        ],
        queues=[
            QueueDepth(queue=s.queue, queued=s.queued, running=s.running, attempts=s.attempts)
            for s in view.queues
        ],
    )


@public.get(
    "/ready",
    response_model=Ready,
    tags=["health"],
    summary="Readiness: start-up work is done and the cluster database is reachable",
    responses={503: {"model": ErrorBody, "description": "Not ready, or the database is lost."}},
)
async def ready(request: Request) -> Any:
    node = _node(request)
    if not node.db_ok:
        return JSONResponse(
            error_body(
                "cluster_database_unavailable",
                "The cluster database (cluster.database_url) is unreachable",
                detail="running jobs go on; results are written when it returns",
            ),
            status_code=503,
            headers={"Retry-After": str(max(1, round(node.cfg.heartbeat_s)))},
        )
    return await health.ready(request)


async def chat_elsewhere(request: Request, body: dict[str, Any]) -> Any:
    """The chat's answer from the node that holds its tier (streamed through as it comes),
    or None to answer here."""
    node = _node(request)
    if request.headers.get(ROUTED_HEADER):
        return None
    tier, models = str(body.get("model", "auto")), request.app.state.models
    if tier == "auto" or loaded_here(models, tier):
        return None
    # Read now, not the last heartbeat's copy: a tier loaded elsewhere a moment ago counts.
    route = route_chat(tier, models, await node.fresh_nodes(), node.name)
    if route is None:
        return None
    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0))
    headers = {ROUTED_HEADER: node.name}
    if auth := request.headers.get("authorization"):
        headers["authorization"] = auth
    upstream = await client.send(
        client.build_request(
            "POST", f"{route.url}/v1/chat/completions", json=body, headers=headers
        ),
        stream=True,
    )

    async def close() -> None:
        await upstream.aclose()
        await client.aclose()

    keep = {k: v for k, v in upstream.headers.items() if k.lower().startswith("x-edison-")}
    keep["X-Edison-Node"] = route.node
    return ClosingStreamingResponse(
        upstream.aiter_raw(),
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type"),
        headers=keep,
        on_close=close,
    )


async def cluster_models(request: Request, local: list[Any]) -> list[Any]:
    """/v1/models in cluster mode: this node's entries, each tier with the nodes that have
    it loaded (loaded somewhere counts as loaded: a chat goes there), then the tiers only
    other nodes configure."""
    from routers.models import OpenAIModel

    node = _node(request)
    nodes = await node.fresh_nodes()
    tiers = {t.tier: t for t in cluster_tiers(request.app.state.models, nodes, node.name)}
    out = []
    for m in local:
        t = tiers.pop(m.id, None)
        if t is not None:
            status = "loaded" if t.loaded_on else m.status
            m = m.model_copy(update={"status": status, "nodes": t.loaded_on})
        out.append(m)
    extra = [
        OpenAIModel(
            id=t.tier,
            status="loaded" if t.loaded_on else "unloaded",
            heavy=t.heavy,
            nodes=t.loaded_on,
        )
        for t in tiers.values()
    ]
    image = next((i for i, m in enumerate(out) if m.kind != "chat"), len(out))
    return out[:image] + extra + out[image:]  # chat tiers together, before the pipelines
