"""OpenAPI-driven fuzzing: bodies generated from Edison's own schema (hypothesis-jsonschema)
against a real app with tiny workers and pipelines. Any 5xx fails, and so does an answer
that does not match the schema documented for its status.

Bounded: a fixed number of examples per operation, with the config's limits small so
that every generation the schema allows runs in a fraction of a second.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft202012Validator

from app.main import create_app
from tests.helpers import wait_ready

EXAMPLES = 12


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory, tiny_dir, tiny_pipelines):
    from services.settings import Settings

    root = tmp_path_factory.mktemp("fuzz")
    small = {"required_ram_mb": 64, "max_steps": 2, "default_steps": 1, "keep_alive_s": 600}
    app = create_app(
        Settings(
            server={"outputs_dir": str(root / "out"), "log_level": "warning"},
            memory={"reserve_ram_mb": 0, "state_dir": str(root / "state")},
            models={"fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256}, "n_threads": 1},
            generation={
                "image": {"pipeline": str(tiny_pipelines["image"]), "max_pixels": 4096, **small},
                "video": {
                    "pipeline": str(tiny_pipelines["video"]),
                    "max_pixels": 4096,
                    "max_frames": 2,
                    **small,
                },
                "music": {
                    "pipeline": str(tiny_pipelines["music"]),
                    "max_duration_s": 1,
                    **small,
                },
            },
            swarm={"max_agents": 2},
        )
    )
    with TestClient(app) as client:
        wait_ready(client)
        yield client


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                out.append((method, path, body["schema"]))
    return out


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator({**schema, "components": doc["components"]})


FUZZED = [
    "/generate-image",
    "/generate-video",
    "/generate-music",
    "/swarm",
    "/v1/chat/completions",
    "/v1/images/generations",
]


@pytest.mark.parametrize("path", FUZZED)
def test_no_5xx_and_answers_match_the_schema(fuzz_client, path: str) -> None:
    doc = fuzz_client.get("/openapi.json").json()
    (method, _, schema), *_ = [o for o in operations(doc) if o[1] == path]
    responses = doc["paths"][path][method]["responses"]
    body_schema = {**schema, "components": doc["components"]}
    seen: list[int] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.one_of(from_schema(body_schema), st.just({})))
    def check(body: Any) -> None:
        if isinstance(body, dict):
            body.pop("components", None)
            body.pop("stream", None)  # streamed answers are checked in the chat tests
        r = fuzz_client.request(method.upper(), path, json=body)
        seen.append(r.status_code)
        assert r.status_code < 500, (body, r.status_code, r.text[:500])
        documented = responses.get(str(r.status_code))
        assert documented is not None, (r.status_code, sorted(responses), body)
        content = documented.get("content", {}).get("application/json")
        if content and content.get("schema"):
            errors = sorted(
                validator(doc, content["schema"]).iter_errors(r.json()), key=lambda e: e.path
            )
            assert not errors, (json.dumps(body)[:300], r.status_code, errors[0].message)

    check()
    assert seen  # it really sent requests
