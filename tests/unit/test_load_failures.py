"""A failed worker start is classified once (services/llm/failures.py): only a failure for
want of memory walks the load ladder. Table-driven from the lines llama.cpp, its GPU
backends and llama-cpp-python really print (decision logic given text: no worker runs)."""

from __future__ import annotations

import signal

import pytest

from services.llm.failures import classify

OOM_CUDA = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 512.00 MiB on device 0: "
    "cudaMalloc failed: out of memory"
)


@pytest.mark.parametrize(
    ("lines", "rc", "kind"),
    [
        ([OOM_CUDA, "ValueError: Failed to create llama_context"], 1, "memory"),
        (
            [
                "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
                "llama_model_load_from_file_impl: failed to load model",
            ],
            1,
            "memory",
        ),
        (
            ["ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 1048576000"],
            1,
            "memory",
        ),
        (
            ["llama_init_from_model: failed to initialize the context: std::bad_alloc"],
            134,
            "memory",
        ),
        (
            [
                "ggml_vulkan: Device memory allocation of size 123 failed.",
                "vk::Device::allocateMemory: ErrorOutOfDeviceMemory",
            ],
            1,
            "memory",
        ),
        # The kernel's OOM killer says nothing: a SIGKILL nobody asked for.
        (
            ["load_tensors: loading model tensors, this can take a while..."],
            -signal.SIGKILL,
            "memory",
        ),
        (
            [
                "llama_model_load: error loading model: error loading model architecture: "
                "unknown model architecture: 'edisonnet'",
                "llama_model_load_from_file_impl: failed to load model",
            ],
            1,
            "model",
        ),
        (
            ["gguf_init_from_file_impl: invalid magic characters: 'not ', expected 'GGUF'"],
            1,
            "model",
        ),
        (
            [
                "llama_model_load: error loading model: tensor 'blk.0.ffn_up.weight' data is "
                "not within the file bounds, model is corrupted or incomplete"
            ],
            1,
            "model",
        ),
        (["ValueError: Model path does not exist: /models/x.gguf"], 1, "model"),
        # Nothing recognisable: not walked on (a crash would crash at every rung).
        (["Segmentation fault"], -signal.SIGSEGV, "crash"),
        ([], 1, "crash"),
    ],
)
def test_a_failed_start_is_classified(lines: list[str], rc: int, kind: str) -> None:
    failure = classify(lines, "why", returncode=rc)
    assert failure.kind == kind
    assert failure.walks is (kind == "memory")


def test_timeout_and_missing_file_are_not_walked_on() -> None:
    # A timed-out start that printed an allocation line is still a timeout: every smaller
    # rung would wait the whole load_timeout_s again.
    assert classify([OOM_CUDA], "slow", returncode=None, timed_out=True).kind == "timeout"
    assert classify([], "gone", returncode=1, missing_file=True).kind == "model"
