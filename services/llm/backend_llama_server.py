"""The llama-server backend: llama.cpp's own C++ HTTP server as a worker.

What ``llama-server`` (the llama.cpp vendored by llama-cpp-python 0.3.36, built by
``scripts/build_llama_server.sh``) does, read from its source and measured here:

- It binds its port *before* it loads the model and answers every endpoint but the
  web UI's with 503 ``Loading model`` until the model is loaded; ``GET /health`` and
  ``GET /v1/models`` answer 200 once it serves. We poll ``/v1/models``, as for
  llama_cpp.server, because it names the model by our ``--alias``: the answer comes
  from our process.
- A port it cannot bind ends it at once with status 1 (``couldn't bind HTTP server
  socket``); a model it cannot load with status 1 after ``exiting due to model loading
  error``, the cause a few lines earlier (``llama_model_load: error loading model: ...``).
- ``--parallel N`` (explicit, so not its "auto") gives N slots over a KV cache that is
  *not* unified: each slot gets ``n_ctx / N`` cells rounded up to a multiple of 256
  (llama_context: ``GGML_PAD(n_ctx / n_seq_max, 256)``), the cache holds N times that,
  and a slot is capped at the trained context. ``GET /props`` says the slot context.
- ``--fit on`` (its default) would shrink the context and GPU layers to what it finds
  free; Edison's ladder decides that, so it is turned off.
- Environment variables ``LLAMA_ARG_*`` set any of its options; the child's
  environment is allow-listed (``child_env``), so none leak in.
- ``-ngl`` takes a number, ``auto`` or ``all``: Edison's -1 (all layers and the output
  layer) is ``all``.
- On SIGTERM it stops its HTTP server and exits 0.

Being a C++ binary it cannot set its own parent-death signal, so a tiny Python
wrapper (EXEC_WRAPPER) sets it and then ``execv``s the binary: PR_SET_PDEATHSIG
survives execve for a binary that is not set-user-ID.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from services.llm.backend_llama_cpp_python import PDEATHSIG_PRELUDE
from services.settings import default_llama_server

if TYPE_CHECKING:
    from services.llm.worker_command import WorkerSpec

NAME = "llama-server"
PROBE_TIMEOUT_S = 20.0

# llama_cpp.server chat formats whose llama-server built-in template has another name.
# Names not listed are passed as they are (llama-server's own names, e.g. ``phi3``);
# the vision handlers of llama-cpp-python take the template from the GGUF file.
CHAT_TEMPLATES: dict[str, str | None] = {
    "llama-2": "llama2",
    "llama-3": "llama3",
    "mistral-instruct": "mistral-v1",
    "qwen": "chatml",
    "llava-1-5": None,
    "llava-1-6": None,
    "mtmd": None,
    "qwen2.5-vl": None,
    "minicpm-v-2.6": None,
    "moondream": None,
    "nanollava": None,
    "llama-3-vision-alpha": None,
}

# Optional flags used when this build knows them (read from ``--help``).
OPTIONAL_FLAGS = ("--fit", "--no-webui", "--metrics", "--cache-ram")

_CAUSE = re.compile(
    r"error|invalid|fail|unable|cannot|couldn't|out of memory|not within|no such file",
    re.IGNORECASE,
)
# Lines that say that something failed, not what: kept as the context of the cause.
_GENERIC = re.compile(r"exiting due to|failed to load model|cleaning up", re.IGNORECASE)
# llama.cpp's log prefix: seconds since start (0.00.004.546), then the level (I W E D).
_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([IWED]) ")

# Sets the parent-death signal (PDEATHSIG_PRELUDE, shared with backend_llama_cpp_python's
# BOOTSTRAP, which says why), checks the parent is still the one that started it, then
# becomes llama-server. -I -S: no site packages, no PYTHON* variables, a fast start.
EXEC_WRAPPER = (
    PDEATHSIG_PRELUDE
    + """\
