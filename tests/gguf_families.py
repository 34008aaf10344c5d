"""Tiny GGUF files of several llama.cpp families, written with the ``gguf`` package.

Each file holds every tensor llama.cpp's ``load_arch_tensors`` of that family asks for
(src/models/<family>.cpp in the llama.cpp vendored by llama-cpp-python 0.3.36), with
zero weights, so llama.cpp really loads it and logs its buffers; the estimate reads
the same header. The shapes are small but not degenerate (n_embd 256, 8 heads) so
that the compute buffer is made of the same terms as a real model's.

Shapes are written the way ggml names them, ``(ne0, ne1, ...)`` = (input, output), and
reversed for numpy. The vocabulary is tiny_gguf's byte-fallback SentencePiece one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.demo.tiny_gguf import CHAT_TEMPLATE, _vocab

N_CTX_TRAIN = 8192
F32_TENSORS = ("norm", "bias", "sinks", "ssm_a", "ssm_d", "ssm_conv1d", "exp_probs_b")

Tensors = dict[str, tuple[int, ...]]


@dataclass
class Family:
    """One family's metadata keys (without the ``<arch>.`` prefix) and tensors."""

    arch: str
    keys: dict[str, Any]
    tensors: Tensors = field(default_factory=dict)


def _vocab_size() -> int:
    return len(_vocab()[0])


def _common(t: Tensors, e: int, *, output: bool = True, norm: str = "output_norm") -> None:
    v = _vocab_size()
    t["token_embd.weight"] = (e, v)
    t[f"{norm}.weight"] = (e,)
    if output:
        t["output.weight"] = (e, v)


def _ffn(t: Tensors, i: int, e: int, ff: int) -> None:
    t[f"blk.{i}.ffn_norm.weight"] = (e,)
    t[f"blk.{i}.ffn_gate.weight"] = (e, ff)
    t[f"blk.{i}.ffn_up.weight"] = (e, ff)
    t[f"blk.{i}.ffn_down.weight"] = (ff, e)


def _attn(t: Tensors, i: int, e: int, q: int, kv: int, *, bias: bool = False) -> None:
    t[f"blk.{i}.attn_norm.weight"] = (e,)
    for name, width in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
        t[f"blk.{i}.{name}.weight"] = (e, width)
        if bias:
            t[f"blk.{i}.{name}.bias"] = (width,)
    t[f"blk.{i}.attn_output.weight"] = (q, e)


def _base_keys(e: int, n_layer: int, n_head: int, n_head_kv: Any, ff: int) -> dict[str, Any]:
    return {
        "context_length": N_CTX_TRAIN,
        "embedding_length": e,
        "block_count": n_layer,
        "feed_forward_length": ff,
        "attention.head_count": n_head,
        "attention.head_count_kv": n_head_kv,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 10000.0,
    }


