"""The GGUF pre-flight estimate, against tiny files whose sizes are worked out by hand."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from services.demo.tiny_gguf import TinyShape, write_tiny_gguf
from services.errors import ModelLoadFailed
from services.memory.gguf_estimate import (
    GGUFInfo,
    InvalidModelFile,
    estimate,
    ladder,
    read_gguf_info,
)

MiB = 1024 * 1024
# tiny_gguf's vocabulary: <unk> <s> </s>, 256 byte tokens, then "▁", 94 printable
# characters and 10 "▁word" pieces.
N_VOCAB = 3 + 256 + (1 + 94 + 10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> GGUFInfo:
    """n_embd 64, n_ff 128, 2 layers, 4 heads, 2 KV heads, context 256, f16."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", TinyShape(), seed=1)
    return read_gguf_info(path)


# ---- reading the header ------------------------------------------------------------
def test_header_of_the_f16_model(tiny: GGUFInfo) -> None:
    e, ff, kv_dim = 64, 128, 2 * (64 // 4)  # kv_dim = n_head_kv x head_dim = 32
    f16, f32 = 2, 4
    # Per block: 2 f32 norms, q and o (e x e), k and v (kv_dim x e), gate/up/down (ff x e).
    layer = 2 * e * f32 + 2 * e * e * f16 + 2 * kv_dim * e * f16 + 3 * ff * e * f16
    assert layer == 74240
    token_embd = N_VOCAB * e * f16
    output = N_VOCAB * e * f16 + e * f32  # output.weight + output_norm

    assert (tiny.arch, tiny.n_layer, tiny.n_ctx_train) == ("llama", 2, 256)
    assert (tiny.n_embd, tiny.n_head, tiny.n_head_kv, tiny.head_dim) == (64, 4, 2, 16)
    assert tiny.n_vocab == N_VOCAB == 364
    assert tiny.layer_bytes == (layer, layer)
    assert tiny.other_bytes == token_embd + output
    assert tiny.output_bytes == output
    assert tiny.tied_output_bytes == 0
    assert tiny.file_bytes == tiny.path.stat().st_size
    # The tensors are most of the file; the rest is metadata, vocabulary and padding.
    assert 0 < tiny.file_bytes - (2 * layer + token_embd + output) < 20_000


def test_header_of_an_f32_model_with_three_layers(tmp_path: Path) -> None:
    shape = TinyShape(
        n_embd=32, n_ff=64, n_layer=3, n_head=2, n_head_kv=1, n_ctx_train=128, f16=False
    )
    info = read_gguf_info(write_tiny_gguf(tmp_path / "f32.gguf", shape, seed=2))
    e, ff, kv_dim, f32 = 32, 64, 1 * (32 // 2), 4
    layer = 2 * e * f32 + 2 * e * e * f32 + 2 * kv_dim * e * f32 + 3 * ff * e * f32
    assert layer == 37120
    assert info.layer_bytes == (layer,) * 3
    assert (info.n_head_kv, info.head_dim, info.n_ctx_train) == (1, 16, 128)
    assert info.output_bytes == N_VOCAB * e * f32 + e * f32
    assert info.other_bytes == N_VOCAB * e * f32 + info.output_bytes


def _write_gguf(path: Path, *, keys: dict[str, int], tensors: dict[str, np.ndarray]) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in keys.items():
        w.add_uint32(f"llama.{k}", v)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tied_output_is_a_copy_of_token_embd_on_the_gpu(tmp_path: Path) -> None:
    keys = {
        "block_count": 1,
        "context_length": 64,
        "embedding_length": 8,
        "attention.head_count": 2,
    }
    f16 = np.float16
    tensors = {
        "token_embd.weight": np.zeros((10, 8), f16),  # vocabulary 10, no output.weight
        "blk.0.attn_q.weight": np.zeros((8, 8), f16),
        "output_norm.weight": np.ones(8, np.float32),
    }
    info = read_gguf_info(_write_gguf(tmp_path / "tied.gguf", keys=keys, tensors=tensors))
    embd, norm, block = 10 * 8 * 2, 8 * 4, 8 * 8 * 2
    assert info.n_vocab == 10  # from token_embd's shape: no tokenizer in this file
    assert info.n_head_kv == 2 and info.head_dim == 4  # defaults: n_head, n_embd / n_head
    assert info.tied_output_bytes == embd
    assert info.output_bytes == embd + norm
    est = estimate(info, -1, 64)
    assert est.weights_vram_mb * MiB == block + embd + norm
    # token_embd itself stays on the CPU; only output_norm moved.
    host_staging = 4 * 64 * 3 * 8  # 4 x batch (clamped to n_ctx) x 3 x n_embd
    assert est.ram_mb * MiB == embd + host_staging


@pytest.mark.parametrize(
    "content",
    [b"hello, I am not a model\n", b"GGUF\x03\x00\x00\x00" + b"\xff" * 40],
    ids=["text", "bad-header"],
)
def test_a_file_that_is_not_gguf_is_invalid(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidModelFile) as err:
        read_gguf_info(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ModelLoadFailed)
    assert err.value.code == "invalid_model_file"


def test_a_missing_file_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFile, match="not found"):
        read_gguf_info(tmp_path / "nowhere.gguf")


def test_a_truncated_file_is_invalid(tmp_path: Path, tiny: GGUFInfo) -> None:
    data = tiny.path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidModelFile):
            read_gguf_info(path)