try:
    os.execv(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.exit(f"edison: cannot run llama-server {sys.argv[2]}: {exc.strerror}")
"""
)


def default_binary() -> Path:
    """The llama-server ``make install`` builds: bin/llama-server of this Python's venv."""
    return default_llama_server()


@dataclass(frozen=True)
class ServerBinary:
    """What a llama-server executable is: its version, GPU offload and optional flags."""

    path: str
    usable: bool
    version: str | None = None  # from ``--version``, e.g. "0.5.0-dev (build 1, commit 0c1e570)"
    # ``--list-devices``: the GPUs it can offload to (built with CUDA and one is visible).
    devices: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # the OPTIONAL_FLAGS this build knows
    reason: str | None = None  # why it is not usable

    @property
    def gpu_offload(self) -> bool:
        """True when this build lists a GPU device it can offload layers to."""
        return bool(self.devices)


def binary_problem(path: Path) -> str | None:
    """Why ``path`` cannot be run as llama-server; None when it can."""
    if not path.exists():
        return f"llama-server binary not found: {path} (build it with `make install`)"
    if not path.is_file():
        return f"llama-server binary is not a file: {path}"
    if not os.access(path, os.X_OK):
        return f"llama-server binary is not executable: {path}"
    return None


def inspect_binary(path: Path) -> ServerBinary:
    """Run ``--version``, ``--help`` and ``--list-devices`` once per build (blocking).

    Cached by path, size and modification time: a rebuilt binary is read again.
    """
    problem = binary_problem(path)
    if problem is not None:
        return ServerBinary(str(path), False, reason=problem)
    st = path.stat()
    return _inspect(str(path), st.st_size, st.st_mtime_ns)


def _run(path: str, arg: str) -> str:
    keep = ("PATH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    out = subprocess.run(
        [path, arg],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=PROBE_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )
    return out.stdout + out.stderr


@lru_cache(maxsize=8)
def _inspect(path: str, size: int, mtime_ns: int) -> ServerBinary:
    del size, mtime_ns  # the cache key: a rebuilt binary is inspected again
    try:
        version_text = _run(path, "--version")
        help_text = _run(path, "--help")
        devices_text = _run(path, "--list-devices")
    except (OSError, subprocess.SubprocessError) as exc:
        return ServerBinary(path, False, reason=f"llama-server {path} does not run: {exc}")
    version = next(
        (
            ln.split("version:", 1)[1].strip()
            for ln in version_text.splitlines()
            if "version:" in ln
        ),
        None,
    )
    if version is None:
        last = next((ln for ln in reversed(version_text.splitlines()) if ln.strip()), "")
        return ServerBinary(path, False, reason=f"{path} is not llama-server: {last.strip()}")
    flags = [f for f in OPTIONAL_FLAGS if re.search(rf"(^|[\s,]){re.escape(f)}\b", help_text, re.M)]
    devices = []
    for line in devices_text.splitlines():
        m = re.match(r"^\s+(\w+\d+): (.+)$", line)
        if m:
            devices.append(f"{m.group(1)}: {m.group(2).strip()}")
    return ServerBinary(path, True, version, devices, flags)


def chat_template(chat_format: str | None) -> str | None:
    """llama-server's ``--chat-template`` for a llama_cpp.server chat format."""
    if chat_format is None:
        return None
    return CHAT_TEMPLATES.get(chat_format, chat_format)


def build_command(
    spec: WorkerSpec, port: int, python: str = sys.executable, flags: tuple[str, ...] = ()
) -> list[str]:
    """The command line of a llama-server worker serving ``spec`` on 127.0.0.1:port.

    ``python -I -S -c EXEC_WRAPPER PARENT_PID BINARY --host ...``; ``flags``: the
    OPTIONAL_FLAGS the binary knows (see :func:`inspect_binary`).
    """
    binary = str(spec.binary or default_binary())
    layers = "all" if spec.n_gpu_layers < 0 else str(spec.n_gpu_layers)
    cmd = [
        python,
        "-I",
        "-S",
        "-c",
        EXEC_WRAPPER,
        str(os.getpid()),
        binary,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        spec.model_path.as_posix(),
        "--alias",
        spec.key,
        "--n-gpu-layers",
        layers,
        "--ctx-size",
        str(spec.n_ctx),
        "--parallel",
        str(spec.parallel),
    ]
    if "--fit" in flags:
        cmd += ["--fit", "off"]  # Edison's ladder decides layers and context
    if "--no-webui" in flags:
        cmd += ["--no-webui"]
    if "--metrics" in flags:
        cmd += ["--metrics"]
    if "--cache-ram" in flags and spec.cache_ram_mb is not None:
        # Its prompt cache grows in RAM after the load (8192 MiB by default): capped, and
        # the cap is counted in the load's RAM need.
        cmd += ["--cache-ram", str(spec.cache_ram_mb)]
    if spec.n_threads is not None:
        cmd += ["--threads", str(spec.n_threads)]
    template = chat_template(spec.chat_format)
    if template is not None:
        cmd += ["--chat-template", template]
    if spec.clip_path is not None:
        cmd += ["--mmproj", str(spec.clip_path)]
    if spec.tensor_split is not None:
        split = ",".join(f"{x:g}" for x in spec.tensor_split)
        cmd += ["--split-mode", "layer", "--tensor-split", split]
    return cmd + list(spec.extra_args)


def tokenize_request(text: str) -> tuple[str, dict[str, object]]:
    """Where and what to post to count ``text``'s tokens, BOS included."""
    return "/tokenize", {"content": text, "add_special": True}


def token_count(answer: dict[str, object]) -> int:
    tokens = answer["tokens"]
    assert isinstance(tokens, list)
    return len(tokens)


def _split_level(line: str) -> tuple[str, str]:
    """(level, text) of a log line: ``0.00.004.546 E text`` is ("E", "text"); a line
    printed without llama.cpp's prefix (argument warnings) is ("", the line)."""
    m = _LOG_PREFIX.match(line)
    return (m.group(1), line[m.end() :].strip()) if m else ("", line.strip())


def extract_reason(lines: list[str]) -> str:
    """A one-line human reason from llama-server's last output lines.

    The first error line (level ``E`` in its log, else a line naming a cause) in the last
    40, with the line that ended the process (``exiting due to model loading error``)
    after it; without the timestamps. For people and logs only: nothing decides on it.
    """
    recent = [_split_level(ln) for ln in lines[-40:] if ln.strip()]
    errors = [text for level, text in recent if level == "E"]
    if not errors:
        errors = [text for level, text in recent if level != "I" and _CAUSE.search(text)]
    specific = [t for t in errors if not _GENERIC.search(t)]
    ending = next((t for t in reversed(errors) if "exiting due to" in t), "")
    if specific:
        cause = specific[0]
        return f"{cause} ({ending})" if ending else cause
    if errors:
        return errors[-1]
    return recent[-1][1] if recent else "no output"
