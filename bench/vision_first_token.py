"""An image chat's first token when vision must be loaded, against vision already loaded.

`edison serve` runs in a child process with `fast`, `medium` and the demo's tiny vision
pair (`services/demo/assets.py`: a tiny llama GGUF and a tiny CLIP projector, `mtmd`
chat format, one thread per worker). Each round:

- cold: `medium` is loaded into the heavy slot (POST /models/medium/load) and vision is
  not loaded; the image chat (`model: auto`, a 40x30 PNG data URL, streamed) must evict
  medium, start the vision worker, load the projector (mtmd loads it on the first image)
  and encode the image before its first token;
- warm: the same request right after, vision loaded: only the image's encoding and the
  prompt remain before the first token.

Time to first token: request sent -> first SSE chunk whose delta carries `content`; of
the cold one, the vision worker's spawn to ready (GET /system/memory `ready_ms`).
End-of-text and the byte tokens are banned (as in bench/chat_proxy.py) so that the first
token streams as soon as it is sampled. Prints the medians and cold / warm.

    .venv/bin/python bench/vision_first_token.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import ServerProcess  # noqa: E402

from services.demo.assets import DEMO_PROJECTOR, DEMO_TIERS, write_vision_pair  # noqa: E402
from services.demo.tiny_gguf import write_tiny_gguf  # noqa: E402
from tests.images import data_url, image_bytes, image_message  # noqa: E402

BANNED_TOKENS = range(2, 259)  # </s> and the 256 byte tokens (see bench/chat_proxy.py)


def write_config(folder: Path) -> Path:
    for i, tier in enumerate(("fast", "medium")):
        write_tiny_gguf(folder / f"{tier}.gguf", DEMO_TIERS[tier], seed=i)
    model, projector = write_vision_pair(folder)
    config = {
        "server": {"outputs_dir": str(folder / "outputs"), "log_level": "warning"},
        "memory": {"reserve_ram_mb": 0, "state_dir": str(folder / "state")},
        "models": {
            "fast": {"path": str(folder / "fast.gguf"), "n_ctx": 256},
            "medium": {"path": str(folder / "medium.gguf"), "n_ctx": 256},
            "vision": {
                "path": str(model),
                "clip_path": str(projector),
                "chat_format": "mtmd",
                "image_tokens": DEMO_PROJECTOR.n_patches,
                "n_ctx": 256,
            },
            "n_threads": 1,
        },
    }
    path = folder / "edison.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def first_token_ms(client: httpx.Client, body: dict) -> tuple[float, str]:
    """Request sent -> first content chunk, and the tier that answered."""
    t0 = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        tier = r.headers["x-edison-tier"]
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                return (time.perf_counter() - t0) * 1000, tier
    raise RuntimeError("the stream ended without content")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    body = {
        "model": "auto",
        "stream": True,
        "max_tokens": 4,
        "temperature": 0,
        "seed": 7,
        "logit_bias": {str(t): -100 for t in BANNED_TOKENS},
        "messages": [image_message(data_url(image_bytes(40, 30)))],
    }
    cold, warm, ready = [], [], []  # ready: the vision worker's start to ready
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(write_config(Path(tmp))) as server:
        client = httpx.Client(base_url=server.url, timeout=120)
        first_token_ms(
            client, {**body, "model": "fast", "messages": [{"role": "user", "content": "hi"}]}
        )
        for i in range(args.rounds):
            assert client.post("/models/medium/load").status_code == 200
            assert client.get("/models").json()["heavy_slot"] == "medium"
            ms, tier = first_token_ms(client, body)
            assert tier == "vision", tier
            cold.append(ms)
            loaded = client.get("/system/memory").json()["loaded_models"]
            ready.append(next(m["ready_ms"] for m in loaded if m["key"] == "vision"))
            ms, tier = first_token_ms(client, body)
            assert tier == "vision", tier
            warm.append(ms)
            print(f"round {i + 1}: cold {cold[-1]:.0f} ms, warm {warm[-1]:.0f} ms", flush=True)
        client.close()
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"first token, vision loaded on demand (evicting medium): p50 {c:.0f} ms")
    print(f"first token, vision already loaded:                     p50 {w:.0f} ms")
    r = statistics.median(ready)
    print(f"  of which the vision worker's spawn to ready:          p50 {r:.0f} ms")
    print(f"cold / warm: {c / w:.1f}")


if __name__ == "__main__":
    main()
