"""Streaming chat through Edison's proxy against the same worker called directly, same run.

`edison serve` runs in a child process with only a `fast` tier (a tiny GGUF written into
a temp dir). The peer is that very tier's llama_cpp.server worker, whose port comes from
GET /system/memory, so the two differ only by Edison's hop. Requests alternate
Edison / direct with the same prompts, `temperature: 0`, a fixed seed, and end-of-text
and the byte tokens banned (see BANNED_TOKENS), so every answer streams exactly
--max-tokens tokens.

TTFT: request sent -> first SSE chunk whose delta carries `content`.
Throughput: (content chunks - 1) / (last content chunk - first content chunk).

Also prints Edison's own CPU time per forwarded token (psutil, over its streams).
`--n-embd` / `--n-layer` make the model wider and slower, nearer a real token rate.

Then model loads: POST /models/fast/load (after an unload) against a bare
`python -m llama_cpp.server` started here and polled on GET /v1/models.

Targets: throughput ratio (Edison / direct) >= 0.95; added TTFT at the median < 5 ms.

    .venv/bin/python bench/chat_proxy.py [--rounds 10] [--max-tokens 200] [--load-rounds 5]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import ServerProcess, free_port, pct  # noqa: E402

from services.demo.tiny_gguf import TinyShape, write_tiny_gguf  # noqa: E402

N_CTX = 2048
PROMPTS = [
    "hello world",
    "the model and the memory",
    "edison, tell me about the gpu",
    "fast image of the world",
]
# Banned through logit_bias: </s> (2), so every answer runs max_tokens, and the 256 byte
# tokens (3-258). Why the bytes: random weights pick lone bytes that are not valid UTF-8,
# and llama-cpp-python holds streamed text back until it decodes, so the whole answer
# would arrive in one burst at the end (TTFT = total time) instead of token by token.
BANNED_TOKENS = range(2, 259)


@dataclass
class Stream:
    ttft_ms: float
    total_ms: float  # request sent -> last content chunk
    tokens: int
    tok_s: float


def stream_once(client: httpx.Client, base: str, prompt: str, max_tokens: int) -> Stream:
    """One streaming chat completion, timed chunk by chunk as the lines arrive."""
    body = {
        "model": "fast",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "seed": 1234,
        "logit_bias": {str(t): -100 for t in BANNED_TOKENS},
    }
    times: list[float] = []
    t0 = time.perf_counter()
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            now = time.perf_counter()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            choices = chunk.get("choices") or [{}]
            if "content" in choices[0].get("delta", {}):
                times.append(now)
    if len(times) < 2:
        raise RuntimeError(f"only {len(times)} content chunks from {base}")
    return Stream(
        ttft_ms=(times[0] - t0) * 1000,
        total_ms=(times[-1] - t0) * 1000,
        tokens=len(times),
        tok_s=(len(times) - 1) / (times[-1] - times[0]),
    )


def bare_worker_ready_ms(model: Path, threads: int) -> float:
    """Spawn llama_cpp.server as Edison would (same flags) and time it to the first 200."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        "fast",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_gpu_layers",
        "0",
        "--n_ctx",
        str(N_CTX),
        "--n_threads",
        str(threads),
        "--use_mlock",
        "false",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"bare llama_cpp.server exited with {proc.returncode}")
                try:
                    if client.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).is_success:
                        return (time.perf_counter() - t0) * 1000
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)  # finer than Edison's 50 ms poll: the bare start's floor
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def edison_load_ms(client: httpx.Client, base: str) -> tuple[float, float]:
    """POST /models/fast/load after an unload: (request ms, the worker's own spawn-to-ready
    ms as Edison measured it)."""
    client.post(f"{base}/models/fast/unload").raise_for_status()
    t0 = time.perf_counter()
    r = client.post(f"{base}/models/fast/load")
    ms = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    return ms, r.json()["loaded"]["ready_ms"]


