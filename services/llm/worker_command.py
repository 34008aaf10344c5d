"""What a worker is started with, and how its output is read, for either backend.

A worker is ``python -m llama_cpp.server`` (backend ``llama-cpp-python``,
``backend_llama_cpp_python.py``) or llama.cpp's ``llama-server`` (backend
``llama-server``, ``backend_llama_server.py``). Both get the same allow-listed
environment and a parent-death signal; only the command line and the error lines
differ. ``worker.py`` supervises the process; this module only says what to run.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.llm import backend_llama_cpp_python as lcp
from services.llm import backend_llama_server as lsrv

Backend = Literal["llama-cpp-python", "llama-server"]
BACKENDS: tuple[Backend, ...] = ("llama-cpp-python", "llama-server")

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
# uvicorn's "address already in use" (llama_cpp.server), llama-server's failed bind.
PORT_TAKEN = re.compile(
    r"address already in use|\[Errno 98\]|couldn't bind HTTP server socket", re.IGNORECASE
)


@dataclass(frozen=True)
class WorkerSpec:
    """What to run: one model file with its GPU layers and context, on one backend."""

    key: str
    model_path: Path
    n_gpu_layers: int
    n_ctx: int  # the whole context; llama-server divides it across its slots
    n_threads: int | None = None
    chat_format: str | None = None
    clip_path: Path | None = None
    extra_args: tuple[str, ...] = ()  # more flags of the backend's server
    # The GPUs this worker sees (CUDA_VISIBLE_DEVICES), in the order it numbers them;
    # None: whatever the parent sees. With 0 GPU layers the worker sees none.
    devices: tuple[int, ...] | None = None
    # Share of the layers on each visible device when a model is split across cards.
    tensor_split: tuple[float, ...] | None = None
    backend: Backend = "llama-cpp-python"
    parallel: int = 1  # requests served at once (llama-server slots)
    binary: Path | None = None  # llama-server's executable; None: the one Edison builds
    cache_ram_mb: int | None = None  # llama-server's prompt cache cap (--cache-ram)


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


def binary_of(spec: WorkerSpec) -> Path | None:
    """The executable a llama-server worker runs; None for llama-cpp-python."""
    if spec.backend != lsrv.NAME:
        return None
    return spec.binary or lsrv.default_binary()


def build_command(
    spec: WorkerSpec, port: int, python: str = sys.executable, flags: tuple[str, ...] = ()
) -> list[str]:
    """The command line of a worker serving ``spec`` on 127.0.0.1:port, per backend.

    ``flags``: the optional llama-server flags its binary knows (ignored otherwise).
    """
    if spec.backend == lsrv.NAME:
        return lsrv.build_command(spec, port, python, flags)
    return lcp.build_command(spec, port, python)


def tokenize_request(text: str, backend: str) -> tuple[str, dict[str, object]]:
    """The worker's path and body that count ``text``'s tokens, per backend."""
    return (lsrv if backend == lsrv.NAME else lcp).tokenize_request(text)


def token_count(answer: dict[str, object], backend: str) -> int:
    """The token count in the worker's answer to :func:`tokenize_request`."""
    return (lsrv if backend == lsrv.NAME else lcp).token_count(answer)


def extract_reason(lines: list[str], backend: Backend = "llama-cpp-python") -> str:
    """A one-line human reason from a failed worker's last output lines, per backend."""
    if backend == lsrv.NAME:
        return lsrv.extract_reason(lines)
    return lcp.extract_reason(lines)
