"""POST /v1/images/generations with the real openai SDK against a real uvicorn server on
the tiny image pipeline: the images, the errors in OpenAI's shape, the API key, and the
same queue (and 503) as /generate-image."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import anyio
import httpx
import openai
import pytest
from PIL import Image

from app.main import create_app
from tests.helpers import deep_merge, until, wait_until
from tests.integration.test_generation_api import post_then_leave

KEY = "images-key-7"


@pytest.fixture
def image_settings(make_settings, tiny_pipelines):
    def build(**extra):
        sections = {
            "server": {"api_key": KEY},
            "generation": {
                "image": {
                    "pipeline": str(tiny_pipelines["image"]),
                    "required_ram_mb": 64,
                    "default_steps": 2,
                    "max_images": 2,
                }
            },
            "queue": {"max_waiting": 16, "max_wait_s": 120},
        }
        return make_settings(**deep_merge(sections, extra))

    return build


def started(server):
    """The server once /ready says so (its start-up work done), as a client would wait."""
    wait_until(
        lambda: httpx.get(f"{server.url}/ready", timeout=30).status_code == 200,
        timeout=120,
        what="the server ready",
    )
    return server


def sdk(server, key: str = KEY) -> openai.OpenAI:
    # No retries: a 503 must reach the test as the server answered it.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def default_size(folder: Path) -> tuple[int, int]:
    """What the pipeline makes when no size is given, from its folder as diffusers reads
    it: the UNet's sample size times the VAE's scale factor."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return side, side


def test_sdk_makes_pngs_as_b64_json_and_as_urls(
    image_settings, live_server, tiny_pipelines, request
):
    server = started(live_server(create_app(image_settings())))
    client = sdk(server)
    request.addfinalizer(client.close)
    listed = {m.id: m for m in client.models.list().data}
    [image_id] = [i for i, m in listed.items() if getattr(m, "kind", None) == "image"]
    assert image_id == tiny_pipelines["image"].name and listed[image_id].heavy is True
    assert getattr(listed["auto"], "kind", None) == "chat"

    before = int(time.time())
    got = client.images.generate(
        model=image_id,
        prompt="a red cat",
        n=2,
        size="64x48",
        response_format="b64_json",
        quality="hd",  # accepted and ignored
        style="vivid",
        extra_body={"seed": 5},
    )
    assert before <= got.created <= time.time()
    assert len(got.data) == 2
    for item in got.data:
        assert item.url is None
        png = base64.b64decode(item.b64_json)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(png)).size == (64, 48)
    # It was a job of the JobService, through the gate, like /generate-image's.
    job = server.app.state.jobs.get(got.edison["job_id"])
    assert job.kind == "image" and job.status == "succeeded" and job.seed == 5
    assert (job.params.width, job.params.height, job.params.num_images) == (64, 48, 2)
    assert job.gate is not None and job.gate.ok
    assert got.size == "64x48" and got.output_format == "png"

    # The default response format is url; "auto" is the pipeline's own size.
    got = client.images.generate(model="auto", prompt="a blue dog", size="auto")
    [item] = got.data
    assert item.b64_json is None and item.url.startswith(f"{server.url}/outputs/")
    assert httpx.get(item.url, timeout=30).status_code == 401  # the key rules of /outputs
    png = httpx.get(item.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == default_size(tiny_pipelines["image"])


def test_refusals_in_openai_shape(image_settings, live_server, tiny_pipelines, request):
    settings = image_settings(generation={"image": {"max_pixels": 128 * 128}})
    server = started(live_server(create_app(settings)))
    client = sdk(server)
    request.addfinalizer(client.close)

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="65x64")
    err = bad.value
    assert (err.status_code, err.param, err.type) == (400, "size", "invalid_request_error")
    assert err.body["fields"][0]["nearest"][:2] == ["64x64", "72x64"]
    assert "64x64, 72x64" in err.body["message"]

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="65x63")  # both sides off the grid
    assert bad.value.body["fields"][0]["nearest"][0] == "64x64"
    assert all(
        int(w) % 8 == int(h) % 8 == 0
        for w, h in (size.split("x") for size in bad.value.body["fields"][0]["nearest"])
    )

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="256x256")  # above max_pixels
    assert bad.value.param == "size" and "max_pixels" in bad.value.body["message"]

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="large")
    assert bad.value.param == "size"

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="32x32", n=3)  # max_images is 2
    assert (bad.value.param, bad.value.code) == ("n", "invalid_request")
    assert "at most 2" in bad.value.body["message"]

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", extra_body={"colour": "red"})
    assert bad.value.param == "colour"  # unknown fields are refused

    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(prompt="x", model="dall-e-3")
    assert (missing.value.param, missing.value.code) == ("model", "model_not_found")
    assert repr(tiny_pipelines["image"].name) in missing.value.body["message"]

    # None of these became a job.
    assert server.app.state.jobs.jobs == {}