def test_a_file_without_block_count_is_invalid(tmp_path: Path) -> None:
    keys = {"context_length": 64, "embedding_length": 8, "attention.head_count": 2}
    path = _write_gguf(
        tmp_path / "nokey.gguf", keys=keys, tensors={"token_embd.weight": np.zeros((4, 8))}
    )
    with pytest.raises(InvalidModelFile, match="llama.block_count"):
        read_gguf_info(path)


# ---- the estimate --------------------------------------------------------------------
LAYER = 74240  # bytes of one block of the tiny f16 model (test_header_of_the_f16_model)
OTHER = 364 * 64 * 2 * 2 + 64 * 4  # token_embd + output.weight + output_norm
OUTPUT = 364 * 64 * 2 + 64 * 4  # output.weight + output_norm


def _full_graph(b: int, c: int, e: int = 64, h: int = 4, v: int = 364) -> int:
    return max(4 * b * (1 + 4 * e + c * (1 + h)), 4 * b * (e + v))


def test_estimate_with_all_layers_on_the_gpu(tiny: GGUFInfo) -> None:
    kv_per_layer = 2 * 256 * 2 * 16 * 2  # K and V x n_ctx x n_head_kv x head_dim x f16
    assert kv_per_layer == 32768
    # Batch 512 is clamped to n_ctx 256; the attention term wins over the logits term.
    compute = 4 * 256 * (1 + 4 * 64 + 256 * (1 + 4))
    assert compute == _full_graph(256, 256) == 1_573_888
    for layers in (-1, 3, 99):
        est = estimate(tiny, layers, 256)
        assert est.n_gpu_layers == 3  # all = n_layer + 1: every block and the output
        assert est.weights_vram_mb * MiB == 2 * LAYER + OUTPUT
        assert est.kv_vram_mb * MiB == 2 * kv_per_layer
        assert est.compute_vram_mb * MiB == compute
        assert est.vram_mb * MiB == 2 * LAYER + OUTPUT + 2 * kv_per_layer + compute
        # token_embd stays on the CPU, plus a staging buffer of 4 x batch x 3 x n_embd.
        assert est.ram_mb * MiB == 364 * 64 * 2 + 4 * 256 * 3 * 64


