"""Concurrent chat on each worker backend, through Edison, same model, same run.

Two `edison serve` child processes, each with only a `fast` tier on the same tiny GGUF:
one on llama-cpp-python (`python -m llama_cpp.server`, one request at a time), one on
llama-server (llama.cpp's C++ server, `--parallel` slots batched together). Both have the
same total context (n_ctx), so the same KV memory. For 1, 2, 4 and 8 concurrent streams
the two are measured in alternation, round after round, so drift on a noisy machine hits
both. Every request has `temperature: 0` and end-of-text and the byte tokens banned
(bench/chat_proxy.py explains why), so each answer runs to --max-tokens.

Per level: aggregate tokens/s (content chunks of all streams / first request sent to last
chunk), per-request latency (sent -> last chunk: median and worst) and TTFT.
Then load to ready from page cache: POST /models/fast/load after an unload, and the
worker's own spawn-to-ready as Edison measured it.

Target on a GPU: 4 streams give at least 3x the aggregate of one on llama-server.

    .venv/bin/python bench/llama_server.py [--rounds 3] [--max-tokens 128] [--parallel 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import ServerProcess  # noqa: E402

from services.demo.tiny_gguf import TinyShape, write_tiny_gguf  # noqa: E402

BACKENDS = ("llama-cpp-python", "llama-server")
LEVELS = (1, 2, 4, 8)
PROMPTS = [
    "hello world",
    "the model and the memory",
    "edison, tell me about the gpu",
    "fast image of the world",
]
BANNED = {str(t): -100 for t in range(2, 259)}


@dataclass
class Stream:
    ttft_ms: float
    latency_ms: float  # sent -> last content chunk
    tokens: int
    end: float  # perf_counter of the last chunk


@dataclass
class Level:
    tok_s: float  # aggregate
    streams: list[Stream]


async def stream_once(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Stream:
    body = {
        "model": "fast",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "seed": 1234,
        "logit_bias": BANNED,
    }
    times: list[float] = []
    finish = None
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            choices = chunk.get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                times.append(now)
            finish = choices[0].get("finish_reason") or finish
    if not times or finish != "length":
        raise RuntimeError(f"{len(times)} content chunks, finish_reason {finish}")
    # Tokens, not chunks: llama-cpp-python sends two tokens in one chunk where they decode
    # together. Every answer ran to max_tokens (finish_reason "length").
    return Stream((times[0] - t0) * 1000, (times[-1] - t0) * 1000, max_tokens, times[-1])


async def level(client: httpx.AsyncClient, n: int, max_tokens: int) -> Level:
    t0 = time.perf_counter()
    streams = await asyncio.gather(
        *(stream_once(client, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(n))
    )
    wall = max(s.end for s in streams) - t0
    return Level(sum(s.tokens for s in streams) / wall, list(streams))


async def load_ms(client: httpx.AsyncClient) -> tuple[float, float]:
    (await client.post("/models/fast/unload")).raise_for_status()
    t0 = time.perf_counter()
    r = await client.post("/models/fast/load")
    ms = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    return ms, r.json()["loaded"]["ready_ms"]


def med(values: list[float]) -> float:
    return statistics.median(values)


async def run(urls: dict[str, str], args: argparse.Namespace) -> None:
    clients = {
        b: httpx.AsyncClient(base_url=u, timeout=600, trust_env=False) for b, u in urls.items()
    }
    results: dict[tuple[str, int], list[Level]] = {(b, n): [] for b in BACKENDS for n in LEVELS}
    loads: dict[str, list[tuple[float, float]]] = {b: [] for b in BACKENDS}
    try:
        for b in BACKENDS:  # warm-up: one pass of each level
            for n in LEVELS:
                await level(clients[b], n, args.max_tokens)
        for r in range(args.rounds):
            for n in LEVELS:
                for b in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
                    results[(b, n)].append(await level(clients[b], n, args.max_tokens))
        for r in range(args.load_rounds):
            for b in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
                loads[b].append(await load_ms(clients[b]))
    finally:
        for c in clients.values():
            await c.aclose()

    print(
        f"{'backend':<17} {'streams':>7} {'agg tok/s':>10} {'x one':>6} "
        f"{'latency p50':>12} {'worst':>8} {'TTFT p50':>9} {'TTFT worst':>10}"
    )
    agg: dict[tuple[str, int], float] = {}
    for b in BACKENDS:
        for n in LEVELS:
            rows = results[(b, n)]
            agg[(b, n)] = med([x.tok_s for x in rows])
            streams = [s for x in rows for s in x.streams]
            print(
                f"{b:<17} {n:>7} {agg[(b, n)]:>10.1f} {agg[(b, n)] / agg[(b, 1)]:>6.2f} "
                f"{med([s.latency_ms for s in streams]):>10.0f}ms "
                f"{max(s.latency_ms for s in streams):>6.0f}ms "
                f"{med([s.ttft_ms for s in streams]):>7.0f}ms "
                f"{max(s.ttft_ms for s in streams):>8.0f}ms"
            )
    print("ratio llama-server / llama-cpp-python, aggregate tokens/s:")
    print(
        "  "
        + "  ".join(
            f"{n} stream{'s' if n > 1 else ''}: "
            f"{agg[('llama-server', n)] / agg[('llama-cpp-python', n)]:.2f}"
            for n in LEVELS
        )
    )
    for b in BACKENDS:
        req, worker = med([x[0] for x in loads[b]]), med([x[1] for x in loads[b]])
        print(
            f"load to ready ({b}), median of {args.load_rounds}: POST /models/fast/load "
            f"{req:.0f} ms, worker spawn-to-ready {worker:.0f} ms"
        )
    lcp = med([x[1] for x in loads["llama-cpp-python"]])
    srv = med([x[1] for x in loads["llama-server"]])
    print(f"ratio worker spawn-to-ready llama-server / llama-cpp-python: {srv / lcp:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every level, each backend")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--load-rounds", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=4, help="llama-server slots")
    ap.add_argument("--n-ctx", type=int, default=2048, help="the tier's whole context")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads of each worker")
    ap.add_argument("--n-embd", type=int, default=TinyShape.n_embd, help="width of the model")
    ap.add_argument("--n-layer", type=int, default=TinyShape.n_layer, help="its layers")
    ap.add_argument("--model", type=Path, help="a real GGUF instead of the tiny one")
    ap.add_argument("--gpu-layers", type=int, default=0, help="n_gpu_layers (-1: all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edison-bench-llama-server-") as tmp:
        tmpdir = Path(tmp)
        model = args.model
        if model is None:
            shape = TinyShape(
                n_embd=args.n_embd, n_ff=2 * args.n_embd, n_layer=args.n_layer,
                n_ctx_train=args.n_ctx,
            )  # fmt: skip
            model = write_tiny_gguf(tmpdir / "fast.gguf", shape)
        configs = {}
        for b in BACKENDS:
            slots = f"    parallel: {args.parallel}\n" if b == "llama-server" else ""
            configs[b] = tmpdir / f"{b}.yaml"
            configs[b].write_text(
                f"server:\n  outputs_dir: {tmpdir / 'outputs'}\n  log_level: warning\n"
                f"memory:\n  reserve_ram_mb: 256\n  state_dir: {tmpdir / b}\n"
                f"models:\n  backend: {b}\n  n_threads: {args.threads}\n"
                f"  fast:\n    path: {model}\n    n_ctx: {args.n_ctx}\n"
                f"    n_gpu_layers: {args.gpu_layers}\n{slots}"
            )
        print(
            f"model {model.name} ({model.stat().st_size / 2**20:.1f} MiB), n_ctx {args.n_ctx}, "
            f"llama-server --parallel {args.parallel}, {args.max_tokens} tokens per answer, "
            f"{args.rounds} rounds, threads {args.threads}"
        )
        with (
            ServerProcess(configs["llama-cpp-python"]) as a,
            ServerProcess(configs["llama-server"]) as b,
        ):
            asyncio.run(run({"llama-cpp-python": a.url, "llama-server": b.url}, args))


if __name__ == "__main__":
    main()
