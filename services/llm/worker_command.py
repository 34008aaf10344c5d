"""What a llama_cpp.server worker is started with, and how its output is read.

The command line (under a parent-death signal), the allow-listed environment, and the
one-line reason pulled out of a failed worker's output. ``worker.py`` supervises the
process; this module only says what to run.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The child's environment: only these variables (and the prefixes below) pass through.
_PASS_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TMP",
        "TEMP",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "VIRTUAL_ENV",
    }
)
_PASS_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "GGML_", "OMP_", "HIP_", "ROCR_", "HSA_")
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
# Lines of llama.cpp / uvicorn output that say what went wrong.
_CAUSE = re.compile(r"error|invalid|fail|unable|cannot|out of memory|not within", re.IGNORECASE)
_PY_EXC = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b:?")
PORT_TAKEN = re.compile(r"address already in use|\[Errno 98\]", re.IGNORECASE)


@dataclass(frozen=True)
class WorkerSpec:
    """What to run: one model file with its GPU layers and context."""

    key: str
    model_path: Path
    n_gpu_layers: int
    n_ctx: int
    n_threads: int | None = None
    chat_format: str | None = None
    clip_path: Path | None = None
    extra_args: tuple[str, ...] = ()  # more llama_cpp.server flags, e.g. ("--flash_attn", "true")
    # The GPUs this worker sees (CUDA_VISIBLE_DEVICES), in the order it numbers them;
    # None: whatever the parent sees. With 0 GPU layers the worker sees none.
    devices: tuple[int, ...] | None = None
    # Share of the layers on each visible device when a model is split across cards.
    tensor_split: tuple[float, ...] | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a race remains; see start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(spec: WorkerSpec, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: allow-listed variables, offline, no proxies.

    With 0 GPU layers the GPU is hidden from the child, so it creates no CUDA context
    and does no "op offload" of large batches: a CPU rung really uses no VRAM.
    """
    env = {k: v for k, v in os.environ.items() if k in _PASS_ENV or k.startswith(_PASS_PREFIXES)}
    env.update(_OFFLINE)
    if spec.n_gpu_layers == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["HIP_VISIBLE_DEVICES"] = ""
    elif spec.devices is not None:
        # The child numbers its devices from 0 in this order, so its CUDA context (and
        # every layer) lands on the cards the ledger placed it on.
        visible = ",".join(str(d) for d in spec.devices)
        env["CUDA_VISIBLE_DEVICES"] = visible
        env["HIP_VISIBLE_DEVICES"] = visible
    if overrides:
        env.update(overrides)
    return env


# Runs ``python -m llama_cpp.server`` after asking Linux to send the worker SIGTERM
# when the process that started it dies (prctl PR_SET_PDEATHSIG). Without it a worker
# outlives an Edison killed with SIGKILL and keeps its VRAM: it has its own session, so
# no terminal signal reaches it either. Done here, after exec, rather than in a
# preexec_fn, which would force a full fork() of a parent that may hold gigabytes.
# The signal follows the thread that started the child: the event loop's thread.
BOOTSTRAP = """\
import ctypes, os, runpy, signal, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass
if os.getppid() != parent:
    sys.exit("edison: the process that started this worker is gone")
sys.argv = ["llama_cpp.server", *sys.argv[2:]]
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


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
