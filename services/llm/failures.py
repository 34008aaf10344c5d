"""Why a worker failed to start, as a type the load ladder decides on.

The ladder walks down (fewer GPU layers, a shorter context) only when a start failed
for want of memory: any other failure would fail again at every rung, each attempt
costing a worker start and up to ``models.load_timeout_s``. So a failed start is
classified once, here, from what the worker printed and how it ended:

- ``memory``: an allocation failed (llama.cpp's ``cudaMalloc failed: out of memory``,
  ``failed to allocate ... buffer``, ``unable to allocate``, ``std::bad_alloc``...), or the
  process was killed by SIGKILL without Edison asking (the kernel's OOM killer);
- ``model``: the file cannot be loaded by this llama.cpp at any size (missing, corrupt,
  an unknown or unsupported architecture, a tensor of the wrong shape);
- ``backend``: the worker program itself cannot run (no llama-server binary);
- ``timeout``: not ready within ``models.load_timeout_s``;
- ``crash``: anything else (a failure this module does not recognise is not walked on).

llama.cpp says these things only in its log, so its lines are read here, in this one
place; everything else decides on :class:`LoadFailure`, never on message text.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

FailureKind = Literal["memory", "model", "backend", "timeout", "crash"]

# What llama.cpp, ggml's backends, the CUDA/HIP/Vulkan/Metal runtimes and the C++ runtime
# print when an allocation fails (both backends print llama.cpp's lines).
_MEMORY = re.compile(
    r"out of memory|cudaMalloc failed|hipMalloc failed|failed to allocate|unable to allocate|"
    r"cannot allocate memory|could not allocate|alloc(ating)?[^\n]*failed|std::bad_alloc|"
    r"ErrorOutOfDeviceMemory|ErrorOutOfHostMemory|insufficient memory|not enough memory|"
    r"CUBLAS_STATUS_ALLOC_FAILED|MemoryError",
    re.IGNORECASE,
)
# What it prints when the file, not the memory, is the problem.
_MODEL = re.compile(
    r"unknown model architecture|unknown architecture|unsupported model|not supported|"
    r"unsupported|invalid magic|not within the file bounds|corrupted or incomplete|"
    r"model path does not exist|clip model path does not exist|no such file|failed to open|"
    r"wrong number of tensors|missing tensor|wrong shape|key not found|invalid ggml type|"
    r"failed to read|tensor data is not within|gguf_init_from_file|invalid model|"
    r"error loading model (architecture|hyperparameters|vocabulary)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class LoadFailure:
    """Why one worker start failed: ``kind`` decides, ``reason`` tells people."""

    kind: FailureKind
    reason: str

    @property
    def walks(self) -> bool:
        """True when a smaller rung may succeed: only a failure for want of memory."""
        return self.kind == "memory"


def classify(
    lines: Iterable[str],
    reason: str,
    *,
    returncode: int | None,
    timed_out: bool = False,
    missing_file: bool = False,
) -> LoadFailure:
    """The kind of a failed start, from the worker's last output ``lines``, its exit code
    and what the supervisor saw; ``reason`` is the one-line summary kept with it."""
    if timed_out:
        return LoadFailure("timeout", reason)
    if missing_file:
        return LoadFailure("model", reason)
    recent = [ln for ln in lines if ln.strip()][-60:]
    if any(_MEMORY.search(ln) for ln in recent):
        return LoadFailure("memory", reason)
    if any(_MODEL.search(ln) for ln in recent):
        return LoadFailure("model", reason)
    if returncode == -signal.SIGKILL:
        why = "killed by SIGKILL while loading (the kernel's out-of-memory killer?)"
        return LoadFailure("memory", f"{why}: {reason}" if reason else why)
    return LoadFailure("crash", reason)
