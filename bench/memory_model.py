"""Learned memory against the constant: how well predictions cover measured peaks, and
how many chat-model unloads request-sized needs avoid.

1. Prediction error. Per kind, the tiny pipeline on the CPU (written into a temp dir)
   learns from three sizes, then six sizes are each predicted and then run: predicted
   working memory (margin included) against the measured peak. Learning goes on with
   every run, as in production. Target: never below the peak, at most 15 % above the
   margin.
2. Unloads avoided. One Edison in this process with `fast` and `medium` loaded, a RAM
   budget (`reserve_ram_mb` set so that about 400 MB are usable beside the models) and
   a mixed workload: chat on fast and medium between small and large images, 3 rounds.
   The constant arm reserves the same `required_ram_mb` for every image (the prior, with
   `learn_after` out of reach), set to the usable memory plus three quarters of what the
   two models hold: only unloading both makes room. The learned arm has learned from
   three images first.
   Counted from the ModelManager's own records: model unloads, reloads, and the seconds
   chat requests took (a chat after an unload waits for its model to load again).
   The arms alternate; same workload, same run.

    .venv/bin/python bench/memory_model.py [--rounds 3] [--usable-mb 400]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient  # noqa: E402

from app.main import create_app  # noqa: E402
from services.demo.assets import DEMO_TIERS  # noqa: E402
from services.demo.tiny_gguf import write_tiny_gguf  # noqa: E402
from services.demo.tiny_pipelines import write_tiny_pipeline  # noqa: E402
from services.generation.params import GenerationParams  # noqa: E402
from services.generation.registry import PipelineRegistry  # noqa: E402
from services.memory.ledger import MemoryLedger  # noqa: E402
from services.memory.placement import Placement  # noqa: E402
from services.memory.probe import MemoryProbe  # noqa: E402
from services.settings import Settings  # noqa: E402

LEARN = {
    "image": [dict(width=96, height=96), dict(width=128, height=128), dict(width=160, height=160)],
    "video": [
        dict(num_frames=4, width=64, height=64),
        dict(num_frames=8, width=64, height=64),
        dict(num_frames=8, width=96, height=96),
    ],
    "music": [dict(duration_s=2.0), dict(duration_s=4.0), dict(duration_s=6.0)],
}
TEST = {
    "image": [dict(width=px, height=px) for px in (112, 144, 176, 192, 224, 256)],
    "video": [
        dict(num_frames=f, width=px, height=px)
        for f, px in ((4, 96), (6, 80), (8, 80), (12, 64), (12, 96), (16, 96))
    ],
    "music": [dict(duration_s=d) for d in (1.0, 3.0, 5.0, 8.0, 12.0, 16.0)],
}


# ---- 1. prediction error -----------------------------------------------------------
async def prediction_error(root: Path) -> list[tuple[str, str, float, float, float]]:
    settings = Settings(
        generation={
            k: {"pipeline": str(write_tiny_pipeline(k, root / k)), "required_ram_mb": 64}
            for k in LEARN
        },
        memory={"learn_after": 3, "state_dir": str(root / "state")},
    )
    placement = Placement(
        settings, MemoryProbe(), MemoryLedger(reserve_vram_mb=0, reserve_ram_mb=0)
    )
    registry = PipelineRegistry(settings, placement)
    rows = []
    try:
        for kind in LEARN:
            shape = await registry.shape(kind)
            assert shape is not None
            for phase, sizes in (("learn", LEARN[kind]), ("test", TEST[kind])):
                for extra in sizes:
                    params = GenerationParams("a calm sea", steps=1, seed=3, **extra)
                    p = registry.predict(kind, "cpu", params, shape)
                    r = await registry.run(kind, "cpu", params, predicted=p)
                    assert r.peak is not None
                    if phase == "test":
                        assert p.prediction.working_mb is not None
                        rows.append(
                            (
                                kind,
                                p.size.text,
                                p.prediction.size,
                                p.prediction.working_mb,
                                r.peak.working_mb,
                            )
                        )
            await registry.unload_idle()
    finally:
        await registry.shutdown()
    return rows


# ---- 2. unloads avoided -------------------------------------------------------------
def workload_settings(root: Path, models: Path, pipeline: Path, learned: bool) -> Settings:
    tiers = {
        n: {"path": str(models / f"{n}.gguf"), "n_ctx": 256, "preload": True}
        for n in ("fast", "medium")
    }
    return Settings(
        models={**tiers, "n_threads": 1, "heavy_keep_alive_s": 0},
        generation={
            "image": {"pipeline": str(pipeline), "required_ram_mb": 600, "default_steps": 1}
        },
        memory={
            "learn_after": 3 if learned else 1000,
            "state_dir": str(root / ("learned" if learned else "constant")),
            "reserve_ram_mb": 0,
        },
        server={"outputs_dir": str(root / "outputs"), "log_level": "error"},
    )


def run_arm(settings: Settings, usable_mb: float, rounds: int) -> dict[str, Any]:
    chat = {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    small, large = dict(width=64, height=64), dict(width=192, height=192)
    with TestClient(create_app(settings)) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.05)
        state = client.app.state
        # Three images before the budget is set: the learned arm learns from them; in both
        # arms the pipeline is then loaded and its first-run allocations are made.
        for px in (64, 128, 192):
            r = client.post("/generate-image", json={"prompt": "x", "width": px, "height": px})
            assert r.status_code == 200, r.text
        client.post("/models/medium/load")
        client.post("/models/fast/load")
        # The budget: whatever is available now, less usable_mb, is reserve; the constant
        # need takes unloading both models to fit.
        snap = state.probe.snapshot()
        state.ledger.reserve_ram_mb = max(0.0, snap.ram_available_mb - usable_mb)
        held = sum(e.mb for e in state.ledger.entries() if e.kind == "model")
        state.settings.generation.image.required_ram_mb = int(usable_mb + 0.75 * held)
        models = state.models
        loads0 = models.loads_total()
        unloads0 = sum(t.unloads for t in models.tiers.values())
        chat_s: list[float] = []
        refused = 0
        for _ in range(rounds):
            for tier, image in (
                ("fast", small),
                ("medium", large),
                ("fast", large),
                ("medium", small),
            ):
                t0 = time.perf_counter()
                r = client.post("/v1/chat/completions", json={**chat, "model": tier})
                chat_s.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                r = client.post("/generate-image", json={"prompt": "x", **image})
                refused += r.status_code == 503
                assert r.status_code in (200, 503), r.text
        return {
            "unloads": sum(t.unloads for t in models.tiers.values()) - unloads0,
            "reloads": models.loads_total() - loads0,
            "chat_s": sum(chat_s),
            "chat_p50_ms": statistics.median(chat_s) * 1000,
            "refused": refused,
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--usable-mb", type=float, default=400)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = asyncio.run(prediction_error(root / "pred"))
        print("kind   request                     size        predicted  measured  pred/meas")
        worst_low, worst_high = 10.0, 0.0
        for kind, text, size, predicted, measured in rows:
            ratio = predicted / measured if measured > 0 else float("inf")
            worst_low, worst_high = min(worst_low, ratio), max(worst_high, ratio)
            row = f"{kind:<6} {text:<27} {size:>10.0f} {predicted:>9.1f} MB {measured:>7.1f} MB"
            print(f"{row} {ratio:>8.2f}")
        print(f"predicted / measured: lowest {worst_low:.2f}, highest {worst_high:.2f}")

        models = root / "models"
        for i, (tier, shape) in enumerate(DEMO_TIERS.items()):
            write_tiny_gguf(models / f"{tier}.gguf", shape, seed=i)
        pipeline = write_tiny_pipeline("image", root / "image")
        results: dict[str, list[dict[str, Any]]] = {"constant": [], "learned": []}
        for rep in range(2):
            order = ("constant", "learned") if rep % 2 == 0 else ("learned", "constant")
            for arm in order:
                s = workload_settings(root / f"{arm}{rep}", models, pipeline, arm == "learned")
                results[arm].append(run_arm(s, args.usable_mb, args.rounds))
        for arm, runs in results.items():
            print(
                f"{arm:>8}: unloads {[r['unloads'] for r in runs]}, reloads "
                f"{[r['reloads'] for r in runs]}, chat total "
                f"{[round(r['chat_s'], 2) for r in runs]} s, chat p50 "
                f"{[round(r['chat_p50_ms'], 1) for r in runs]} ms, "
                f"refused {[r['refused'] for r in runs]}"
            )
        c = statistics.median(r["chat_s"] for r in results["constant"])
        learned_s = statistics.median(r["chat_s"] for r in results["learned"])
        cu = statistics.median(r["unloads"] for r in results["constant"])
        lu = statistics.median(r["unloads"] for r in results["learned"])
        print(
            f"constant / learned: unloads {cu:g} / {lu:g}, chat seconds {c / learned_s:.2f}x "
            f"({args.rounds} rounds x 4 chats and 4 images, about {args.usable_mb:g} MB usable)"
        )


if __name__ == "__main__":
    main()