def qwen2(n_layer: int = 2) -> Family:
    e, h, hkv, ff = 256, 8, 2, 512
    t: Tensors = {}
    _common(t, e)
    for i in range(n_layer):
        _attn(t, i, e, e, hkv * e // h, bias=True)
        _ffn(t, i, e, ff)
    return Family("qwen2", _base_keys(e, n_layer, h, hkv, ff), t)


def qwen3(n_layer: int = 2) -> Family:
    """Head size 64 given by key_length: n_head x head_dim (512) is not n_embd (256)."""
    e, h, hkv, d, ff = 256, 8, 4, 64, 512
    t: Tensors = {}
    _common(t, e, output=False)  # tied output, as the small Qwen3 models
    for i in range(n_layer):
        _attn(t, i, e, h * d, hkv * d)
        t[f"blk.{i}.attn_k_norm.weight"] = (d,)
        t[f"blk.{i}.attn_q_norm.weight"] = (d,)
        _ffn(t, i, e, ff)
    keys = _base_keys(e, n_layer, h, hkv, ff)
    keys |= {"attention.key_length": d, "attention.value_length": d}
    return Family("qwen3", keys, t)


def _gemma(arch: str, n_layer: int, window: int, pattern: Any) -> Family:
    e, h, hkv, d, ff = 256, 8, 4, 32, 512
    t: Tensors = {}
    _common(t, e, output=False)
    for i in range(n_layer):
        _attn(t, i, e, h * d, hkv * d)
        t[f"blk.{i}.post_attention_norm.weight"] = (e,)
        t[f"blk.{i}.post_ffw_norm.weight"] = (e,)
        if arch == "gemma3":
            t[f"blk.{i}.attn_k_norm.weight"] = (d,)
            t[f"blk.{i}.attn_q_norm.weight"] = (d,)
        _ffn(t, i, e, ff)
    keys = _base_keys(e, n_layer, h, hkv, ff)
    keys |= {"attention.key_length": d, "attention.value_length": d}
    keys["attention.sliding_window"] = window
    if pattern is not None:
        keys["attention.sliding_window_pattern"] = pattern
    return Family(arch, keys, t)


def gemma2(n_layer: int = 4, window: int = 512) -> Family:
    """Every other layer slides (llama.cpp's fixed pattern 2 for gemma2)."""
    return _gemma("gemma2", n_layer, window, None)


def gemma3(n_layer: int = 6, window: int = 512, pattern: Any = None) -> Family:
    """Five sliding layers, then a global one (pattern 6), unless ``pattern`` says."""
    return _gemma("gemma3", n_layer, window, pattern)


def phi3(n_layer: int = 2) -> Family:
    """Fused QKV, a double-width up projection, and a sliding_window key that llama.cpp
    ignores for phi3 (it logs "Phi SWA is currently disabled")."""
    e, h, ff = 256, 8, 512
    t: Tensors = {}
    _common(t, e)
    for i in range(n_layer):
        t[f"blk.{i}.attn_norm.weight"] = (e,)
        t[f"blk.{i}.attn_qkv.weight"] = (e, 3 * e)
        t[f"blk.{i}.attn_output.weight"] = (e, e)
        t[f"blk.{i}.ffn_norm.weight"] = (e,)
        t[f"blk.{i}.ffn_up.weight"] = (e, 2 * ff)
        t[f"blk.{i}.ffn_down.weight"] = (ff, e)
    keys = _base_keys(e, n_layer, h, h, ff) | {"attention.sliding_window": 2047}
    keys["rope.dimension_count"] = e // h
    return Family("phi3", keys, t)


def gpt_oss(n_layer: int = 4, window: int = 128) -> Family:
    """A mixture of 4 experts (2 used), attention sinks, every other layer sliding."""
    e, h, hkv, d, n_exp, ff_exp = 256, 8, 2, 64, 4, 128
    t: Tensors = {}
    _common(t, e)
    for i in range(n_layer):
        _attn(t, i, e, h * d, hkv * d, bias=True)
        t[f"blk.{i}.attn_output.bias"] = (e,)
        t[f"blk.{i}.post_attention_norm.weight"] = (e,)
        t[f"blk.{i}.attn_sinks.weight"] = (h,)
        t[f"blk.{i}.ffn_gate_inp.weight"] = (e, n_exp)
        t[f"blk.{i}.ffn_gate_inp.bias"] = (n_exp,)
        t[f"blk.{i}.ffn_gate_exps.weight"] = (e, ff_exp, n_exp)
        t[f"blk.{i}.ffn_up_exps.weight"] = (e, ff_exp, n_exp)
        t[f"blk.{i}.ffn_down_exps.weight"] = (ff_exp, e, n_exp)
        t[f"blk.{i}.ffn_gate_exps.bias"] = (ff_exp, n_exp)
        t[f"blk.{i}.ffn_up_exps.bias"] = (ff_exp, n_exp)
        t[f"blk.{i}.ffn_down_exps.bias"] = (e, n_exp)
    keys = _base_keys(e, n_layer, h, hkv, 0)
    del keys["feed_forward_length"]
    keys |= {
        "attention.key_length": d,
        "attention.value_length": d,
        "rope.dimension_count": d,
        "attention.sliding_window": window,
        "expert_count": n_exp,
        "expert_used_count": 2,
        "expert_feed_forward_length": ff_exp,
    }
    return Family("gpt-oss", keys, t)


def deepseek2(n_layer: int = 2) -> Family:
    """MLA as llama.cpp converts it today: one KV head of kv_lora_rank + rope dims for K
    (key_length 80), kv_lora_rank for V (64), the decompressed sizes in *_mla keys. One
    dense block, then mixture-of-experts blocks with a shared expert."""
    e, h, ff = 256, 4, 512
    q_lora, kv_lora, rope, nope, v_mla = 64, 64, 16, 32, 32
    n_exp, ff_exp = 4, 64
    t: Tensors = {}
    _common(t, e)
    for i in range(n_layer):
        p = f"blk.{i}"
        t[f"{p}.attn_norm.weight"] = (e,)
        t[f"{p}.attn_q_a_norm.weight"] = (q_lora,)
        t[f"{p}.attn_kv_a_norm.weight"] = (kv_lora,)
        t[f"{p}.attn_q_a.weight"] = (e, q_lora)
        t[f"{p}.attn_q_b.weight"] = (q_lora, h * (nope + rope))
        t[f"{p}.attn_kv_a_mqa.weight"] = (e, kv_lora + rope)
        t[f"{p}.attn_k_b.weight"] = (nope, kv_lora, h)
        t[f"{p}.attn_v_b.weight"] = (kv_lora, v_mla, h)
        t[f"{p}.attn_output.weight"] = (h * v_mla, e)
        if i == 0:
            _ffn(t, i, e, ff)
            continue
        t[f"{p}.ffn_norm.weight"] = (e,)
        t[f"{p}.ffn_gate_inp.weight"] = (e, n_exp)
        t[f"{p}.ffn_gate_exps.weight"] = (e, ff_exp, n_exp)
        t[f"{p}.ffn_up_exps.weight"] = (e, ff_exp, n_exp)
        t[f"{p}.ffn_down_exps.weight"] = (ff_exp, e, n_exp)
        t[f"{p}.ffn_gate_shexp.weight"] = (e, ff_exp)
        t[f"{p}.ffn_up_shexp.weight"] = (e, ff_exp)
        t[f"{p}.ffn_down_shexp.weight"] = (ff_exp, e)
    keys = _base_keys(e, n_layer, h, 1, ff)
    keys |= {
        "attention.key_length": kv_lora + rope,
        "attention.value_length": kv_lora,
        "attention.key_length_mla": nope + rope,
        "attention.value_length_mla": v_mla,
        "attention.q_lora_rank": q_lora,
        "attention.kv_lora_rank": kv_lora,
        "rope.dimension_count": rope,
        "leading_dense_block_count": 1,
        "expert_count": n_exp,
        "expert_used_count": 2,
        "expert_shared_count": 1,
        "expert_feed_forward_length": ff_exp,
        "expert_weights_scale": 1.0,
    }
    return Family("deepseek2", keys, t)


def lfm2(n_layer: int = 4) -> Family:
    """Short-convolution layers (head_count_kv 0) between attention layers."""
    e, h, hkv, ff, l_cache = 256, 8, 4, 512, 3
    heads_kv = [0 if i % 2 == 0 else hkv for i in range(n_layer)]
    d = e // h
    t: Tensors = {}
    _common(t, e, output=False, norm="token_embd_norm")
    for i in range(n_layer):
        _ffn(t, i, e, ff)
        t[f"blk.{i}.attn_norm.weight"] = (e,)
        if heads_kv[i]:
            _attn(t, i, e, e, hkv * d)
            t[f"blk.{i}.attn_q_norm.weight"] = (d,)
            t[f"blk.{i}.attn_k_norm.weight"] = (d,)
        else:
            t[f"blk.{i}.shortconv.conv.weight"] = (l_cache, e)
            t[f"blk.{i}.shortconv.in_proj.weight"] = (e, 3 * e)
            t[f"blk.{i}.shortconv.out_proj.weight"] = (e, e)
    keys = _base_keys(e, n_layer, h, heads_kv, ff) | {"shortconv.l_cache": l_cache}
    return Family("lfm2", keys, t)


def mamba(n_layer: int = 2) -> Family:
    """Mamba-1: no attention at all (head_count 0), a conv and an SSM state per layer."""
    e, d_inner, d_state, d_conv, dt_rank = 128, 256, 16, 4, 8
    t: Tensors = {}
    _common(t, e)
    for i in range(n_layer):
        p = f"blk.{i}"
        t[f"{p}.attn_norm.weight"] = (e,)
        t[f"{p}.ssm_in.weight"] = (e, 2 * d_inner)
        t[f"{p}.ssm_conv1d.weight"] = (d_conv, d_inner)
        t[f"{p}.ssm_conv1d.bias"] = (d_inner,)
        t[f"{p}.ssm_x.weight"] = (d_inner, dt_rank + 2 * d_state)
        t[f"{p}.ssm_dt.weight"] = (dt_rank, d_inner)
        t[f"{p}.ssm_dt.bias"] = (d_inner,)
        t[f"{p}.ssm_a"] = (d_state, d_inner)
        t[f"{p}.ssm_d"] = (d_inner,)
        t[f"{p}.ssm_out.weight"] = (d_inner, e)
    keys = _base_keys(e, n_layer, 0, 0, 0)
    keys |= {
        "ssm.conv_kernel": d_conv,
        "ssm.inner_size": d_inner,
        "ssm.state_size": d_state,
        "ssm.time_step_rank": dt_rank,
    }
    return Family("mamba", keys, t)


FAMILIES: dict[str, Callable[[], Family]] = {
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "phi3": phi3,
    "gpt-oss": gpt_oss,
    "deepseek2": deepseek2,
    "lfm2": lfm2,
    "mamba": mamba,
}


def _add_key(w: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, list):  # per-layer values: INT32 or BOOL arrays
        w.add_array(key, value)
    else:
        w.add_string(key, str(value))


def write_family(
    path: Path,
    family: Family,
    *,
    split_max_tensors: int = 0,
    small_first_shard: bool = False,
    f16: bool = True,
) -> Path:
    """Write ``family`` at ``path`` (or as shards ``<stem>-0000i-of-0000N.gguf`` next to
    it, when ``split_max_tensors``) and return the file llama.cpp is given: the first."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(
        str(path),
        family.arch,
        split_max_tensors=split_max_tensors,
        small_first_shard=small_first_shard,
    )
    w.add_name("edison tiny family")  # not "phi3": llama.cpp would look for its tokens
    w.add_file_type(1 if f16 else 0)
    for key, value in family.keys.items():
        _add_key(w, f"{family.arch}.{key}", value)
    tokens, scores, types = _vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, ne in family.tensors.items():
        small = len(ne) == 1 or any(s in name for s in F32_TENSORS)
        dtype = np.float32 if small or not f16 else np.float16
        w.add_tensor(name, np.zeros(tuple(reversed(ne)), dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return next(iter(sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))))
    return path


def tensor_bytes(family: Family, *, f16: bool = True) -> tuple[int, ...]:
    """Bytes of each tensor as written (f32 for vectors and the names in F32_TENSORS)."""
    out = []
    for name, ne in family.tensors.items():
        small = len(ne) == 1 or any(s in name for s in F32_TENSORS)
        out.append(int(np.prod(ne)) * (4 if small or not f16 else 2))
    return tuple(out)
