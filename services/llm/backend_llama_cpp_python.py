"""The llama-cpp-python backend: ``python -m llama_cpp.server`` as a worker.

Its command line (under a parent-death signal) and the one-line reason pulled out of
a failed worker's output. ``worker.py`` supervises the process.

What llama_cpp.server (llama-cpp-python 0.3.36) does, as measured here:

- It loads the model *before* it listens: ``create_app`` builds the model, then
  ``uvicorn.run`` binds. So "GET /v1/models answers 200" means "loaded and serving".
  uvicorn prints ``Uvicorn running on http://127.0.0.1:PORT`` on stderr once bound;
  we poll HTTP instead, which also proves the answer comes from our process (the
  model id must be our alias, see below).
- A tiny model is ready in about 0.4-0.7 s on 2 CPU cores; its chatty verbose log
  (about 300 lines at start-up) is what tells why a load failed, so it stays on.
- A failed load exits with status 1 after a Python traceback ending in
  ``ValueError: Model path does not exist: PATH`` (missing file) or
  ``ValueError: Failed to load model from file: PATH``; the real reason is a
  llama.cpp line a few lines earlier, e.g. ``gguf_init_from_reader: invalid magic
  characters`` or ``llama_model_load: error loading model: tensor '...' data is not
  within the file bounds, model is corrupted or incomplete``.
- A taken port is found only after the model has loaded: uvicorn prints ``[Errno 98]
  ... address already in use`` and the process exits with status 3.
- Its settings are pydantic ``BaseSettings``, so environment variables named like
  its options (``PORT``, ``HOST``, ``API_KEY``, ``N_CTX``, ``CONFIG_FILE``...) override
  or add to the command line; ``PORT`` even wins over ``--port``. The child therefore
  gets an allow-listed environment, not ours.
- ``--use_mlock`` defaults to true in the server (false in ``Llama``); we pass false so
  the weights left on the CPU stay ordinary page cache that image pipelines can use.
- ``--clip_model_path`` is used only with a vision ``--chat_format`` (llava-1-5,
  llava-1-6, mtmd, qwen2.5-vl, minicpm-v-2.6, moondream, ...); without one it is
  silently ignored.
- ``--n_gpu_layers -1`` means all layers and the output layer.
- ``--n_ctx`` above the trained context is accepted with a warning ("possible training
  context overflow"); an absurd one (10^9 on the tiny model) does not fail, it grinds
  on allocating, so the estimate, not the worker, must refuse it.
- On SIGTERM uvicorn shuts down gracefully (about 0.1 s here) and then re-raises the
  signal: a clean stop() returns -15.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.llm.worker_command import WorkerSpec

NAME = "llama-cpp-python"

# Lines of llama.cpp / uvicorn output that say what went wrong.
_CAUSE = re.compile(r"error|invalid|fail|unable|cannot|out of memory|not within", re.IGNORECASE)
_PY_EXC = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b:?")

# Runs ``python -m llama_cpp.server`` after asking Linux to send the worker SIGTERM
# when the process that started it dies (prctl PR_SET_PDEATHSIG). Without it a worker
# outlives an Edison killed with SIGKILL and keeps its VRAM: it has its own session, so
# no terminal signal reaches it either. Done here, after exec, rather than in a
# preexec_fn, which would force a full fork() of a parent that may hold gigabytes.
# The signal follows the thread that started the child: the event loop's thread.
PDEATHSIG_PRELUDE = """\
import ctypes, os, runpy, signal, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass
if os.getppid() != parent:
    sys.exit("edison: the process that started this worker is gone")
"""
BOOTSTRAP = (
    PDEATHSIG_PRELUDE
    + """\
sys.argv = ["llama_cpp.server", *sys.argv[2:]]
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""
)


def build_command(spec: WorkerSpec, port: int, python: str = sys.executable) -> list[str]:
    """The command line of a worker serving ``spec`` on 127.0.0.1:port.

    ``python -c BOOTSTRAP PARENT_PID --host ...``: the llama_cpp.server module with its
    own flags, under a parent-death signal (see BOOTSTRAP).
    """
    cmd = [
        python,
        "-c",
        BOOTSTRAP,
        str(os.getpid()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(spec.model_path),
        "--model_alias",
        spec.key,
        "--n_gpu_layers",
        str(spec.n_gpu_layers),
        "--n_ctx",
        str(spec.n_ctx),
        "--use_mlock",
        "false",
        # Queue a second request (a token count, another chat) behind a running one rather
        # than cutting the running stream off, which is the server's default.
        "--interrupt_requests",
        "false",
    ]
    if spec.n_threads is not None:
        cmd += ["--n_threads", str(spec.n_threads)]
    if spec.chat_format is not None:
        cmd += ["--chat_format", spec.chat_format]
    if spec.clip_path is not None:
        cmd += ["--clip_model_path", str(spec.clip_path)]
    if spec.tensor_split is not None:
        cmd += ["--split_mode", "1", "--tensor_split", *(f"{x:g}" for x in spec.tensor_split)]
    return cmd + list(spec.extra_args)


def tokenize_request(text: str) -> tuple[str, dict[str, object]]:
    """Where and what to post to count ``text``'s tokens, BOS included."""
    return "/extras/tokenize/count", {"input": text}


def token_count(answer: dict[str, object]) -> int:
    return int(answer["count"])  # type: ignore[call-overload]


def extract_reason(lines: list[str]) -> str:
    """A one-line human reason from the worker's last output lines.

    The Python exception line (``ValueError: ...``) plus the first llama.cpp or
    uvicorn line that names a cause in the few lines before the traceback. For
    people and logs only: nothing decides on this text.
    """
    exc_line = ""
    tb_start = len(lines)
    for i in range(len(lines) - 1, -1, -1):
        if _PY_EXC.match(lines[i]):
            exc_line = lines[i].strip()
            tb_start = i
            break
    for i in range(tb_start - 1, -1, -1):
        if lines[i].startswith("Traceback"):
            tb_start = i
            break
    cause = ""
    for line in lines[max(0, tb_start - 8) : tb_start]:
        text = line.strip()
        if text and not line[0].isspace() and _CAUSE.search(text):
            cause = text
            break
    if cause and exc_line:
        return f"{cause} ({exc_line})"
    if cause or exc_line:
        return cause or exc_line
    rest = [ln.strip() for ln in lines if ln.strip()]
    return rest[-1] if rest else "no output"
