"""One GPU against two, and min_residency_s 0 against 30, on a simulated two-GPU host.

The GPUs are a fake probe reporting two 24 GB cards (two cards cannot exist on this
machine); the LLM workers (tiny GGUF models) and the image pipeline (tiny random
weights) really run, on the CPU. Each arm is a fresh `edison` app on a real uvicorn
server, driven over HTTP by one chat user and one image user at once:

- the chat user asks medium, deep, medium, deep, ... (two heavy tiers), one at a time;
- the image user asks for images one after another, each declared (by its prior,
  `required_vram_mb`) to need 23.4 GB of a card's 23.5 usable: beside any heavy model it
  does not fit, so the gate evicts the heavy model of the card the image goes to, and
  the next chat for that tier must load it again somewhere.

Printed per arm: evictions (worker unloads: heavy-slot swaps and the gate's), chat
answers that waited for residency or fell back, chat time, and wall time; then the
ratios one/two GPUs and residency 0/30.

    .venv/bin/python bench/multi_gpu.py [--chats 12] [--images 4] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.main import create_app  # noqa: E402
from services.demo.assets import DEMO_TIERS  # noqa: E402
from services.demo.tiny_gguf import write_tiny_gguf  # noqa: E402
from services.demo.tiny_pipelines import write_tiny_pipeline  # noqa: E402
from services.settings import Settings  # noqa: E402
from tests.helpers import FakeGpuProbe, LiveServer  # noqa: E402


@dataclass
class Arm:
    name: str
    devices: list[int] | str
    min_residency_s: float


@dataclass
class Result:
    evictions: int
    loads: int
    waited: int  # chat answers that waited for a heavy model's residency
    fell_back: int  # chat answers from another tier than asked
    chat_s: float
    wall_s: float


def settings_for(root: Path, arm: Arm) -> Settings:
    tiers = {
        n: {"path": str(root / f"{n}.gguf"), "n_ctx": 256, "preload": n == "fast"}
        for n in ("fast", "medium", "deep")
    }
    return Settings(
        server={"outputs_dir": str(root / "out"), "log_level": "warning"},
        memory={
            "devices": arm.devices,
            "reserve_vram_mb": 1024,
            "reserve_ram_mb": 0,
            "learn_after": 1000,  # keep the declared 23.4 GB: CPU peaks would be tiny
            "state_dir": str(root / f"state-{arm.name}"),
        },
        models={
            **tiers,
            "n_threads": 1,
            "min_residency_s": arm.min_residency_s,
            "max_residency_wait_s": 2,
        },
        generation={
            "image": {
                "pipeline": str(root / "image"),
                "required_vram_mb": 23_400,
                "default_steps": 2,
            }
        },
        queue={"max_waiting": 16, "max_wait_s": 600},
    )


async def chat_user(url: str, n: int, counts: dict[str, int]) -> float:
    spent = 0.0
    async with httpx.AsyncClient(timeout=300) as c:
        for i in range(n):
            tier = ("medium", "deep")[i % 2]
            body = {"model": tier, "messages": [{"role": "user", "content": "hi"}]}
            t0 = time.perf_counter()
            r = await c.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 8})
            spent += time.perf_counter() - t0
            r.raise_for_status()
            edison = r.json()["edison"]
            counts["waited"] += bool(edison.get("residency_wait_s"))
            counts["fell_back"] += edison["tier"] != tier
    return spent


async def image_user(url: str, n: int) -> None:
    async with httpx.AsyncClient(timeout=600) as c:
        for i in range(n):
            r = await c.post(
                f"{url}/generate-image",
                json={"prompt": f"p{i}", "width": 32, "height": 32, "steps": 2},
            )
            r.raise_for_status()


async def drive(url: str, chats: int, images: int) -> tuple[dict[str, int], float, float]:
    counts = {"waited": 0, "fell_back": 0}
    t0 = time.perf_counter()
    chat_s, _ = await asyncio.gather(chat_user(url, chats, counts), image_user(url, images))
    return counts, chat_s, time.perf_counter() - t0


def run_arm(root: Path, arm: Arm, chats: int, images: int) -> Result:
    probe = FakeGpuProbe(total_mb=24_576, gpus=2)
    app = create_app(settings_for(root, arm), probe=probe, pipeline_run_device=lambda d: "cpu")
    with LiveServer(app) as server:
        deadline = time.time() + 120
        while httpx.get(f"{server.url}/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        counts, chat_s, wall = asyncio.run(drive(server.url, chats, images))
        tiers = app.state.models.tiers.values()
        evictions = sum(t.unloads for t in tiers)
        loads = sum(t.loads for t in tiers)
    return Result(evictions, loads, counts["waited"], counts["fell_back"], chat_s, wall)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chats", type=int, default=12)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    arms = [Arm("one-gpu", [0], 30), Arm("two-gpus", "auto", 30), Arm("two-gpus-res0", "auto", 0)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, (tier, shape) in enumerate(DEMO_TIERS.items()):
            write_tiny_gguf(root / f"{tier}.gguf", shape, seed=i)
        write_tiny_pipeline("image", root / "image")
        results: dict[str, list[Result]] = {a.name: [] for a in arms}
        for r in range(args.repeat):
            order = arms if r % 2 == 0 else list(reversed(arms))
            for arm in order:
                res = run_arm(root, arm, args.chats, args.images)
                results[arm.name].append(res)
                print(f"round {r + 1} {arm.name}: {res}", flush=True)

    def med(name: str, field: str) -> float:
        return statistics.median(getattr(x, field) for x in results[name])

    print(f"\n{args.chats} chats (medium/deep alternating) beside {args.images} images")
    print("| arm | evictions | loads | waited | fell back | chat s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for a in arms:
        row = [med(a.name, f) for f in ("evictions", "loads", "waited", "fell_back")]
        print(
            f"| {a.name} | "
            + " | ".join(f"{v:g}" for v in row)
            + f" | {med(a.name, 'chat_s'):.2f} | {med(a.name, 'wall_s'):.2f} |"
        )

    def ratio(a: str, b: str, f: str) -> str:
        x, y = med(a, f), med(b, f)
        return f"{x / y:.2f}" if y else f"{x:g} vs {y:g}"

    for f in ("evictions", "chat_s", "wall_s"):
        print(f"{f}: one/two GPUs = {ratio('one-gpu', 'two-gpus', f)}", end="; ")
        print(f"residency 0/30 = {ratio('two-gpus-res0', 'two-gpus', f)}")


if __name__ == "__main__":
    main()
