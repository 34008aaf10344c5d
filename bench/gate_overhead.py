"""The memory gate's cost: POST /generate-image against the same pipeline called directly.

1. End to end. `edison serve` in a child process, its image pipeline a tiny diffusers
   folder written into a temp dir, no LLM tiers. The peer loads the same folder in this
   process (DiffusionPipeline.from_pretrained, fp32, CPU) and does the same work: the
   same prompt, size, steps and seed, and the PNG written. The two alternate, never at
   the same time (they would share the 2 cores). Target: ratio edison / direct <= 1.05.
2. The gate alone, when memory suffices: `pre_heavy_task` + `post_heavy_task` on a
   MemoryGate built from a real MemoryProbe, MemoryLedger and a ModelManager without
   tiers; its peer is a bare `probe.snapshot()`, which is most of what the gate does.
   Run twice: before diffusers is imported (the heap of an Edison without pipelines;
   torch is there already, imported by the probe's torch.cuda step when NVML is
   absent) and after the pipeline is loaded (the heap of an Edison with pipelines).
   Target: median < 1 ms.

    .venv/bin/python bench/gate_overhead.py [--rounds 8] [--steps 8] [--size 128]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import ServerProcess  # noqa: E402

from services.llm.manager import ModelManager  # noqa: E402
from services.memory.gate import MemoryGate  # noqa: E402
from services.memory.ledger import MemoryLedger  # noqa: E402
from services.memory.placement import Placement  # noqa: E402
from services.memory.probe import MemoryProbe  # noqa: E402
from services.settings import Settings  # noqa: E402

PROMPT = "a cat and a dog at sunset in the city"
SEED = 7
REQUIRED_RAM_MB = 64
BLOCK = 10  # gate iterations, then as many bare snapshots, in turn


def med(values: list[float]) -> float:
    return statistics.median(values)


# ---- 2. the gate alone -------------------------------------------------------------
def gate_micro(seconds: float, max_iterations: int) -> tuple[dict[str, list[float]], int]:
    """Blocks of pre+post (each half timed too) in turn with bare snapshots; times in µs.

    Also returns how many objects gc tracks: post_heavy_task runs a full gc.collect(),
    whose cost grows with the heap."""
    settings = Settings(memory={"reserve_ram_mb": 256})
    probe = MemoryProbe(timeout_s=settings.memory.probe_timeout_s)
    ledger = MemoryLedger(reserve_vram_mb=1024, reserve_ram_mb=256)
    placement = Placement(settings, probe, ledger)
    gate = MemoryGate(settings, placement, ModelManager(settings, placement))
    out: dict[str, list[float]] = {
        "pre+post": [],
        "pre": [],
        "post": [],
        "pre, back to back": [],
        "snapshot": [],
        "snapshot in thread": [],
        "gc.collect": [],
    }

    async def run() -> None:
        deadline = time.perf_counter() + seconds
        n = 0
        # Blocks rather than strict alternation: the gate's gc.collect() evicts the CPU
        # caches, which would slow the snapshot right after it.
        while n < max_iterations and time.perf_counter() < deadline:
            for _ in range(BLOCK):
                n += 1
                t0 = time.perf_counter()
                r = await gate.pre_heavy_task(0, "bench", required_ram_mb=REQUIRED_RAM_MB)
                t1 = time.perf_counter()
                await gate.post_heavy_task()
                t2 = time.perf_counter()
                if not r.ok:
                    raise RuntimeError(f"the gate refused: {r.actions}, {r.usable_mb} MB usable")
                out["pre+post"].append((t2 - t0) * 1e6)
                out["pre"].append((t1 - t0) * 1e6)
                out["post"].append((t2 - t1) * 1e6)
            for _ in range(BLOCK):  # no gc.collect() in between: warm caches
                t0 = time.perf_counter()
                await gate.pre_heavy_task(0, "bench", required_ram_mb=REQUIRED_RAM_MB)
                out["pre, back to back"].append((time.perf_counter() - t0) * 1e6)
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                probe.snapshot()
                out["snapshot"].append((time.perf_counter() - t0) * 1e6)
                t0 = time.perf_counter()
                await anyio.to_thread.run_sync(probe.snapshot)
                out["snapshot in thread"].append((time.perf_counter() - t0) * 1e6)
            t0 = time.perf_counter()
            gc.collect()
            out["gc.collect"].append((time.perf_counter() - t0) * 1e6)

    asyncio.run(run())
    probe.shutdown()
    return out, len(gc.get_objects())


def print_micro(label: str, out: dict[str, list[float]], objects: int) -> None:
    n = len(out["pre+post"])
    print(f"gate alone, {label}: {n} iterations, {objects} objects tracked by gc")
    for name, values in out.items():
        print(f"  {name:<20} median {med(values):9.1f} us")
    ratio = med(out["pre+post"]) / med(out["snapshot"])
    print(
        f"  ratio pre+post / snapshot: {ratio:.1f}; pre+post median "
        f"{med(out['pre+post']) / 1000:.3f} ms (target < 1 ms)"
    )


# ---- 1. end to end -----------------------------------------------------------------
def direct_call(pipe: Any, size: int, steps: int, outdir: Path) -> float:
    """The same work as the service: seeded CPU generator, the pipeline, a PNG written."""
    import torch

    t0 = time.perf_counter()
    out = pipe(
        prompt=PROMPT,
        num_inference_steps=steps,
        width=size,
        height=size,
        num_images_per_prompt=1,
        generator=torch.Generator(device="cpu").manual_seed(SEED),
        output_type="pil",
    )
    out.images[0].save(outdir / "direct.png", format="PNG")
    return time.perf_counter() - t0


def edison_call(client: httpx.Client, base: str, size: int, steps: int) -> tuple[float, dict]:
    body = {"prompt": PROMPT, "steps": steps, "seed": SEED, "width": size, "height": size}
    t0 = time.perf_counter()
    r = client.post(f"{base}/generate-image", json=body)
    wall = time.perf_counter() - t0
    r.raise_for_status()
    data = r.json()
    if data["status"] != "succeeded" or not data["outputs"]:
        raise RuntimeError(f"generation failed: {data}")
    return wall, data["timings_ms"]


def alternate(calls: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each call once per round, flipping the order every round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(calls[name]())
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds, each peer")
    ap.add_argument("--size", type=int, default=128, help="width = height, a multiple of 8")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--gate-seconds", type=float, default=8, help="time for each gate-alone run")
    ap.add_argument("--gate-iterations", type=int, default=2000)
    args = ap.parse_args()

    # Before diffusers is imported: the heap of an Edison that serves chat only.
    light, light_objects = gate_micro(args.gate_seconds, args.gate_iterations)

    import torch
    from diffusers import DiffusionPipeline

    from services.demo.tiny_pipelines import write_tiny_pipeline

    with tempfile.TemporaryDirectory(prefix="edison-bench-gate-") as tmp:
        tmpdir = Path(tmp)
        folder = write_tiny_pipeline("image", tmpdir / "image")
        config = tmpdir / "edison.yaml"
        config.write_text(
            f"server:\n  outputs_dir: {tmpdir / 'outputs'}\n  log_level: warning\n"
            "memory:\n  reserve_ram_mb: 256\n"
            "generation:\n  image:\n"
            f"    pipeline: {folder}\n    required_ram_mb: {REQUIRED_RAM_MB}\n"
            f"    max_steps: {max(50, args.steps)}\n"
        )
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32).to("cpu")
        pipe.set_progress_bar_config(disable=True)
        with ServerProcess(config) as srv, httpx.Client(timeout=300, trust_env=False) as client:
            timings: list[dict] = []

            def edison() -> float:
                wall, t = edison_call(client, srv.url, args.size, args.steps)
                timings.append(t)
                return wall

            def direct() -> float:
                return direct_call(pipe, args.size, args.steps, tmpdir)

            alternate({"edison": edison, "direct": direct}, 1)  # warm-up; Edison loads
            timings.clear()
            times = alternate({"edison": edison, "direct": direct}, args.rounds)

    e, d = med(times["edison"]), med(times["direct"])
    run_ms = med([t["run"] for t in timings])
    total_ms = med([t["total"] for t in timings])
    print(
        f"POST /generate-image {args.size}x{args.size}, {args.steps} steps, "
        f"{args.rounds} rounds (torch threads here: {torch.get_num_threads()})"
    )
    print(f"  direct pipeline call + PNG  median {d * 1000:8.1f} ms")
    print(
        f"  edison, request to answer   median {e * 1000:8.1f} ms "
        f"(job total {total_ms:.1f} ms, of which pipeline run {run_ms:.1f} ms)"
    )
    print(f"  ratio edison/direct: {e / d:.3f} (target <= 1.05); added {(e - d) * 1000:+.1f} ms")

    # After torch, diffusers and a pipeline: the heap of an Edison with pipelines.
    heavy, heavy_objects = gate_micro(args.gate_seconds, args.gate_iterations)
    print_micro("before diffusers is imported", light, light_objects)
    print_micro("with torch, diffusers and the pipeline loaded", heavy, heavy_objects)


if __name__ == "__main__":
    main()
