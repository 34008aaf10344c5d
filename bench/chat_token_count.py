"""What the context clamp costs a chat: the worker's token count against the chat itself.

Edison counts a prompt with the worker's tokenizer (`POST /extras/tokenize/count`) when
the request has no `max_tokens`, or when the prompt's length alone cannot tell whether
it fits. This times that call and, as its peer, an 8-token chat completion on the same
tiny worker (CPU, one thread), alternating, 60 rounds.

    .venv/bin/python bench/chat_token_count.py [--rounds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.demo.tiny_gguf import write_tiny_gguf  # noqa: E402
from services.llm.worker import LlamaWorker  # noqa: E402
from services.llm.worker_command import WorkerSpec  # noqa: E402

PROMPT = "Name a colour. " * 10


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_gguf(Path(tmp) / "tiny.gguf")
        spec = WorkerSpec(key="fast", model_path=model, n_gpu_layers=0, n_ctx=256, n_threads=1)
        worker = LlamaWorker(spec)
        await worker.start(60)
        chat = {
            "model": "fast",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 8,
            "temperature": 0,
        }
        count_ms, chat_ms = [], []
        try:
            async with httpx.AsyncClient(timeout=60) as c:
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    r = await c.post(
                        f"{worker.base_url}/extras/tokenize/count",
                        json={"input": f"user\n{PROMPT}\n"},
                    )
                    count_ms.append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                    t0 = time.perf_counter()
                    r = await c.post(f"{worker.base_url}/v1/chat/completions", json=chat)
                    chat_ms.append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
        finally:
            await worker.stop()
    cm, hm = statistics.median(count_ms), statistics.median(chat_ms)
    print(f"token count p50 {cm:.2f} ms; 8-token chat p50 {hm:.2f} ms; count / chat {cm / hm:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    asyncio.run(main(ap.parse_args().rounds))
