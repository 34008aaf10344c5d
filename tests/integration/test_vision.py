"""The vision tier end to end: the tiny vision pair in a real llama.cpp worker on the CPU."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient
from gguf import GGUFReader

from app.main import create_app
from services.demo.assets import DEMO_PROJECTOR, DEMO_TIERS, make_demo_assets, write_vision_pair
from services.demo.tiny_mmproj import TinyVisionShape, write_tiny_mmproj
from services.settings import KINDS, load_settings
from tests.helpers import wait_ready
from tests.images import data_url, image_bytes, image_message

ROOT = Path(__file__).resolve().parents[2]
PNG = data_url(image_bytes(40, 30, "PNG"))
JPEG = data_url(image_bytes(24, 48, "JPEG"), "image/jpeg")


@pytest.fixture(scope="module")
def vision_pair(tmp_path_factory) -> tuple[Path, Path]:
    model, projector = write_vision_pair(tmp_path_factory.mktemp("vision"))
    return model, projector


@pytest.fixture
def vision_settings(make_settings, tiny_dir, vision_pair):
    def build(**vision):
        model, projector = vision_pair
        return make_settings(
            models={
                "fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256},
                "medium": {"path": str(tiny_dir / "medium.gguf"), "n_ctx": 256, "preload": False},
                "vision": {
                    "path": str(model),
                    "clip_path": str(projector),
                    "chat_format": "mtmd",
                    "image_tokens": DEMO_PROJECTOR.n_patches,
                    "n_ctx": 256,
                    **vision,
                },
                "n_threads": 1,
            }
        )

    return build


def test_make_demo_writes_the_vision_pair_the_demo_config_names(tmp_path) -> None:
    # Everything else already there (make-demo writes only what is missing).
    for tier in DEMO_TIERS:
        (tmp_path / f"{tier}.gguf").write_bytes(b"present")
    for kind in KINDS:
        (tmp_path / "pipelines" / kind).mkdir(parents=True)
        (tmp_path / "pipelines" / kind / "model_index.json").write_text("{}")
    made = make_demo_assets(tmp_path)
    assert [p.name for p in made] == ["vision.gguf", "vision-mmproj.gguf"]
    model, projector = made
    assert projector.stat().st_size < 1024 * 1024  # a few hundred KB at most

    text, vision = GGUFReader(model), GGUFReader(projector)
    n_embd = text.fields["llama.embedding_length"].contents()
    assert vision.fields["clip.projector_type"].contents() == "mlp"
    assert vision.fields["clip.vision.projection_dim"].contents() == n_embd
    mm2 = next(t for t in vision.tensors if t.name == "mm.2.weight")
    assert int(mm2.shape[1]) == n_embd  # ggml ne[1]: the projector's output size

    demo = load_settings(ROOT / "config" / "demo.yaml", check_paths=False).models.vision
    assert demo is not None and demo.preload is False
    assert (demo.path.name, demo.clip_path.name) == (model.name, projector.name)
    assert demo.image_tokens == DEMO_PROJECTOR.n_patches
    assert make_demo_assets(tmp_path) == []


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def chat(client: TestClient, messages: list, model: str = "auto", **extra):
    body = {"model": model, "messages": messages, "max_tokens": 4, "seed": 1, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_image_chat_loads_vision_in_place_of_the_heavy_model(vision_settings) -> None:
    # llama-cpp-python: the projector's load is read from its clip log (llama-server's
    # vision pair: test_llama_server_vision.py).
    app = create_app(vision_settings(backend="llama-cpp-python"))
    with TestClient(app) as client:
        wait_ready(client)
        medium = client.post("/models/medium/load").json()["loaded"]
        assert client.get("/models").json()["heavy_slot"] == "medium"

        r = chat(client, [image_message(PNG)])
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["edison"]["tier"] == "vision" and r.headers["x-edison-tier"] == "vision"
        assert out["edison"]["route"] == "images present"
        assert out["edison"].get("fallback_reason") is None
        assert isinstance(out["choices"][0]["message"]["content"], str)

        view = client.get("/models").json()
        assert view["heavy_slot"] == "vision"
        assert gone(medium["pid"]), "the medium worker outlived its eviction"
        loaded = {m["key"] for m in client.get("/system/memory").json()["loaded_models"]}
        assert loaded == {"fast", "vision"}

        # The projector really ran: its load is in the worker's log, and the image took
        # its patches' worth of tokens (the same text without the image takes fewer).
        worker = app.state.models.tiers["vision"].model.worker
        log = worker.stderr_tail(200)
        assert "load_hparams: projector:          mlp" in log
        assert f"image_tokens->nx = {DEMO_PROJECTOR.n_patches}" in log
        text_only = chat(client, [{"role": "user", "content": "what is this?"}], model="vision")
        assert text_only.status_code == 200 and text_only.json()["edison"]["tier"] == "vision"
        # mtmd tokenizes the text after the image apart, which may add a token or two
        # (the tokenizer's leading space); without the projector the gap would be ~0.
        gap = out["usage"]["prompt_tokens"] - text_only.json()["usage"]["prompt_tokens"]
        assert DEMO_PROJECTOR.n_patches <= gap <= DEMO_PROJECTOR.n_patches + 2

        # A JPEG, streamed, to the vision tier by name: the same worker answers.
        pid = worker.pid
        body = {"stream": True, "messages": [image_message(JPEG)]}
        with client.stream("POST", "/v1/chat/completions", json={**body, "model": "vision"}) as s:
            assert s.status_code == 200 and s.headers["x-edison-tier"] == "vision"
            assert any(line.startswith("data: ") for line in s.iter_lines())
        assert app.state.models.tiers["vision"].model.worker.pid == pid


def test_text_chat_to_auto_never_loads_vision(vision_settings) -> None:
    app = create_app(vision_settings())
    with TestClient(app) as client:
        wait_ready(client)
        r = chat(client, [{"role": "user", "content": "describe the image"}])
        assert r.status_code == 200, r.text
        assert r.json()["edison"]["tier"] == "fast" and r.headers["x-edison-tier"] == "fast"
        vision = app.state.models.tiers["vision"]
        assert vision.loads == 0 and vision.attempts == []
        assert client.get("/models").json()["heavy_slot"] is None


BAD_IMAGES = [
    ("data:image/png;base64,iVBORw0KGgo%%%", "base64 is corrupt"),
    (data_url(b"just some text, not a picture"), "not a PNG or JPEG"),
    (data_url(image_bytes(8, 8, "GIF"), "image/gif"), "not a PNG or JPEG"),
    (data_url(image_bytes(80, 80, noise=True)), "max_image_mb"),  # about 19 KB
    (data_url(image_bytes(200, 200)), "max_image_pixels"),  # small file, 40000 pixels
    (data_url(image_bytes(40, 30)[:60]), "damaged"),  # a PNG cut short
    ("data:image/png,rawbytes", "base64 data URL"),
    ("https://example.com/cat.png", "allow_remote_images"),
    ("file:///etc/passwd", "must be a data URL"),
]


def test_bad_images_are_422_naming_the_part(vision_settings) -> None:
    app = create_app(vision_settings(max_image_mb=0.01, max_image_pixels=10_000))
    with TestClient(app) as client:
        wait_ready(client)
        for url, why in BAD_IMAGES:
            messages = [{"role": "user", "content": "first"}, image_message(url)]
            r = chat(client, messages)
            assert r.status_code == 422, (url[:40], r.text)
            (problem,) = r.json()["error"]["fields"]
            assert problem["field"] == "messages.1.content.1.image_url", url[:40]
            assert why in problem["message"], (url[:40], problem)
        assert client.get("/health").status_code == 200
        # Nothing was loaded for them, and a good image is still answered.
        assert app.state.models.tiers["vision"].attempts == []
        r = chat(client, [image_message(PNG)])
        assert r.status_code == 200 and r.json()["edison"]["tier"] == "vision", r.text


def test_swarm_with_an_image_runs_vision_agents_on_vision(vision_settings) -> None:
    app = create_app(vision_settings())
    with TestClient(app) as client:
        wait_ready(client)
        agents = [{"name": "f", "model": "fast"}, {"name": "v", "model": "vision"}]
        body = {"prompt": "Colour?", "agents": agents, "max_tokens": 4}
        r = client.post("/swarm", json=body)
        assert r.status_code == 200, r.text
        assert [x["tier"] for x in r.json()["responses"]] == ["fast", "medium"]
        assert app.state.models.tiers["vision"].attempts == []

        r = client.post("/swarm", json={**body, "images": [PNG]})
        assert r.status_code == 200, r.text
        f, v = r.json()["responses"]
        assert f["tier"] == "fast" and v["tier"] == "vision" and v.get("fallback_reason") is None
        assert app.state.models.tiers["vision"].loads == 1

        # A vision keyword without an image: the vision agent is on vision too.
        r = client.post("/swarm", json={**body, "prompt": "What is in the picture?"})
        assert r.status_code == 200, r.text
        assert [x["tier"] for x in r.json()["responses"]] == ["fast", "vision"]

        r = client.post("/swarm", json={**body, "images": [PNG, "data:image/png;base64,@@"]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["fields"][0]["field"] == "images.1"


def test_a_projector_that_does_not_fit_its_model_fails_the_load_not_the_service(
    vision_settings, tmp_path
) -> None:
    # Out of 32, for a language model of 64: mtmd would refuse it at the first image only
    # (llama-cpp-python loads the projector lazily; see docs/vision-projector.md). Edison
    # reads both headers first: no worker starts, and the image chat falls back.
    wrong = write_tiny_mmproj(tmp_path / "wrong.gguf", TinyVisionShape(n_embd_text=32))
    app = create_app(vision_settings(clip_path=str(wrong)))
    with TestClient(app) as client:
        wait_ready(client)
        r = chat(client, [image_message(PNG)])
        assert r.status_code == 200, r.text
        edison = r.json()["edison"]
        assert edison["tier"] != "vision"
        assert "32-wide embeddings" in edison["fallback_reason"]
        assert "64-wide" in edison["fallback_reason"]
        vision = client.get("/models").json()
        tier = next(t for t in vision["tiers"] if t["tier"] == "vision")
        assert tier["status"] == "failed" and [a["ok"] for a in tier["attempts"]] == [False]
        assert client.get("/health").status_code == 200
        r = chat(client, [{"role": "user", "content": "hi"}])
        assert r.status_code == 200 and r.json()["edison"]["tier"] == "fast"
