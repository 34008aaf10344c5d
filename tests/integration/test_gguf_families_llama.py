"""Per-family GGUF estimates against llama.cpp's own buffer log lines.

Tiny files of each family (tests/gguf_families.py) are really loaded on the CPU, by
llama-cpp-python's bindings (its defaults: one unified cache, full-size window caches,
flash attention as asked) and by llama-server (its defaults: window caches, flash
attention "auto", which is on for the CPU, ``--parallel`` slots). What llama.cpp logs
("model buffer size", "KV buffer size", "RS buffer size", "compute buffer size",
clip's "CPU compute buffer size" and "model size") must be within 10 % of the
estimate, or 0.02 MiB for buffers llama.cpp prints as 0.00-0.04 MiB.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.demo.tiny_gguf import TinyShape, write_tiny_gguf
from services.demo.tiny_mmproj import TinyVisionShape, write_tiny_mmproj
from services.memory.gguf_estimate import estimate, projector_size, read_gguf_info
from tests.gguf_families import FAMILIES, qwen2, write_family
from tests.helpers import free_port, wait_until

MiB = 1024 * 1024
CTX = 4096
_MIB = r"=\s*([\d.]+) MiB"

# One process loads every file in turn (one interpreter start), a marker line between.
LOAD = """
import sys
from llama_cpp import Llama
for path in sys.argv[3:]:
    print("=== load", path, file=sys.stderr, flush=True)
    Llama(model_path=path, n_ctx=int(sys.argv[1]), flash_attn=sys.argv[2] == "1",
          n_gpu_layers=0, n_threads=1, verbose=True).close()
"""
LOAD_PROJECTOR = """
import sys
from llama_cpp import Llama, mtmd_cpp
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=True)
p = mtmd_cpp.mtmd_context_params_default()
p.use_gpu, p.n_threads, p.flash_attn_type = False, 1, int(sys.argv[3])
assert mtmd_cpp.mtmd_init_from_file(sys.argv[2].encode(), llm.model, p)
"""


@dataclass(frozen=True)
class Logged:
    """The buffers one llama.cpp load logged, in MiB."""

    weights: float
    kv: float  # KV cache and recurrent state
    compute: float

    @classmethod
    def parse(cls, log: str) -> Logged:
        compute = re.findall(r"CPU compute buffer size " + _MIB, log)
        assert compute, log[-3000:]
        return cls(
            weights=sum(float(x) for x in re.findall(r"model buffer size " + _MIB, log)),
            kv=sum(float(x) for x in re.findall(r"(?:KV|RS) buffer size " + _MIB, log)),
            compute=float(compute[0]),
        )


def close(got: float, want: float) -> bool:
    return abs(got - want) <= max(0.10 * want, 0.02)


def bindings_logs(models: list[Path], flash_attn: bool) -> dict[Path, str]:
    """llama-cpp-python's log of loading each of ``models``, by model."""
    args = [sys.executable, "-c", LOAD, str(CTX), "1" if flash_attn else "0"]
    run = subprocess.run([*args, *map(str, models)], capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    parts = re.split(r"^=== load (.+)$", run.stderr, flags=re.M)[1:]
    return {Path(path): log for path, log in zip(parts[::2], parts[1::2], strict=True)}


def server_log(binary: Path, model: Path, slots: int, log_path: Path) -> str:
    """llama-server's log up to "listening on" (the model is loaded by then); ``-lv 4``
    lets llama.cpp's own info lines (the buffers) through."""
    cmd = [str(binary), "--model", str(model), "--ctx-size", str(CTX * slots), "-lv", "4"]
    cmd += ["--parallel", str(slots), "--n-gpu-layers", "0", "--threads", "1"]
    cmd += ["--host", "127.0.0.1", "--port", str(free_port())]
    # Why a file, not a pipe: reading a pipe blocks for as long as anything holds its
    # write end; a file is read on a deadline, whatever the server does.
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: "listening on" in log_path.read_text() or proc.poll() is not None,
            timeout=120,
        )
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return log_path.read_text()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("families")
    made = {name: write_family(out / f"{name}.gguf", make()) for name, make in FAMILIES.items()}
    made["split"] = write_family(out / "split" / "q.gguf", qwen2(4), split_max_tensors=12)
    return made


def check(name: str, path: Path, logged: Logged, **kw: object) -> None:
    info = read_gguf_info(path)
    est = estimate(info, -1, CTX, **kw)  # type: ignore[arg-type]
    weights = (sum(info.layer_bytes) + info.other_bytes) / MiB
    assert close(weights, logged.weights), (name, weights, logged)
    assert close(est.kv_vram_mb, logged.kv), (name, est, logged)
    assert close(est.compute_vram_mb, logged.compute), (name, est, logged)


@pytest.fixture(scope="module")
def bindings(files: dict[str, Path]) -> dict[bool, dict[Path, str]]:
    return {fa: bindings_logs(list(files.values()), fa) for fa in (False, True)}


@pytest.mark.parametrize("flash_attn", [False, True], ids=["plain", "flash"])
@pytest.mark.parametrize("name", [*FAMILIES, "split"])
def test_llama_cpp_python_load(
    files: dict[str, Path], bindings: dict[bool, dict[Path, str]], name: str, flash_attn: bool
) -> None:
    logged = Logged.parse(bindings[flash_attn][files[name]])
    check(name, files[name], logged, flash_attn=flash_attn)


@pytest.mark.parametrize("slots", [1, 4])
@pytest.mark.parametrize("name", ["qwen3", "gemma3", "gpt-oss", "deepseek2", "lfm2", "mamba"])
def test_llama_server_load(
    files: dict[str, Path], name: str, slots: int, llama_server_bin: Path, tmp_path: Path
) -> None:
    """llama-server's own defaults: window-sized caches, flash attention on, a graph per
    slot. Each slot gets CTX cells, so the estimate is asked for CTX x slots."""
    log = server_log(llama_server_bin, files[name], slots, tmp_path / "server.log")
    logged = Logged.parse(log)
    info = read_gguf_info(files[name])
    est = estimate(info, -1, CTX * slots, slots=slots, flash_attn=True)
    assert close(est.kv_vram_mb, logged.kv), (name, est, logged)
    assert close(est.compute_vram_mb, logged.compute), (name, est, logged)


@pytest.mark.parametrize(("flash_attn", "mlp"), [(0, 64), (1, 4096)])
def test_projector_against_clip(tmp_path: Path, flash_attn: int, mlp: int) -> None:
    """A ViT-L/14-sized encoder at 336 px (one layer: clip reuses its buffer per layer),
    with a narrow MLP projector and LLaVA-1.5's 4096-wide one."""
    model = write_tiny_gguf(tmp_path / "lm.gguf", TinyShape())
    vit = TinyVisionShape(
        n_embd=1024,
        n_ff=4096,
        n_layer=1,
        n_head=16,
        image_size=336,
        patch_size=14,
        proj_hidden=mlp,
    )
    projector = write_tiny_mmproj(tmp_path / "mmproj.gguf", vit)
    args = [sys.executable, "-c", LOAD_PROJECTOR, str(model), str(projector), str(flash_attn)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    weights = float(re.findall(r"model size:\s*([\d.]+) MiB", run.stderr)[0])
    compute = float(
        re.findall(r"reserve_compute_meta:\s+CPU compute buffer size " + _MIB, run.stderr)[0]
    )
    size = projector_size(projector)
    assert close(size.weights_mb, weights), (size, weights)
    assert close(size.compute_mb, compute), (size, compute)
