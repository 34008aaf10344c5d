"""What a worker is started with: its command line, environment and failure reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.llm.worker_command import WorkerSpec, build_command, child_env, extract_reason


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
