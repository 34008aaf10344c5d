"""The placement ladder on the CPU: each rung's output against full residency, and its
step time against full residency's, measured in the same run.

Per kind, the tiny pipeline (written into a temp dir) is loaded once per rung, each at
its rung (diffusers' hooks with the CPU as onload and offload device), warmed up with
one run, then the rungs take turns, ``--rounds`` times, rotating who goes first. Output:
the largest difference from full residency's file (8-bit pixels, 16-bit samples: 0 is
the same file) and the median seconds per step, and that against full's.

On the CPU offloading moves nothing (onload and offload are the same device): the
ratios say what the hooks themselves cost per step, not what a PCIe copy costs. The GPU
figures are an open item in docs/gpu-validation.md.

    .venv/bin/python bench/pipeline_ladder.py [--rounds 5] [--kinds image music video]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.demo.tiny_pipelines import write_tiny_pipeline  # noqa: E402
from services.generation.params import GenerationParams  # noqa: E402
from services.generation.pipelines import PipelineHost  # noqa: E402
from services.generation.placement_ladder import ORDER, RungPlan  # noqa: E402

PARAMS = {
    "image": GenerationParams("a cat", steps=4, width=16, height=16, seed=1),
    "music": GenerationParams("piano", steps=4, duration_s=1.0, seed=2),
    "video": GenerationParams("a cat", steps=2, width=16, height=16, num_frames=4, fps=4, seed=3),
}


def samples(path: Path) -> np.ndarray:
    if path.suffix == ".wav":
        with wave.open(str(path), "rb") as w:
            return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int32)
    if path.suffix == ".mp4":
        import imageio.v3 as iio

        return np.stack(list(iio.imiter(path, plugin="FFMPEG"))).astype(np.int32)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int32)


def bench_kind(kind: str, root: Path, rounds: int) -> list[tuple[str, int, float, float]]:
    folder = write_tiny_pipeline(kind, root / kind)
    params = PARAMS[kind]
    hosts = {r: PipelineHost(kind, folder, "cpu", root / "out" / r) for r in ORDER}
    outputs: dict[str, np.ndarray] = {}
    for rung, host in hosts.items():
        host.load(RungPlan(rung))
        result = host.run(params)  # the warm-up: the first run loads kernels too
        outputs[rung] = samples(result.outputs[0].path)
    steps: dict[str, list[float]] = {r: [] for r in ORDER}
    for i in range(rounds):
        turn = ORDER[i % len(ORDER) :] + ORDER[: i % len(ORDER)]
        for rung in turn:
            t0 = time.perf_counter()
            hosts[rung].run(params, write=False)
            steps[rung].append((time.perf_counter() - t0) / (params.steps or 1))
    for host in hosts.values():
        host.unload()
    full = statistics.median(steps["full"])
    rows = []
    for rung in ORDER:
        diff = int(np.abs(outputs[rung] - outputs["full"]).max())
        step = statistics.median(steps[rung])
        rows.append((rung, diff, step, step / full))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["image", "music", "video"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        print("| kind | rung | max diff from full | s/step (median) | vs full |")
        print("|---|---|---|---|---|")
        for kind in args.kinds:
            for rung, diff, step, ratio in bench_kind(kind, Path(tmp), args.rounds):
                print(f"| {kind} | {rung} | {diff} | {step:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
