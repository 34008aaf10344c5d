"""Generation endpoints on real tiny diffusers pipelines, on the CPU, through real HTTP."""

from __future__ import annotations

import io
import json
import socket
import wave
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import imageio.v3 as iio
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.helpers import cuda_oom_first, deep_merge, until, wait_ready, wait_until


@pytest.fixture
def gen_settings(make_settings, tiny_pipelines, tiny_dir):
    def build(**extra):
        sections = {
            "generation": {
                kind: {
                    "pipeline": str(tiny_pipelines[kind]),
                    "required_ram_mb": 64,
                    "default_steps": 2,
                }
                for kind in ("image", "video", "music")
            },
            "queue": {"max_waiting": 16, "max_wait_s": 120},
        }
        return make_settings(**deep_merge(sections, extra))

    return build


def test_image_png_at_the_asked_size(gen_settings, live_server) -> None:
    server = live_server(create_app(gen_settings()))
    r = httpx.post(
        f"{server.url}/generate-image",
        json={
            "prompt": "a red cat",
            "width": 64,
            "height": 48,
            "steps": 2,
            "seed": 5,
            "num_images": 2,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded" and body["seed"] == 5
    assert body["gate"]["ok"] is True
    assert set(body["timings_ms"]) >= {"queued", "load", "run", "total"}
    assert body["progress"] == {"done": 2, "total": 2}
    assert len(body["outputs"]) == 2
    for out in body["outputs"]:
        png = httpx.get(f"{server.url}{out['url']}", timeout=30)
        assert png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (64, 48)
        assert (out["width"], out["height"]) == (64, 48)
    assert body["params"]["prompt"] == "a red cat" and body["params"]["num_images"] == 2
    # The operator sees the pipeline that now holds memory, and what it holds.
    memory = httpx.get(f"{server.url}/system/memory", timeout=30).json()
    # Every configured pipeline is listed (video and music too, not loaded).
    assert {p["kind"]: p["loaded"] for p in memory["pipelines"]} == {
        "image": True,
        "video": False,
        "music": False,
    }
    [image] = [p for p in memory["pipelines"] if p["kind"] == "image"]
    host = server.app.state.pipelines.host_of("image")
    assert image["kind"] == "image" and image["loaded"] is True and image["running"] is False
    assert image["device"] == "cpu" and image["dtype"] == "float32" and image["placement"] == "full"
    assert image["weights_mb"] == host.weights_mb > 0 and image["loads"] == 1
    assert image["class_name"] == "StableDiffusionPipeline"
    assert memory["gate"]["last_decisions"][-1]["reason"].startswith("image: a red cat")


def test_video_mp4_frames_and_gif(gen_settings, live_server) -> None:
    server = live_server(create_app(gen_settings()))
    r = httpx.post(
        f"{server.url}/generate-video",
        json={"prompt": "waves", "num_frames": 6, "fps": 6, "width": 64, "height": 64, "steps": 1},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["media_type"] == "video/mp4"
    mp4 = httpx.get(f"{server.url}{out['url']}", timeout=30).content
    frames = iio.imread(mp4, extension=".mp4")
    assert len(frames) == 6
    gif = httpx.post(
        f"{server.url}/generate-video",
        json={
            "prompt": "waves",
            "num_frames": 4,
            "width": 32,
            "height": 32,
            "steps": 1,
            "format": "gif",
        },
        timeout=120,
    ).json()["outputs"][0]
    assert gif["media_type"] == "image/gif"
    img = Image.open(io.BytesIO(httpx.get(f"{server.url}{gif['url']}", timeout=30).content))
    assert img.n_frames == 4


def test_music_wav_duration_and_rate(gen_settings, live_server) -> None:
    server = live_server(create_app(gen_settings()))
    r = httpx.post(
        f"{server.url}/generate-music",
        json={"prompt": "calm piano", "duration_s": 3.0, "steps": 2},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    data = httpx.get(f"{server.url}{out['url']}", timeout=30).content
    with wave.open(io.BytesIO(data)) as w:
        assert w.getframerate() == out["sample_rate"] == 16000
        assert abs(w.getnframes() / w.getframerate() - 3.0) < 0.05


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/generate-image", {"prompt": "x", "width": 65, "height": 64}, "width"),
        ("/generate-image", {"prompt": "x", "width": 1024, "height": 1024}, "width"),
        ("/generate-image", {"prompt": "   "}, "prompt"),
        ("/generate-image", {"prompt": "x", "steps": 0}, "steps"),
        ("/generate-image", {"prompt": "x", "steps": 51}, "steps"),
        ("/generate-image", {"prompt": "x", "num_images": 5}, "num_images"),
        ("/generate-image", {"prompt": "x", "colour": "red"}, "colour"),
        ("/generate-video", {"prompt": "x", "num_frames": 49}, "num_frames"),
        ("/generate-video", {"prompt": "x", "format": "avi"}, "format"),
        ("/generate-music", {"prompt": "x", "duration_s": 48}, "duration_s"),
        ("/generate-music", {"prompt": "x", "duration_s": -1}, "duration_s"),
        ("/generate-music", {}, "prompt"),
    ],
)
def test_bad_requests_are_422_naming_the_field(gen_settings, path, body, field) -> None:
    settings = gen_settings(generation={"image": {"max_pixels": 512 * 512}})
    with TestClient(create_app(settings)) as client:
        r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert field in [f["field"] for f in err["fields"]]


def test_broken_pipeline_is_503_and_others_work(gen_settings, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    settings = gen_settings(generation={"video": {"pipeline": str(broken)}})
    with TestClient(create_app(settings)) as client:
        r = client.post(
            "/generate-video", json={"prompt": "x", "num_frames": 2, "width": 32, "height": 32}
        )
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_unavailable"
        assert "video" in r.json()["error"]["message"]
        assert r.headers["retry-after"]
        ok = client.post(
            "/generate-image", json={"prompt": "x", "width": 32, "height": 32, "steps": 1}
        )
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "name", ["..%2F..%2Fetc%2Fpasswd", "..", ".hidden", "a%2Fb", "%2Fetc%2Fpasswd"]
)
def test_outputs_never_serves_outside_the_folder(gen_settings, name, tmp_path) -> None:
    settings = gen_settings()
    (settings.server.outputs_dir.parent / "secret.txt").write_text("no")
    with TestClient(create_app(settings)) as client:
        r = client.get(f"/outputs/{name}")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
        assert client.get("/outputs/..%2Fsecret.txt").status_code == 404


def test_async_job_status_progress_and_cancel(gen_settings) -> None:
    with TestClient(create_app(gen_settings())) as client:
        wait_ready(client)
        r = client.post(
            "/generate-image",
            json={"prompt": "x", "width": 32, "height": 32, "steps": 2},
            headers={"Prefer": "respond-async"},
        )
        assert r.status_code == 202
        status_url = r.json()["status_url"]
        job = wait_until(
            lambda: (j := client.get(status_url).json())["status"] in ("succeeded", "failed") and j,
            what="the job finished",
        )
        assert job["status"] == "succeeded" and job["progress"] == {"done": 2, "total": 2}
        assert job["gate"]["ok"] is True and job["gate"]["actions"] == ["enough memory"]
        assert job["timings_ms"]["total"] >= job["timings_ms"]["run"] > 0
        assert client.get("/jobs/nope").status_code == 404


def test_cancel_a_running_job_at_its_next_step(gen_settings, step_gate) -> None:
    with TestClient(create_app(gen_settings())) as client:
        wait_ready(client)
        r = client.post(
            "/generate-image",
            json={"prompt": "x", "width": 32, "height": 32, "steps": 3},
            headers={"Prefer": "respond-async"},
        )
        job_id = r.json()["job_id"]
        step_gate.wait_held()  # the run is in flight, held at the end of step 1
        running = client.get(f"/jobs/{job_id}").json()
        assert running["status"] == "running" and running["progress"]["done"] == 1
        memory = client.get("/system/memory").json()
        assert memory["gate"]["state"] == "busy"
        assert memory["gate"]["current"]["kind"] == "image"
        assert [p["kind"] for p in memory["pipelines"] if p["running"]] == ["image"]
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
        job = wait_until(
            lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] != "running" and j,
            what="the job stopped",
        )
        assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
        assert job["progress"]["done"] == 1  # it stopped at the step it was held at
        assert client.app.state.gate.describe().state == "idle"


@pytest.mark.anyio
async def test_twenty_concurrent_requests_never_overlap(gen_settings, step_gate) -> None:
    settings = gen_settings(queue={"max_waiting": 8})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.ready.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300) as c:
            results: list[httpx.Response] = []

            async def one(i: int) -> None:
                kind = ("image", "music", "video")[i % 3]
                body = {
                    "image": {"prompt": f"p{i}", "width": 32, "height": 32, "steps": 1},
                    "music": {"prompt": f"p{i}", "duration_s": 1, "steps": 1},
                    "video": {
                        "prompt": f"p{i}",
                        "num_frames": 2,
                        "width": 32,
                        "height": 32,
                        "steps": 1,
                    },
                }[kind]
                results.append(await c.post(f"/generate-{kind}", json=body))

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)
                # The first run is held at its step: the other 19 arrive while it runs.
                await until(lambda: step_gate.held == 1 and len(results) >= 11)
                assert app.state.gate.queue_length == 8
                step_gate.release()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) == 9  # 1 running + 8 waiting
        assert codes.count(503) == 11
        for r in results:
            if r.status_code == 503:
                assert (
                    r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
                )
        assert step_gate.runs == 9 and step_gate.max_in_flight == 1
        # No task holds memory any more; each loaded pipeline holds what it measured.
        held = {e.owner: e.mb for e in app.state.ledger.entries()}
        hosts = app.state.pipelines.hosts
        assert held == {
            f"pipeline:{kind}": h.resident_mb for (kind, _), h in hosts.items() if h.loaded
        }


