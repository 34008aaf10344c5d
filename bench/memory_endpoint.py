"""GET /system/memory against GET /health on the same server, same run, concurrent clients.

Prints requests per second and p50/p99 latency of each, and the throughput ratio
(memory / health). Target on a 2-core machine: ratio >= 0.7, p99 < 20 ms.

    .venv/bin/python bench/memory_endpoint.py [--clients 8] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import ROOT, ServerProcess, summary  # noqa: E402


async def hammer(url: str, clients: int, seconds: float) -> tuple[list[float], float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await client.get(url)
                r.raise_for_status()
                latencies.append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        return latencies, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per endpoint")
    args = ap.parse_args()
    config = ROOT / "var" / "bench-memory.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text("server:\n  outputs_dir: bench-outputs\n  log_level: warning\n")
    with ServerProcess(config) as srv:
        asyncio.run(hammer(f"{srv.url}/system/memory", args.clients, 1))  # warm-up
        results: dict[str, list[float]] = {"/health": [], "/system/memory": []}
        walls = dict.fromkeys(results, 0.0)
        # Alternate the two endpoints so drift on a noisy machine hits both alike.
        for _ in range(args.rounds):
            for path in results:
                lat, wall = asyncio.run(hammer(f"{srv.url}{path}", args.clients, args.seconds))
                results[path] += lat
                walls[path] += wall
    rows = {p: summary(p, lat, walls[p]) for p, lat in results.items()}
    for r in rows.values():
        print(
            f"{r['name']:<16} {r['rps']:8.0f} req/s  "
            f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
        )
    ratio = rows["/system/memory"]["rps"] / rows["/health"]["rps"]
    print(
        f"ratio memory/health throughput: {ratio:.2f} (target >= 0.7); "
        f"memory p99 {rows['/system/memory']['p99_ms']:.2f} ms (target < 20 ms)"
    )


if __name__ == "__main__":
    main()
