"""Per-family GGUF estimates, exact by construction from llama.cpp's own formulas.

The files are tiny headers of each family (tests/gguf_families.py); the expected
figures are worked out here by hand from the llama.cpp source vendored by
llama-cpp-python 0.3.36, cited in each test. The same files are loaded by llama.cpp
itself and compared with its buffer log lines in
tests/integration/test_gguf_families_llama.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.demo.tiny_mmproj import TinyVisionShape, write_tiny_mmproj
from services.memory.gguf_estimate import (
    GGUFInfo,
    InvalidModelFile,
    estimate,
    projector_mb,
    projector_size,
    read_gguf_info,
)
from tests.gguf_families import FAMILIES, gemma3, qwen2, tensor_bytes, write_family

MiB = 1024 * 1024
CTX = 4096
SERVER = {"slots": 1, "flash_attn": True}  # llama-server: window caches, flash attention
PYTHON = {"flash_attn": False}  # llama-cpp-python: one unified cache, full-size windows


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("families")
    return {name: write_family(out / f"{name}.gguf", make()) for name, make in FAMILIES.items()}


@pytest.fixture(scope="module")
def infos(files: dict[str, Path]) -> dict[str, GGUFInfo]:
    return {name: read_gguf_info(path) for name, path in files.items()}


def kv_bytes(info: GGUFInfo, **kw: object) -> float:
    return estimate(info, -1, CTX, **kw).kv_vram_mb * MiB  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_weights_are_every_tensor_of_the_file(infos: dict[str, GGUFInfo], name: str) -> None:
    info = infos[name]
    assert sum(info.layer_bytes) + info.other_bytes == sum(tensor_bytes(FAMILIES[name]()))
    assert info.arch == FAMILIES[name]().arch


# K and V per cell (elements) x cells x 2 bytes (f16), per layer.
@pytest.mark.parametrize(
    ("name", "server", "python"),
    [
        # llama_kv_cache: n_head_kv x head_dim for K and for V in every layer.
        ("qwen2", 2 * CTX * (64 + 64) * 2, 2 * CTX * (64 + 64) * 2),
        # key_length 64 x 4 KV heads, not n_embd / n_head.
        ("qwen3", 2 * CTX * (256 + 256) * 2, 2 * CTX * (256 + 256) * 2),
        # gemma2 slides every other layer (load_swa_pattern(ml, 2): layers 0 and 2). The
        # window cache (llama_kv_cache_iswa) holds GGML_PAD(min(4096, 512 + 512), 256) =
        # 1024 cells on llama-server; llama-cpp-python asks swa_full (its default
        # llama_context_default_params), so 4096 cells there.
        ("gemma2", (2 * CTX + 2 * 1024) * 256 * 2, 4 * CTX * 256 * 2),
        # gemma3: five window layers, then a global one (load_swa_pattern(ml, 6)).
        ("gemma3", (CTX + 5 * 1024) * 256 * 2, 6 * CTX * 256 * 2),
        # phi3 ignores its sliding_window key ("Phi SWA is currently disabled").
        ("phi3", 2 * CTX * (256 + 256) * 2, 2 * CTX * (256 + 256) * 2),
        # gpt-oss: window 128, every other layer: GGML_PAD(128 + 512, 256) = 768 cells.
        ("gpt-oss", (2 * CTX + 2 * 768) * 256 * 2, 4 * CTX * 256 * 2),
        # MLA: K only, kv_lora_rank + rope = 80 per cell, one KV head (has_v = !is_mla).
        ("deepseek2", 2 * CTX * 80 * 2, 2 * CTX * 80 * 2),
        # lfm2: KV only in the attention layers (head_count_kv 4 x 32); each conv layer
        # keeps n_embd x (l_cache - 1) f32 of state per sequence (llama_hparams::n_embd_r).
        ("lfm2", 2 * CTX * 256 * 2 + 2 * 256 * 2 * 4, 2 * CTX * 256 * 2 + 2 * 256 * 2 * 4),
        # Mamba: no KV; (d_conv - 1) x d_inner + d_state x d_inner f32 per layer.
        ("mamba", 2 * (3 * 256 + 16 * 256) * 4, 2 * (3 * 256 + 16 * 256) * 4),
    ],
)
def test_kv_of_each_family(infos: dict[str, GGUFInfo], name: str, server: int, python: int) -> None:
    assert kv_bytes(infos[name], **SERVER) == server
    assert kv_bytes(infos[name], **PYTHON) == python


def test_window_layers_from_the_pattern_key(tmp_path: Path) -> None:
    """A per-layer bool array in sliding_window_pattern wins over the family's period
    (llama_model_base::load_swa_pattern reads the array first)."""
    pattern = [True, False, True, False, True, False]
    info = read_gguf_info(write_family(tmp_path / "g3.gguf", gemma3(pattern=pattern)))
    assert kv_bytes(info, **SERVER) == (3 * CTX + 3 * 1024) * 256 * 2
    # swa_full=True gives the window layers the whole context, as llama-cpp-python does.
    assert kv_bytes(info, slots=1, swa_full=True) == 6 * CTX * 256 * 2


def test_slots_multiply_streams_and_recurrent_state(infos: dict[str, GGUFInfo]) -> None:
    """--parallel 4: four streams of n_ctx / 4 cells, and four recurrent states
    (llama_memory_recurrent: max(1, n_seq_max) cells)."""
    one, four = kv_bytes(infos["lfm2"], slots=1), kv_bytes(infos["lfm2"], slots=4)
    assert four - one == 3 * 2 * 256 * 2 * 4  # the KV cells are the same in total
    assert kv_bytes(infos["mamba"], slots=4) == 4 * kv_bytes(infos["mamba"], slots=1)


def test_compute_with_flash_attention_by_hand(infos: dict[str, GGUFInfo]) -> None:
    """qwen2 at n_ctx 4096, micro-batch 512 (graph_bytes): the f16 mask 4096 x 512 x 2,
    then the feed-forward stage 4 x 512 x (2 n_embd + 3 n_ff) = 4 x 512 x 2048."""
    fa = estimate(infos["qwen2"], -1, CTX, flash_attn=True)
    assert fa.compute_vram_mb * MiB == CTX * 512 * 2 + 4 * 512 * (2 * 256 + 3 * 512)
    # Without it: the f32 mask, the scores of 8 heads and 1 + 4 n_embd of activations.
    plain = estimate(infos["qwen2"], -1, CTX)
    assert plain.compute_vram_mb * MiB == 4 * 512 * (1 + 4 * 256 + CTX * (1 + 8))
    assert plain.compute_vram_mb > 8 * fa.compute_vram_mb


@pytest.mark.parametrize("name", ["qwen2", "gemma3", "gpt-oss", "deepseek2", "lfm2"])
def test_the_graph_of_four_slots_is_one_slots(infos: dict[str, GGUFInfo], name: str) -> None:
    """--parallel 4 over 8192 cells: each slot's tokens attend to their own 2048, so
    the graph is the one of a single 2048-cell cache (build_attn_mha splits streams)."""
    for fa in (False, True):
        four = estimate(infos[name], -1, 4 * 2048, slots=4, flash_attn=fa)
        one = estimate(infos[name], -1, 2048, slots=1, flash_attn=fa)
        assert four.compute_vram_mb == one.compute_vram_mb
        assert four.kv_vram_mb > 3.9 * one.kv_vram_mb


def test_a_split_model_counts_every_shard(tmp_path: Path, infos: dict[str, GGUFInfo]) -> None:
    whole = read_gguf_info(write_family(tmp_path / "one" / "q.gguf", qwen2(4)))
    first = write_family(tmp_path / "split" / "q.gguf", qwen2(4), split_max_tensors=12)
    assert first.name == "q-00001-of-00005.gguf"
    split = read_gguf_info(first)
    assert split.layer_bytes == whole.layer_bytes and split.other_bytes == whole.other_bytes
    assert len(split.shards) == 5
    assert split.file_bytes == sum(p.stat().st_size for p in first.parent.iterdir())
    # A first shard of metadata only (gguf-split --no-tensor-first-split) is no refusal.
    bare = write_family(
        tmp_path / "bare" / "q.gguf", qwen2(4), split_max_tensors=12, small_first_shard=True
    )
    assert read_gguf_info(bare).layer_bytes == whole.layer_bytes
    assert estimate(read_gguf_info(bare), -1, CTX) == estimate(whole, -1, CTX)


def test_a_split_model_is_given_by_its_first_shard(tmp_path: Path) -> None:
    first = write_family(tmp_path / "q.gguf", qwen2(4), split_max_tensors=12)
    with pytest.raises(InvalidModelFile, match="first file"):
        read_gguf_info(first.with_name("q-00002-of-00005.gguf"))
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(first, renamed)
    with pytest.raises(InvalidModelFile, match="first file"):
        read_gguf_info(renamed)  # its shards cannot be found without the -of- name
    first.with_name("q-00004-of-00005.gguf").unlink()
    with pytest.raises(InvalidModelFile, match="not found"):
        read_gguf_info(first)


def test_heads_are_needed_unless_the_model_is_recurrent(tmp_path: Path) -> None:
    family = qwen2()
    family.keys["attention.head_count"] = 0
    with pytest.raises(InvalidModelFile, match="head_count"):
        read_gguf_info(write_family(tmp_path / "q.gguf", family))


def test_projector_size(tmp_path: Path) -> None:
    """Weights are the projector's tensors; its compute, the warm-up image (f32) plus,
    per position (a class one included), the wider of 2.5 x width and the MLP's first
    layer + width, f32 (gguf_header.projector_size)."""
    shape = TinyVisionShape(n_embd=256, n_ff=1024, n_head=4, image_size=224, patch_size=16)
    path = write_tiny_mmproj(tmp_path / "mmproj.gguf", shape)
    size = projector_size(path)
    import gguf

    weights = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    assert size.weights_mb * MiB == weights
    assert size.compute_mb * MiB == 3 * 224 * 224 * 4 + (14 * 14 + 1) * (256 * 5 // 2) * 4
    wide = write_tiny_mmproj(tmp_path / "wide.gguf", TinyVisionShape(proj_hidden=4096))
    assert projector_size(wide).compute_mb * MiB == 3 * 32 * 32 * 4 + 17 * (4096 + 32) * 4
    assert projector_mb(path) == size.total_mb == size.weights_mb + size.compute_mb
    with pytest.raises(InvalidModelFile):
        projector_mb(tmp_path / "missing.gguf")
