"""Telling CUDA out-of-memory apart from other failures (torch's real exception types)."""

from __future__ import annotations

import pytest

from services.generation.pipelines import is_cuda_oom

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory."), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("CUDA out of memory"), False),
        (None, False),
    ],
)
def test_is_cuda_oom(exc, expected):
    assert is_cuda_oom(exc) is expected


def test_is_cuda_oom_follows_the_cause_chain():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        except RuntimeError as inner:
            raise KeyError("wrapped") from inner
    except KeyError as outer:
        assert is_cuda_oom(outer) is True
