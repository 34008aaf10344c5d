"""Does Edison answer while it imports the generation stack at start-up?

`edison serve` in a child process, with the tiny image pipeline configured and
`preload: true`: start-up imports torch, diffusers and transformers in a thread (they
hold the interpreter lock while they run module code), then loads the pipeline and runs
one warm-up step, before /ready turns 200. Meanwhile this process calls /health and
/system/memory back to back. The peer: the same calls for the same time after /ready.
Prints p50/p99 during start-up against after, and how long start-up took.

    .venv/bin/python bench/startup.py [--after-s 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import ROOT, free_port, pct  # noqa: E402

from services.demo.tiny_pipelines import write_tiny_pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--after-s", type=float, default=5.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipeline = write_tiny_pipeline("image", root / "image")
        port = free_port()
        config = root / "edison.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "server": {
                        "port": port,
                        "outputs_dir": str(root / "out"),
                        "log_level": "warning",
                    },
                    "memory": {"state_dir": str(root / "state")},
                    "generation": {
                        "image": {"pipeline": str(pipeline), "required_ram_mb": 64, "preload": True}
                    },
                }
            )
        )
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "EDISON_CONFIG": ""},
        )
        during: dict[str, list[float]] = {"/health": [], "/system/memory": []}
        after: dict[str, list[float]] = {"/health": [], "/system/memory": []}
        try:
            with httpx.Client(timeout=30) as c:
                while True:  # until the server listens
                    try:
                        c.get(f"{url}/health")
                        break
                    except httpx.HTTPError:
                        time.sleep(0.01)
                listening = time.perf_counter() - t0
                while c.get(f"{url}/ready").status_code != 200:
                    for path, out in during.items():
                        s = time.perf_counter()
                        assert c.get(f"{url}{path}").status_code == 200
                        out.append((time.perf_counter() - s) * 1000)
                ready = time.perf_counter() - t0
                end = time.perf_counter() + args.after_s
                while time.perf_counter() < end:
                    for path, out in after.items():
                        s = time.perf_counter()
                        assert c.get(f"{url}{path}").status_code == 200
                        out.append((time.perf_counter() - s) * 1000)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        print(f"listening after {listening:.2f} s, ready after {ready:.2f} s")
        for path in during:
            d, a = during[path], after[path]
            during_s = f"n={len(d)} p50 {pct(d, 50):.2f} ms p99 {pct(d, 99):.1f} ms"
            print(
                f"{path:<15} during start-up: {during_s} max {max(d):.1f} ms | after: p50 "
                f"{pct(a, 50):.2f} ms p99 {pct(a, 99):.1f} ms | p99 ratio "
                f"{pct(d, 99) / pct(a, 99):.1f}x"
            )


if __name__ == "__main__":
    main()
