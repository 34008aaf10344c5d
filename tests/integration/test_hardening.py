"""Hostile and odd input at the HTTP edge, an OpenAPI that says what the server does, a
warm start, and a clean exit; real server, real processes, tiny models."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import app.main as app_main
from app.main import create_app
from tests.helpers import free_port, wait_ready, wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_a_huge_body_is_refused_before_it_is_read(make_settings, live_server) -> None:
    server = live_server(create_app(make_settings(server={"max_body_mb": 1})))
    big = b'{"prompt": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    r = httpx.post(f"{server.url}/generate-image", content=big, timeout=60)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert "server.max_body_mb" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * (64 * 1024)

    r = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    ok = httpx.post(f"{server.url}/swarm", json={"prompt": "x", "agents": []}, timeout=30)
    assert ok.status_code == 422  # a small body still reaches validation


def test_the_key_is_checked_before_the_body_is_parsed(make_settings) -> None:
    app = create_app(make_settings(server={"api_key": "a-long-enough-key"}))
    with TestClient(app) as client:
        broken = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        r = client.post("/generate-image", **broken)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        auth = {"Authorization": "Bearer a-long-enough-key"}
        r = client.post(
            "/generate-image", content=b"{not json", headers={**auth, **broken["headers"]}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        assert client.get("/health").status_code == 200  # public
        assert client.get("/ui").status_code == 200  # public: it asks for the key itself
        assert client.get("/system/memory").status_code == 401
        assert client.get("/system/memory", headers=auth).status_code == 200


def test_options_lists_every_method_of_a_path(make_settings) -> None:
    with TestClient(create_app(make_settings())) as client:
        cases = {
            "/v1/chat/completions": "OPTIONS, POST",
            "/jobs/abc": "DELETE, GET, OPTIONS",
            "/models/fast/load": "OPTIONS, POST",
            "/system/memory": "GET, OPTIONS",
        }
        for path, allow in cases.items():
            r = client.options(path)
            assert r.status_code == 204 and r.headers["allow"] == allow, (path, r.headers)
        assert client.options("/no/such/path").status_code == 404


def test_strict_types_and_the_configured_limits_in_the_schema(make_settings, tiny_dir) -> None:
    settings = make_settings(
        models={"fast": {"path": str(tiny_dir / "fast.gguf"), "preload": False}},
        generation={"image": {"max_steps": 12, "default_steps": 10, "max_images": 2}},
        swarm={"max_agents": 3},
    )
    app = create_app(settings)
    with TestClient(app) as client:
        doc = client.get("/openapi.json").json()
        image = doc["components"]["schemas"]["ImageRequest"]["properties"]
        steps = next(b for b in image["steps"]["anyOf"] if b.get("type") == "integer")
        assert steps["maximum"] == 12 and image["num_images"]["maximum"] == 2
        assert doc["components"]["schemas"]["SwarmRequest"]["properties"]["agents"]["maxItems"] == 3
        agent = doc["components"]["schemas"]["SwarmAgent"]["properties"]["model"]
        assert agent["enum"] == ["fast"]
        # What the schema states is what the server refuses, naming the field.
        r = client.post("/generate-image", json={"prompt": "x", "steps": 13})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "steps"
        r = client.post("/generate-image", json={"prompt": "x", "width": "64"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "width"
        # Every operation documents its errors with the common body.
        for path, item in doc["paths"].items():
            for method, op in item.items():
                for status, resp in op["responses"].items():
                    if status.startswith(("4", "5")):
                        content = resp.get("content", {}).get("application/json", {})
                        ref = content.get("schema", {}).get("$ref", "")
                        assert ref.endswith("/ErrorBody"), (path, method, status, resp)
        assert "404" in doc["paths"]["/jobs/{job_id}"]["get"]["responses"]
        assert "413" in doc["paths"]["/generate-image"]["post"]["responses"]
        assert "503" not in doc["paths"]["/health"]["get"]["responses"]
        assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
        assert {"application/json", "text/event-stream"} <= set(chat["200"]["content"])
        assert {"400", "401", "404", "413", "422", "502", "503"} <= set(chat)


def test_ready_waits_for_the_generation_stack_and_health_answers_meanwhile(
    make_settings, tiny_pipelines, monkeypatch
) -> None:
    """A generation stack whose import is slow (a stand-in that waits on an event, then
    imports for real): /ready says 503 until it is done, /health answers throughout."""
    gate = threading.Event()
    real = app_main.import_generation_stack

    def slow_import() -> None:
        gate.wait(30)
        real()

    monkeypatch.setattr(app_main, "import_generation_stack", slow_import)
    settings = make_settings(
        generation={
            "image": {
                "pipeline": str(tiny_pipelines["image"]),
                "required_ram_mb": 64,
                "preload": True,
            }
        }
    )
    with TestClient(create_app(settings)) as client:
        # Start-up probes memory first (a thread; slow on a busy machine), then imports.
        wait_until(
            lambda: "importing" in client.get("/ready").json()["error"]["detail"],
            what="start-up reached the imports",
        )
        for _ in range(5):
            assert client.get("/health").status_code == 200
            r = client.get("/ready")
            assert r.status_code == 503 and "importing" in r.json()["error"]["detail"]
        gate.set()
        wait_ready(client)
        assert "image warmed in" in client.get("/ready").json()["detail"]
        host = client.app.state.pipelines.host_of("image")
        assert host.loaded and host.loads == 1
        assert not any(settings.server.outputs_dir.glob("*"))  # the warm-up wrote nothing
        r = client.post("/generate-image", json={"prompt": "x", "width": 32, "height": 32})
        timings = r.json()["timings_ms"]
        assert r.status_code == 200 and timings["load"] == 0
        # The warm-up took the first run's kernel loading and start-up the imports.
        assert timings["warmup"] is None and timings["imports"] is None


def test_edison_serve_ends_event_streams_and_exits_0_after_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "edison.yaml"
    port = free_port()
    config.write_text(
        json.dumps(
            {
                "server": {"port": port, "outputs_dir": str(tmp_path / "out")},
                "memory": {"state_dir": str(tmp_path / "state")},
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "EDISON_CONFIG": ""},
    )
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/health"), timeout=60, what="serving")
        # An operator page left open: its event stream must end, or uvicorn would wait
        # for it until its 30 s graceful timeout.
        subscribed, ended = threading.Event(), threading.Event()

        def follow() -> None:
            with httpx.stream("GET", f"http://127.0.0.1:{port}/events", timeout=60) as r:
                for _ in r.iter_raw():
                    subscribed.set()  # the opening comment came: the stream is open
            ended.set()

        threading.Thread(target=follow, daemon=True).start()
        assert subscribed.wait(30)
        proc.send_signal(signal.SIGTERM)
        assert ended.wait(25), "the event stream was not ended by the shutdown"
        assert proc.wait(60) == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        time.sleep(0.05)
        return False


def test_retry_after_on_a_full_queue_follows_the_measured_runs(
    make_settings, tiny_pipelines, step_gate
) -> None:
    """Two tiny image runs teach the duration model; a full queue's Retry-After is then
    the predicted time for the work ahead, not a running mean seeded at 10 s a task."""
    settings = make_settings(
        generation={"image": {"pipeline": str(tiny_pipelines["image"]), "required_ram_mb": 64}},
        queue={"max_waiting": 1},
    )
    body = {"prompt": "x", "width": 32, "height": 32, "steps": 2}
    prefer = {"Prefer": "respond-async"}
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        step_gate.release()
        for _ in range(2):
            assert client.post("/generate-image", json=body).status_code == 200
        step_gate._open.clear()  # hold the next run at its first step
        running = client.post("/generate-image", json=body, headers=prefer).json()["job_id"]
        step_gate.wait_held()
        client.post("/generate-image", json=body, headers=prefer)  # waits: the queue is full
        r = client.post("/generate-image", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        predicted = client.app.state.jobs.queue_drain_s()
        # The prediction grows with the held job's running time: one second of slack.
        assert abs(int(r.headers["retry-after"]) - max(1, int(-(-predicted // 1)))) <= 1
        # The waiting job's share is its kind's measured run time, not the 10 s seed.
        waiting = client.app.state.jobs.durations.predict("image", 4 * 16 * 16)
        assert waiting is not None and waiting < client.app.state.gate.mean_task_s
        step_gate.release()
        wait_until(
            lambda: client.get(f"/jobs/{running}").json()["status"] == "succeeded",
            what="the held job done",
        )


def test_system_memory_says_a_probe_step_is_backed_off_and_why(
    make_settings, tmp_path: Path, monkeypatch
) -> None:
    """A failing nvidia-smi (a stand-in program: no GPU here) is skipped by later snapshots
    and /system/memory says so; NVML and torch.cuda fail for good on this machine."""
    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    backoff = {"probe_backoff_s": 600, "probe_backoff_max_s": 600}
    with TestClient(create_app(make_settings(memory=backoff))) as client:
        wait_ready(client)
        steps = client.get("/system/memory").json()["probe"]["steps"]
    if steps["nvml"]["ok"] or steps["torch"]["ok"]:
        pytest.skip("this machine has a GPU")
    smi_step = steps["nvidia-smi"]
    assert smi_step["backed_off"] is True and smi_step["failures"] >= 1
    assert "status 9" in smi_step["last_reason"]
    assert smi_step["backed_off_until"] > time.time() + 60
    assert steps["nvml"]["permanent"] is True


def test_a_20_mb_chat_never_reaches_the_worker(make_settings, tiny_dir, live_server) -> None:
    server = live_server(
        create_app(
            make_settings(models={"fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256}})
        )
    )
    wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=60)
    worker = server.app.state.models.tiers["fast"].model
    from services.memory.probe import rss_mb

    before = rss_mb(worker.pid)
    body = {"model": "fast", "messages": [{"role": "user", "content": "x" * (20 * 2**20)}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert abs(rss_mb(worker.pid) - before) < 5  # the worker saw nothing


def test_an_oom_that_persists_answers_503_with_the_memory_measured_after(
    make_settings, tiny_pipelines, monkeypatch
) -> None:
    """torch.cuda.OutOfMemoryError cannot happen on this CPU: the pipeline raises it on
    every call, as a card too small would; the retry and the answer are real."""
    import diffusers
    import torch

    # functools.wraps: the signature stays the pipeline's, which its capabilities read.
    @functools.wraps(diffusers.StableDiffusionPipeline.__call__)
    def always_oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "__call__", always_oom)
    settings = make_settings(
        generation={"image": {"pipeline": str(tiny_pipelines["image"]), "required_ram_mb": 64}}
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = client.post("/generate-image", json={"prompt": "x", "width": 32, "height": 32})
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        err = r.json()["error"]
        assert err["code"] == "insufficient_ram"  # the CPU's figure: RAM
        assert isinstance(err["free_vram_mb"], float) and err["free_vram_mb"] > 0


def test_library_progress_bars_and_warnings_stay_out_of_the_output(
    make_settings, tiny_pipelines, capfd
) -> None:
    settings = make_settings(
        server={"log_level": "info"},
        generation={"music": {"pipeline": str(tiny_pipelines["music"]), "required_ram_mb": 64}},
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        capfd.readouterr()
        r = client.post("/generate-music", json={"prompt": "x", "duration_s": 0.5, "steps": 1})
        assert r.status_code == 200, r.text
    out, err = capfd.readouterr()
    for noise in ("Loading pipeline components", "it/s]", "FutureWarning", "weight_norm"):
        assert noise not in out + err, noise


def test_a_job_that_pays_the_first_run_says_so(make_settings, tiny_pipelines) -> None:
    settings = make_settings(
        generation={"image": {"pipeline": str(tiny_pipelines["image"]), "required_ram_mb": 64}}
    )
    body = {"prompt": "x", "width": 32, "height": 32, "steps": 1}
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        first = client.post("/generate-image", json=body).json()["timings_ms"]
        second = client.post("/generate-image", json=body).json()["timings_ms"]
    assert first["load"] > 0 and first["warmup"] == first["run"]
    assert second["load"] == 0 and second["warmup"] is None
    assert first["imports"] is None  # start-up imported the stack before /ready