def test_the_api_key_is_required(image_settings, live_server):
    server = started(live_server(create_app(image_settings())))
    with sdk(server, "wrong-key") as client, pytest.raises(openai.AuthenticationError) as denied:
        client.images.generate(prompt="x", size="32x32")
    assert (denied.value.type, denied.value.code) == ("authentication_error", "unauthorized")
    # Without any key (the SDK always sends one):
    raw = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"}, timeout=30)
    assert raw.status_code == 401 and raw.headers["www-authenticate"] == "Bearer"
    assert set(raw.json()["error"]) >= {"message", "type", "param", "code"}
    assert server.app.state.jobs.jobs == {}


@pytest.mark.anyio
async def test_a_burst_shares_the_generate_image_queue(image_settings, live_server, step_gate):
    server = started(live_server(create_app(image_settings(queue={"max_waiting": 2}))))
    app = server.app
    auth = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=120) as http:
        # A /generate-image job runs, held at its first step.
        r = await http.post(
            "/generate-image",
            json={"prompt": "first", "width": 32, "height": 32, "steps": 2},
            headers={"Prefer": "respond-async"},
        )
        first = r.json()["job_id"]
        await until(lambda: step_gate.held == 1, timeout=60)

        client = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120
        )
        done: list[openai.types.ImagesResponse] = []
        refused: list[openai.APIStatusError] = []

        async def one(i: int) -> None:
            try:
                done.append(await client.images.generate(prompt=f"p{i}", size="32x32"))
            except openai.APIStatusError as exc:
                refused.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
            # Two wait in the line /generate-image's job runs in; three find it full.
            await until(lambda: len(refused) == 3 and app.state.gate.queue_length == 2)
            native = await http.post("/generate-image", json={"prompt": "x", "steps": 1})
            step_gate.release()
        await client.close()
    for exc in refused:
        assert exc.status_code == 503 and exc.code == "queue_full"
        assert exc.type == "server_error"
        assert int(exc.response.headers["retry-after"]) >= 1
    # /generate-image, asked while the line was full, answered the same.
    assert native.status_code == 503 and native.json()["error"]["code"] == "queue_full"
    assert len(done) == 2 and all(len(d.data) == 1 for d in done)
    assert step_gate.runs == 3 and step_gate.max_in_flight == 1
    assert app.state.jobs.get(first).status == "succeeded"


def test_a_client_that_leaves_cancels_its_job(image_settings, live_server, step_gate):
    """As /generate-image: a request that waits for the gate and whose client goes away is
    cancelled and leaves the line. (No key on this server: the raw request sends none.)"""
    server = started(live_server(create_app(image_settings(server={"api_key": None}))))
    app = server.app
    first = httpx.post(
        f"{server.url}/generate-image",
        json={"prompt": "first", "width": 32, "height": 32, "steps": 2},
        headers={"Prefer": "respond-async"},
        timeout=30,
    ).json()["job_id"]
    step_gate.wait_held()
    body = {"prompt": "left", "size": "32x32"}
    post_then_leave(
        server.port, "/v1/images/generations", body, lambda: app.state.gate.queue_length == 1
    )
    [left] = wait_until(
        lambda: [j for j in app.state.jobs.jobs.values() if j.status == "cancelled"],
        what="the queued job cancelled",
    )
    assert left.id != first and left.params.prompt == "left"
    assert left.error.message == "client disconnected"
    assert app.state.gate.queue_length == 0
    step_gate.release()
    wait_until(lambda: app.state.gate.describe().state == "idle", what="the gate idle")
    assert step_gate.runs == 1