def worker_url(client: httpx.Client, base: str) -> str:
    loaded = client.get(f"{base}/system/memory").json()["loaded_models"]
    if not loaded:
        raise RuntimeError("the fast tier is not loaded")
    return f"http://127.0.0.1:{loaded[0]['port']}"


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10, help="rounds of every prompt, each peer")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--load-rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the worker")
    ap.add_argument(
        "--n-embd", type=int, default=TinyShape.n_embd, help="width of the tiny model (slower)"
    )
    ap.add_argument("--n-layer", type=int, default=TinyShape.n_layer, help="its layers")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edison-bench-chat-") as tmp:
        tmpdir = Path(tmp)
        shape = TinyShape(
            n_embd=args.n_embd, n_ff=2 * args.n_embd, n_layer=args.n_layer, n_ctx_train=N_CTX
        )
        model = write_tiny_gguf(tmpdir / "fast.gguf", shape)
        config = tmpdir / "edison.yaml"
        config.write_text(
            f"server:\n  outputs_dir: {tmpdir / 'outputs'}\n  log_level: warning\n"
            "memory:\n  reserve_ram_mb: 256\n"
            f"models:\n  n_threads: {args.threads}\n"
            f"  fast:\n    path: {model}\n    n_ctx: {N_CTX}\n"
        )
        with ServerProcess(config) as srv, httpx.Client(timeout=120, trust_env=False) as client:
            direct = worker_url(client, srv.url)
            peers = {"edison": srv.url, "direct": direct}
            results: dict[str, list[Stream]] = {name: [] for name in peers}
            assert srv.proc is not None
            edison_proc = psutil.Process(srv.proc.pid)
            edison_cpu_s = 0.0  # Edison's own CPU time during the streams it proxied
            # Warm-up, one full pass: llama.cpp pays a one-off few hundred ms the first
            # time it meets a new batch shape, whichever path the request came by.
            for prompt in PROMPTS:
                for base in peers.values():
                    stream_once(client, base, prompt, args.max_tokens)
            # Alternate peer and subject per request so drift on a noisy machine hits both.
            for r in range(args.rounds):
                for prompt in PROMPTS:
                    order = list(peers.items()) if r % 2 == 0 else list(peers.items())[::-1]
                    for name, base in order:
                        cpu0 = sum(edison_proc.cpu_times()[:2])
                        results[name].append(stream_once(client, base, prompt, args.max_tokens))
                        if name == "edison":
                            edison_cpu_s += sum(edison_proc.cpu_times()[:2]) - cpu0

            loads: dict[str, list[float]] = {"edison": [], "worker": [], "bare": []}
            for r in range(args.load_rounds):
                for name in ("edison", "bare") if r % 2 == 0 else ("bare", "edison"):
                    if name == "bare":
                        loads["bare"].append(bare_worker_ready_ms(model, args.threads))
                    else:
                        ms, worker_ms = edison_load_ms(client, srv.url)
                        loads["edison"].append(ms)
                        loads["worker"].append(worker_ms)

    for name, rows in results.items():
        print(
            f"{name:<7} {len(rows):3d} streams x {med([s.tokens for s in rows]):.0f} tokens  "
            f"throughput median {med([s.tok_s for s in rows]):7.1f} tok/s  "
            f"TTFT median {med([s.ttft_ms for s in rows]):7.2f} ms  "
            f"p90 {pct([s.ttft_ms for s in rows], 90):7.2f} ms  "
            f"whole stream median {med([s.total_ms for s in rows]):6.1f} ms"
        )
    tps = {n: med([s.tok_s for s in rows]) for n, rows in results.items()}
    ttft = {n: med([s.ttft_ms for s in rows]) for n, rows in results.items()}
    print(
        f"ratio throughput edison/direct: {tps['edison'] / tps['direct']:.3f} (target >= 0.95); "
        f"added TTFT at the median: {ttft['edison'] - ttft['direct']:+.2f} ms (target < 5 ms)"
    )
    chunks = sum(s.tokens for s in results["edison"])
    print(
        f"Edison's own CPU while proxying: {edison_cpu_s * 1e6 / chunks:.0f} us per streamed "
        f"token ({edison_cpu_s:.2f} s for {chunks} tokens)"
    )
    le, lw, lb = med(loads["edison"]), med(loads["worker"]), med(loads["bare"])
    print(
        f"load to ready, median of {args.load_rounds}: edison POST /models/fast/load "
        f"{le:.0f} ms (of which its worker spawn-to-ready {lw:.0f} ms), "
        f"bare llama_cpp.server start {lb:.0f} ms; ratio {le / lb:.2f} (added {le - lb:+.0f} ms)"
    )


if __name__ == "__main__":
    main()
