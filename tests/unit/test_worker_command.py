"""What a worker is started with, on either backend: its command line, environment and
failure reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.llm.worker_command import (
    PORT_TAKEN,
    WorkerSpec,
    build_command,
    child_env,
    extract_reason,
)
from services.memory.gguf_estimate import kv_cells


def test_command_line_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = WorkerSpec(
        key="vision",
        model_path=tmp_path / "m.gguf",
        n_gpu_layers=-1,
        n_ctx=4096,
        n_threads=4,
        chat_format="llava-1-5",
        clip_path=tmp_path / "mmproj.gguf",
        extra_args=("--flash_attn", "true"),
    )
    cmd = build_command(s, 8123, python="py")
    flags = dict(zip(cmd[4::2], cmd[5::2], strict=False))
    assert cmd[:2] == ["py", "-c"] and cmd[3] == str(os.getpid())
    assert flags == {
        "--host": "127.0.0.1",
        "--port": "8123",
        "--model": str(tmp_path / "m.gguf"),
        "--model_alias": "vision",
        "--n_gpu_layers": "-1",
        "--n_ctx": "4096",
        "--use_mlock": "false",
        "--interrupt_requests": "false",
        "--n_threads": "4",
        "--chat_format": "llava-1-5",
        "--clip_model_path": str(tmp_path / "mmproj.gguf"),
        "--flash_attn": "true",
    }
    monkeypatch.setenv("PORT", "9")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    env = child_env(s, {"GGML_EXTRA": "x"})
    assert "PORT" not in env and "HTTPS_PROXY" not in env
    assert env["HF_HUB_OFFLINE"] == "1" and env["GGML_EXTRA"] == "x"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    # The CPU rung hides the GPU, so it really allocates no VRAM.
    cpu = WorkerSpec(key="c", model_path=s.model_path, n_gpu_layers=0, n_ctx=512)
    assert child_env(cpu)["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (
            [
                "INFO:     Application startup complete.",
                "ERROR:    [Errno 98] error while attempting to bind on address "
                "('127.0.0.1', 8000): address already in use",
                "INFO:     Waiting for application shutdown.",
            ],
            "ERROR:    [Errno 98] error while attempting to bind on address "
            "('127.0.0.1', 8000): address already in use",
        ),
        (
            [
                "llama_model_loader: - kv   0: general.architecture str = llama",
                "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0:"
                " cudaMalloc failed: out of memory",
                "alloc_tensor_range: failed to allocate CUDA0 buffer of size 9437184000",
                "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
                "Traceback (most recent call last):",
                '  File "x.py", line 1, in <module>',
                "ValueError: Failed to load model from file: /m.gguf",
            ],
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0:"
            " cudaMalloc failed: out of memory"
            " (ValueError: Failed to load model from file: /m.gguf)",
        ),
        ([], "no output"),
    ],
    ids=["port-taken", "cuda-oom", "silent"],
)
def test_extract_reason(lines: list[str], reason: str) -> None:
    assert extract_reason(lines) == reason


def test_llama_server_command_maps_every_setting(tmp_path: Path) -> None:
    s = WorkerSpec(
        key="vision",
        model_path=tmp_path / "m.gguf",
        n_gpu_layers=-1,
        n_ctx=4096,
        n_threads=4,
        chat_format="llava-1-5",
        clip_path=tmp_path / "mmproj.gguf",
        devices=(1, 0),
        tensor_split=(0.75, 0.25),
        backend="llama-server",
        parallel=4,
        binary=tmp_path / "bin" / "llama-server",
    )
    flags = ("--fit", "--no-webui", "--metrics")
    cmd = build_command(s, 8123, python="py", flags=flags)
    assert cmd[:4] == ["py", "-I", "-S", "-c"] and cmd[5] == str(os.getpid())
    assert cmd[6] == str(tmp_path / "bin" / "llama-server")
    args = cmd[7:]
    assert args == [
        "--host", "127.0.0.1",
        "--port", "8123",
        "--model", str(tmp_path / "m.gguf"),
        "--alias", "vision",
        "--n-gpu-layers", "all",  # Edison's -1: every layer and the output layer
        "--ctx-size", "4096",
        "--parallel", "4",
        "--fit", "off",
        "--no-webui",
        "--metrics",
        "--threads", "4",
        # llava-1-5 is a llama-cpp-python chat handler: the template comes from the GGUF
        "--mmproj", str(tmp_path / "mmproj.gguf"),
        "--split-mode", "layer",
        "--tensor-split", "0.75,0.25",
    ]  # fmt: skip
    env = child_env(s)
    assert env["CUDA_VISIBLE_DEVICES"] == "1,0"
    # An older build without --fit / --no-webui: neither is passed.
    cpu = WorkerSpec(
        "fast", tmp_path / "m.gguf", 0, 512, chat_format="llama-3", backend="llama-server"
    )
    old = build_command(cpu, 9, python="py")
    assert "--fit" not in old and "--no-webui" not in old
    assert old[old.index("--n-gpu-layers") + 1] == "0"
    assert old[old.index("--chat-template") + 1] == "llama3"
    assert old[old.index("--parallel") + 1] == "1"
    assert child_env(cpu)["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (
            [
                "0.00.004.152 I srv    load_model: loading model '/tmp/fails/m.gguf'",
                "0.00.004.201 E gguf_init_from_file: failed to open GGUF file '/tmp/fails/m.gguf'"
                " (No such file or directory)",
                "0.00.004.287 E llama_model_load: error loading model: llama_model_loader: "
                "failed to load model from /tmp/fails/m.gguf",
                "0.00.004.300 E llama_model_load_from_file_impl: failed to load model",
                "0.00.004.301 E srv    load_model: failed to load model, '/tmp/fails/m.gguf'",
                "0.00.004.302 I srv    operator(): operator(): cleaning up before exit...",
                "0.00.004.629 E srv  llama_server: exiting due to model loading error",
            ],
            "gguf_init_from_file: failed to open GGUF file '/tmp/fails/m.gguf' (No such file or "
            "directory) (srv  llama_server: exiting due to model loading error)",
        ),
        (
            [
                "0.00.002.617 W srv  llama_server: security: no API key is set",
                "0.00.002.700 E srv  init: couldn't bind HTTP server socket, hostname: "
                "127.0.0.1, port: 8000",
                "0.00.002.710 E srv  llama_server: exiting due to HTTP server error",
            ],
            "srv  init: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8000"
            " (srv  llama_server: exiting due to HTTP server error)",
        ),
        (
            ["0.00.004.629 E srv  llama_server: exiting due to model loading error"],
            "srv  llama_server: exiting due to model loading error",
        ),
        (
            # No log prefix (printed before logging starts): a line naming a cause.
            ["error: invalid argument: --bogus", "usage: llama-server ..."],
            "error: invalid argument: --bogus",
        ),
        (["0.00.001.000 I a", "0.00.002.000 I the last line"], "the last line"),
        ([], "no output"),
    ],
    ids=["missing-model", "port-taken", "generic-only", "no-prefix", "no-cause", "silent"],
)
def test_extract_reason_of_llama_server(lines: list[str], reason: str) -> None:
    assert extract_reason(lines, "llama-server") == reason
    assert bool(PORT_TAKEN.search(" ".join(lines))) == ("bind" in reason)


@pytest.mark.parametrize(
    ("n_ctx", "slots", "cells"),
    [
        (4096, None, 4096),  # llama-cpp-python: one unified cache of n_ctx
        (100, None, 100),
        (4096, 4, 4096),  # 1024 per slot, already a multiple of 256
        (256, 4, 1024),  # 64 per slot, padded to 256: four times the context
        (1000, 3, 512 * 3),  # 333 per slot -> 512
        (4096, 1, 4096),
        (300, 1, 512),
    ],
)
def test_kv_cells_per_slot(n_ctx: int, slots: int | None, cells: int) -> None:
    assert kv_cells(n_ctx, slots) == cells