def test_estimate_with_every_block_but_not_the_output(tiny: GGUFInfo) -> None:
    est = estimate(tiny, 2, 256)
    kv = 2 * (2 * 256 * 2 * 16 * 2)
    # Ollama's partial-offload graph, b = 256, c = 256, e = 64, h = 4, hkv = 2, d = 16:
    partial = 4 * 256 * 64 + max(
        4 * 256 * (1 + 64 + 256) + 64 * 64 * 9 // 16 + 4 * 256 * (256 * 4 + 16 * 2),
        4 * 256 * (64 + 364) + 64 * 364 * 105 // 128,
    )
    assert partial == 1_477_888
    assert est.n_gpu_layers == 2
    assert est.weights_vram_mb * MiB == 2 * LAYER  # the output stays on the CPU
    assert est.vram_mb * MiB == 2 * LAYER + kv + partial
    assert est.ram_mb * MiB == OTHER + partial


def test_estimate_with_one_layer_puts_the_last_block_on_the_gpu(tiny: GGUFInfo) -> None:
    est = estimate(tiny, 1, 128, n_batch=64, kv_bytes_per_elem=1)
    # llama_context pads n_ctx to 256 cells (measured: n_ctx 128 logs "256 cells").
    kv_per_layer = 2 * 256 * 2 * 16 * 1  # a q8-sized KV cache
    partial = 4 * 64 * 64 + max(
        4 * 64 * (1 + 64 + 256) + 64 * 64 * 9 // 16 + 4 * 256 * (64 * 4 + 16 * 2),
        4 * 64 * (64 + 364) + 64 * 364 * 105 // 128,
    )
    assert est.weights_vram_mb * MiB == LAYER
    assert est.kv_vram_mb * MiB == kv_per_layer
    assert est.compute_vram_mb * MiB == partial
    assert est.ram_mb * MiB == LAYER + OTHER + kv_per_layer + partial


def test_estimate_on_the_cpu_uses_no_vram(tiny: GGUFInfo) -> None:
    est = estimate(tiny, 0, 256)
    assert (est.weights_vram_mb, est.kv_vram_mb, est.compute_vram_mb, est.vram_mb) == (0, 0, 0, 0)
    kv = 2 * (2 * 256 * 2 * 16 * 2)
    assert est.ram_mb * MiB == 2 * LAYER + OTHER + kv + _full_graph(256, 256)


def test_llama_server_slots_hold_their_padded_share_of_the_context(tiny: GGUFInfo) -> None:
    """--parallel 4 over n_ctx 256: four slots of 64 tokens, each padded to 256 cells."""
    kv_dim, f16, layers = 32, 2, 2
    one = estimate(tiny, -1, 256)
    four = estimate(tiny, -1, 256, slots=4)
    assert one.kv_vram_mb * MiB == 2 * 256 * kv_dim * f16 * layers
    assert four.kv_vram_mb == 4 * one.kv_vram_mb
    # Each slot's tokens attend to their own stream: the graph is one slot's 256 cells,
    # not all four slots' 1024 (issue 19: it was sized for all, 3.6x too high).
    assert four.compute_vram_mb == one.compute_vram_mb
    assert four.weights_vram_mb == one.weights_vram_mb
    # A context that divides into multiples of 256 costs what one cache of it costs.
    assert estimate(tiny, -1, 256, slots=1).kv_vram_mb == one.kv_vram_mb


def test_context_is_clamped_to_the_trained_context(tiny: GGUFInfo) -> None:
    assert estimate(tiny, -1, 100_000).n_ctx == 256
    assert estimate(tiny, -1, 0).n_ctx == 256  # 0 = the model's own context
    assert estimate(tiny, -1, 100_000) == estimate(tiny, -1, 256)
    # 128 is still asked for, but llama_context pads it to 256 cells (llama-context.cpp).
    assert estimate(tiny, -1, 128).n_ctx == 128
    assert estimate(tiny, -1, 128).kv_vram_mb * MiB == 2 * (2 * 256 * 2 * 16 * 2)