def post_then_leave(port: int, path: str, body: dict, when: Callable[[], bool]) -> None:
    """POST on a raw socket and close it, without reading the answer, once ``when`` holds."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + data)
        wait_until(when, what="the request in the state to leave it in")


def test_client_disconnect_while_queued_and_running_releases_the_gate(
    gen_settings, live_server, step_gate
) -> None:
    server = live_server(create_app(gen_settings()))
    app = server.app
    body = {"prompt": "x", "width": 32, "height": 32, "steps": 3}
    # A running job holds the gate (held at its first step); a second request waits.
    first = httpx.post(
        f"{server.url}/generate-image", json=body, headers={"Prefer": "respond-async"}, timeout=30
    ).json()["job_id"]
    step_gate.wait_held()
    post_then_leave(server.port, "/generate-image", body, lambda: app.state.gate.queue_length == 1)
    jobs = app.state.jobs.jobs
    queued = wait_until(
        lambda: [j for j in jobs.values() if j.id != first and j.status == "cancelled"],
        what="the queued job cancelled",
    )
    assert queued[0].error.message == "client disconnected"
    assert app.state.gate.queue_length == 0 and step_gate.runs == 1
    # Now a running one: end the first, then disconnect while the next is held mid-run.
    httpx.post(f"{server.url}/jobs/{first}/cancel", timeout=30)
    wait_until(lambda: app.state.gate.describe().state == "idle", what="the gate idle")
    post_then_leave(server.port, "/generate-image", body, lambda: step_gate.held == 1)
    last = list(jobs.values())[-1]
    wait_until(last.done.is_set, what="the disconnected job ended")
    assert last.status == "cancelled" and last.progress.done == 1
    assert app.state.gate.describe().state == "idle"
    assert [e for e in app.state.ledger.entries() if e.kind == "task"] == []


def test_oom_once_is_retried_with_savers_and_fast_comes_back(
    gen_settings, tiny_dir: Path, monkeypatch
) -> None:
    """torch.cuda.OutOfMemoryError cannot happen on this CPU machine: the pipeline's call
    raises it once, as a card would, and everything after it is real."""
    import diffusers

    settings = gen_settings(
        models={"fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256}, "n_threads": 1}
    )
    calls = cuda_oom_first(monkeypatch, diffusers.StableDiffusionPipeline)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        models = client.app.state.models
        first_pid = models.tiers["fast"].model.pid
        r = client.post(
            "/generate-image", json={"prompt": "x", "width": 32, "height": 32, "steps": 1}
        )
        assert r.status_code == 200, r.text
        assert calls["n"] == 2
        host = client.app.state.pipelines.host_of("image")
        assert host.describe().placement == "vae_tiling"  # the CPU ladder's next rung
        m = wait_until(
            lambda: (m := models.tiers["fast"].model) is not None and m.pid != first_pid and m,
            what="fast back in a new worker",
        )
        assert m.worker.alive


def test_system_memory_and_openapi_show_what_each_pipeline_can_do(gen_settings) -> None:
    with TestClient(create_app(gen_settings())) as client:
        wait_ready(client)
        pipes = {p["kind"]: p for p in client.get("/system/memory").json()["pipelines"]}
        image = pipes["image"]["caps"]
        assert image["class_name"] == "StableDiffusionPipeline"
        assert image["size_multiple"] == 8 and image["inputs"]["negative_prompt"]
        assert pipes["video"]["caps"]["max_frames"] == 32  # the motion module's positions
        assert pipes["music"]["caps"]["duration_param"] == "audio_end_in_s"
        doc = client.get("/openapi.json").json()
        text = doc["paths"]["/generate-video"]["post"]["description"]
        assert "Configured pipeline: AnimateDiffPipeline" in text and "multiples of 8" in text
