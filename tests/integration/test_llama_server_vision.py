"""The vision tier on the llama-server backend: the projector is its --mmproj, and an
image reaches the model through llama-server's own multimodal path."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app
from services.demo.assets import DEMO_PROJECTOR, write_vision_pair
from tests.helpers import wait_ready
from tests.images import data_url, image_bytes, image_message


def test_an_image_chat_on_a_llama_server_vision_tier(
    make_settings, tiny_dir, tmp_path, llama_server_bin
) -> None:
    model, projector = write_vision_pair(tmp_path)
    settings = make_settings(
        models={
            "backend": "llama-server",
            "fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256},
            "vision": {
                "path": str(model),
                "clip_path": str(projector),
                "chat_format": "mtmd",  # llama_cpp.server's handler: llama-server needs none
                "image_tokens": DEMO_PROJECTOR.n_patches,
                "n_ctx": 1024,
            },
            "n_threads": 1,
        }
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        text = {"role": "user", "content": "what is this?"}
        image = image_message(data_url(image_bytes(40, 30, "PNG")))
        body = {"model": "vision", "max_tokens": 4, "seed": 1}
        plain = client.post("/v1/chat/completions", json={**body, "messages": [text]})
        seen = client.post("/v1/chat/completions", json={**body, "messages": [image]})
        assert plain.status_code == 200 and seen.status_code == 200, seen.text
        assert seen.json()["edison"]["tier"] == "vision"
        loaded = client.get("/models").json()
        vision = next(t for t in loaded["tiers"] if t["tier"] == "vision")["loaded"]
        assert vision["backend"] == "llama-server"
    # The image's patches went through the projector into the prompt.
    grew = seen.json()["usage"]["prompt_tokens"] - plain.json()["usage"]["prompt_tokens"]
    assert grew >= DEMO_PROJECTOR.n_patches // 2