# ---- the ladder ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "layers", "ctxs"),
    [
        # all layers configured; fallbacks given out of order
        ((-1, 4096, [16, 24, 0], [1024, 2048], 32, 8192), [33, 24, 16, 0], [4096, 2048, 1024]),
        # clamping, then deduplication: 99, -1, 40 and 33 are all "all" = 33
        (
            (99, 100_000, [-1, 40, 33, 12, 12], [9000, 8192, 2048, 2048], 32, 8192),
            [33, 12, 0],
            [8192, 2048],
        ),
        # 0 (CPU) is added when the configuration forgot it
        ((20, 2048, [10], [], 32, 8192), [20, 10, 0], [2048]),
        # fallbacks only shrink: more layers or a longer context than configured are dropped
        ((16, 2048, [32, 8], [4096, 1024], 32, 8192), [16, 8, 0], [2048, 1024]),
        # n_layer itself (every block, output on the CPU) differs from "all"
        ((-1, 0, [32], [], 32, 8192), [33, 32, 0], [8192]),
        # configured for the CPU: nothing else to try
        ((0, 512, [8], [256], 32, 8192), [0], [512, 256]),
    ],
)
def test_ladder(args: tuple, layers: list[int], ctxs: list[int]) -> None:
    rungs = ladder(*args)
    assert rungs == [(n, c) for n in layers for c in ctxs]
    assert rungs[-1][0] == 0
    assert len(set(rungs)) == len(rungs)


# A model of round numbers: 32 blocks of 1 GiB, output 512 MiB, Llama-2-7B-like heads.
BIG = GGUFInfo(
    path=Path("big.gguf"),
    arch="llama",
    n_layer=32,
    n_ctx_train=8192,
    n_embd=4096,
    n_head=32,
    n_head_kv=8,
    head_dim=128,
    n_vocab=32000,
    file_bytes=33 * 1024 * MiB,
    layer_bytes=(1024 * MiB,) * 32,
    other_bytes=1024 * MiB,
    output_bytes=512 * MiB,
)
BIG_RUNGS = ladder(-1, 8192, [16], [4096], 32, 8192)


def test_estimates_of_the_round_model() -> None:
    """The hand figures behind the start-rung table in test_placement.py."""
    assert BIG_RUNGS == [(33, 8192), (33, 4096), (16, 8192), (16, 4096), (0, 8192), (0, 4096)]
    kv_8k = 2 * 8192 * 8 * 128 * 2 / MiB  # 32 MiB per layer
    full_8k = 4 * 512 * (1 + 4 * 4096 + 8192 * 33) / MiB  # 560 MiB (+ 2 KiB)
    full_4k = 4 * 512 * (1 + 4 * 4096 + 4096 * 33) / MiB  # 296 MiB
    partial_8k = (
        4 * 512 * 4096 + 4 * 512 * (1 + 4096 + 8192) + 4096 * 4096 * 9 // 16
        + 4 * 8192 * (512 * 32 + 128 * 8)
    ) / MiB  # fmt: skip
    partial_4k = (
        4 * 512 * 4096 + 4 * 512 * (1 + 4096 + 4096) + 4096 * 4096 * 9 // 16
        + 4 * 4096 * (512 * 32 + 128 * 8)
    ) / MiB  # fmt: skip
    expected = [
        32 * 1024 + 512 + 32 * kv_8k + full_8k,  # 34864
        32 * 1024 + 512 + 32 * kv_8k / 2 + full_4k,  # 34088
        16 * 1024 + 16 * kv_8k + partial_8k,  # 17481
        16 * 1024 + 16 * kv_8k / 2 + partial_4k,  # 16945
        0,
        0,
    ]
    got = [estimate(BIG, n, c).vram_mb for n, c in BIG_RUNGS]
    assert got == pytest.approx(expected)
    assert [round(x) for x in got] == [34864, 34088, 17481, 16945, 0, 0]
