"""Every figure a service computes reaches its answer.

Services return dataclasses; routers translate them into response models. This walks
each response model against the dataclass its service returns, nested types included:
a public dataclass field (``repr=False`` marks the internal ones) without a place in the
response model fails here, and so does a response field that no service figure fills.
Every route with a response model must be listed, so a new endpoint cannot skip it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel

from app.main import create_app
from app.report import MemoryReport
from app.schemas import JobView, SystemMemory
from routers.chat import EdisonRouting
from routers.models import ModelsView, OpenAIModelList, TierInfo, UnloadResultOut
from routers.openai_images import ImagesResponse
from routers.swarm import SwarmResponse
from services.generation.jobs import Job, JobError, JobState
from services.llm.chat import ChatRouting
from services.llm.records import TierView, UnloadResult
from services.settings import Settings
from services.swarm.runner import SwarmResult

# (response model, what its service returns)
PAIRS: list[tuple[type[BaseModel], type]] = [
    (SystemMemory, MemoryReport),
    (TierInfo, TierView),
    (UnloadResultOut, UnloadResult),
    (JobView, Job),
    (JobView, JobState),  # what job events carry: the same fields, frozen
    (SwarmResponse, SwarmResult),
    (EdisonRouting, ChatRouting),
]
# Fields the API names differently, and fields flattened into their parent's shape.
RENAMED = {(Job, "id"): "job_id", (JobState, "id"): "job_id"}
FLATTENED = {(JobError, "details")}  # a job's error has the common error body's shape
# Response models assembled from several services or in a shape set by a standard; each
# with the reason it is not walked.
NOT_WALKED = {
    ModelsView: "heavy_slot and a list of TierInfo (walked above)",
    OpenAIModelList: "OpenAI's /v1/models shape: id, status and heavy of each TierView",
    ImagesResponse: "OpenAI's images shape: a url or the PNG of each of a Job's outputs",
}


def _public_fields(dc: type) -> dict[str, Any]:
    hints = typing.get_type_hints(dc)
    return {f.name: hints[f.name] for f in dataclasses.fields(dc) if f.repr}


def _properties(dc: type) -> set[str]:
    return {n for n in dir(dc) if isinstance(getattr(dc, n, None), property)}


def _inner(tp: Any, kind: type) -> type | None:
    """The dataclass (kind=object) or BaseModel inside Optional/list/tuple/dict annotations."""
    if isinstance(tp, type):
        if kind is BaseModel and issubclass(tp, BaseModel):
            return tp
        if kind is object and dataclasses.is_dataclass(tp):
            return tp
        return None
    if get_origin(tp) in (typing.Union, types.UnionType, list, tuple, dict):
        for arg in get_args(tp):
            found = _inner(arg, kind)
            if found is not None:
                return found
    return None


def walk(model: type[BaseModel], dc: type, seen: set[tuple[type, type]]) -> list[str]:
    """Problems between a response model and a dataclass, recursively."""
    if (model, dc) in seen:
        return []
    seen.add((model, dc))
    problems = []
    fields = _public_fields(dc)
    expected = {RENAMED.get((dc, n), n) for n in fields if (dc, n) not in FLATTENED}
    for name in sorted(expected - set(model.model_fields)):
        problems.append(f"{dc.__name__}.{name} is computed but {model.__name__} drops it")
    fillable = expected | _properties(dc)
    for name in sorted(set(model.model_fields) - fillable):
        problems.append(f"{model.__name__}.{name} has no figure in {dc.__name__}")
    for name, tp in fields.items():
        out = RENAMED.get((dc, name), name)
        if out not in model.model_fields:
            continue
        inner_dc = _inner(tp, object)
        inner_model = _inner(model.model_fields[out].annotation, BaseModel)
        if inner_dc is not None and inner_model is not None:
            problems += walk(inner_model, inner_dc, seen)
        elif inner_dc is not None and (dc, name) not in FLATTENED:
            problems.append(f"{dc.__name__}.{name} is a {inner_dc.__name__}, answered untyped")
    return problems


@pytest.mark.parametrize(("model", "dc"), PAIRS, ids=[m.__name__ for m, _ in PAIRS])
def test_response_model_keeps_every_figure(model: type[BaseModel], dc: type) -> None:
    assert walk(model, dc, set()) == []


def test_the_walk_catches_a_dropped_figure() -> None:
    """The walk itself can fail: a dataclass with a figure the model lacks, and back."""

    @dataclasses.dataclass
    class Figures:
        kept: int
        dropped: float
        internal: object = dataclasses.field(default=None, repr=False)

    class Out(BaseModel):
        kept: int
        invented: str

    assert walk(Out, Figures, set()) == [
        "Figures.dropped is computed but Out drops it",
        "Out.invented has no figure in Figures",
    ]


def test_every_route_with_a_response_model_is_walked() -> None:
    app = create_app(Settings())
    walked = {m for m, _ in PAIRS} | set(NOT_WALKED)
    exempt = {"Health", "Ready"}  # liveness and readiness: no service figures
    missing = [
        f"{route.path}: {route.response_model.__name__}"
        for route in app.routes
        if getattr(route, "response_model", None) is not None
        and route.response_model not in walked
        and route.response_model.__name__ not in exempt
    ]
    assert missing == []
