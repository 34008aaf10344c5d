"""What each layer of a llama.cpp model keeps per KV cell, read from its GGUF header.

llama-style attention keeps K and V of ``n_head_kv x head_dim`` per cell in every
layer. The families differ (llama.cpp as vendored by llama-cpp-python 0.3.36):

- **Sliding window** (gemma2/3, gpt-oss, cohere2, olmo2, lfm2 with a window): window
  layers get a cache of their own, ``GGML_PAD(min(n_ctx_seq, n_swa + n_ubatch), 256)``
  cells (``llama_kv_cache_iswa``), unless ``swa_full``. Which layers slide comes from
  ``<arch>.attention.sliding_window_pattern`` (a bool per layer, or a period), else the
  family's fixed period (``load_swa_pattern`` in src/models/<family>.cpp;
  ``llama_hparams::set_swa_pattern``: layer il slides when ``il % n < n - 1``). phi3's
  window key is ignored by llama.cpp ("Phi SWA is currently disabled").
- **MLA** (deepseek2 with ``key_length_mla``/``value_length_mla``): K only, of
  ``kv_lora_rank + rope dims`` per cell (``llama_kv_cache``: ``has_v = !is_mla``).
- **Per-layer heads**: ``head_count_kv`` may be an array; a 0 entry has no KV cache.
- **Recurrent state** (Mamba, and the conv layers of hybrids such as lfm2): per
  sequence, f32, ``n_embd_r + n_embd_s`` per layer (``llama_hparams::n_embd_r/s``),
  ``max(1, n_seq_max)`` sequences (``llama_memory_recurrent``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# arch -> (period, dense_first, window always on, default window). Only the families
# whose llama.cpp source was read; others are counted at full context (never too low).
SWA_FAMILIES: dict[str, tuple[int, bool, bool, int]] = {
    "gemma2": (2, False, True, 4096),
    "gemma3": (6, False, False, 0),
    "gpt-oss": (2, False, True, 0),
    "cohere2": (4, False, True, 0),
    "olmo2": (4, False, False, 0),
}
RECURRENT_ARCHS = ("mamba", "mamba2")

Get = Callable[[str], Any]  # a metadata value under "<arch>.", scalar or list, or None


@dataclass(frozen=True)
class LayerMemory:
    """What one block keeps: K and V elements per cell (0: none), whether its cache is
    the sliding window's, and its recurrent state elements per sequence (f32)."""

    k: int
    v: int
    swa: bool = False
    rs: int = 0


@dataclass(frozen=True)
class Layout:
    """A model's per-layer memory and the widths its compute graph holds per token."""

    layers: tuple[LayerMemory, ...]
    n_swa: int = 0
    q: int = 0  # query width (n_head x key length; MLA: the absorbed query)
    ff: int = 0  # feed-forward width of one token (dense, or the experts it uses)
    rec: int = 0  # what a recurrent block holds per token (0: none)
    mla_v: int = 0  # MLA: n_head x value_length, the compressed attention output

    @property
    def kv_width(self) -> int:
        return max((la.k + la.v for la in self.layers), default=0)

    @property
    def has_swa(self) -> bool:
        return any(la.swa and la.k for la in self.layers)

    @property
    def has_full(self) -> bool:
        return any(not la.swa and la.k for la in self.layers)


def _per_layer(value: Any, n_layer: int, default: int = 0) -> list[int]:
    if value is None:
        return [default] * n_layer
    if isinstance(value, list):
        return [int(v) for v in value[:n_layer]] + [0] * max(0, n_layer - len(value))
    return [int(value)] * n_layer


def _int(get: Get, key: str, default: int = 0) -> int:
    value = get(key)
    if isinstance(value, list):
        return max((int(v) for v in value), default=default)
    return (
        int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
    )


def swa_layers(arch: str, get: Get, n_layer: int, heads_kv: list[int]) -> tuple[list[bool], int]:
    """Which layers slide, and the window (0: none), as llama.cpp decides for ``arch``."""
    window = _int(get, "attention.sliding_window")
    if arch == "lfm2":  # every attention layer slides when a window is given
        return [window > 0 and h > 0 for h in heads_kv], window if window > 0 else 0
    if arch not in SWA_FAMILIES:
        return [False] * n_layer, 0
    period, dense_first, always, default = SWA_FAMILIES[arch]
    window = window or default
    if not window or (not always and _int(get, "attention.sliding_window") <= 0):
        return [False] * n_layer, 0
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return [bool(p) for p in pattern[:n_layer]] + [False] * (n_layer - len(pattern)), window
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        period = pattern
    if dense_first:
        return [period == 0 or i % period != 0 for i in range(n_layer)], window
    return [period == 0 or i % period < period - 1 for i in range(n_layer)], window


def recurrent_state(arch: str, get: Get, n_embd: int) -> tuple[int, int]:
    """(state elements per sequence of one recurrent layer, its graph width per token):
    ``n_embd_r + n_embd_s`` (llama_hparams), and what its block holds while it runs."""
    l_cache = _int(get, "shortconv.l_cache")
    if l_cache:  # lfm2's short convolution: n_embd x (l_cache - 1), no SSM state
        return n_embd * (l_cache - 1), 9 * n_embd
    d_conv, d_inner = _int(get, "ssm.conv_kernel"), _int(get, "ssm.inner_size")
    d_state, groups = _int(get, "ssm.state_size"), _int(get, "ssm.group_count")
    conv = max(d_conv - 1, 0) * (d_inner + 2 * groups * d_state)
    return conv + d_state * d_inner, 2 * n_embd + 6 * d_inner


def read_layout(arch: str, get: Get, n_layer: int, n_embd: int) -> Layout:
    """Per-layer KV and recurrent memory of a model and its graph widths."""
    n_nextn = _int(get, "nextn_predict_layers")
    heads = _per_layer(get("attention.head_count"), n_layer)
    heads_kv = _per_layer(get("attention.head_count_kv"), n_layer, default=-1)
    heads_kv = [h if hkv < 0 else hkv for h, hkv in zip(heads, heads_kv, strict=True)]
    n_head = heads[0] if heads else 0
    head_k = _int(get, "attention.key_length", n_embd // n_head if n_head else 0)
    head_v = _int(get, "attention.value_length", n_embd // n_head if n_head else 0)
    head_k_swa = _int(get, "attention.key_length_swa", head_k)
    head_v_swa = _int(get, "attention.value_length_swa", head_v)
    mla = bool(_int(get, "attention.key_length_mla") and _int(get, "attention.value_length_mla"))
    swa, window = swa_layers(arch, get, n_layer, heads_kv)
    rs, rec = recurrent_state(arch, get, n_embd)
    all_recurrent = arch in RECURRENT_ARCHS
    layers = []
    for i in range(n_layer):
        if all_recurrent or (heads_kv[i] == 0 and rs):
            layers.append(LayerMemory(0, 0, rs=rs))
            continue
        if i >= n_layer - n_nextn:  # the MTP head's layers: no cache in the main context
            layers.append(LayerMemory(0, 0))
            continue
        dk, dv = (head_k_swa, head_v_swa) if swa[i] else (head_k, head_v)
        k = heads_kv[i] * dk
        layers.append(LayerMemory(k, 0 if mla else heads_kv[i] * dv, swa=swa[i]))
    dense_ff = _int(get, "feed_forward_length")
    used, shared = _int(get, "expert_used_count"), _int(get, "expert_shared_count")
    expert_ff = _int(get, "expert_feed_forward_length")
    return Layout(
        layers=tuple(layers),
        n_swa=window if any(swa) else 0,
        q=max(heads) * head_k,
        ff=max(dense_ff, (used + shared) * expert_ff),
        rec=rec if any(la.rs for la in layers) else 0,
        mla_v=n_head * head_v if mla else 0,
    )


def llama_layout(n_layer: int, n_head: int, n_head_kv: int, head_dim: int) -> Layout:
    """Plain llama attention: K and V of n_head_kv x head_dim in every layer."""
    kv = n_head_kv * head_dim
    return Layout(layers=(LayerMemory(kv, kv),) * n_layer, q=n_head * head_dim)


def pad256(n: int) -> int:
    return -(-n // 256) * 256


def swa_cells(per_stream: int, n_swa: int, n_ubatch: int, *, swa_full: bool) -> int:
    """Cells per stream of the sliding-window cache (``llama_kv_cache_iswa``): the
    window plus one micro-batch, padded to 256, never more than the full cache."""
    if swa_full or not n_swa:
        return per_stream
    return pad256(min(per_stream, n_swa + n_ubatch))


def cache_bytes(
    layout: Layout,
    full_cells: int,
    window_cells: int,
    streams: int,
    *,
    kv_bytes_per_elem: int,
    v_padded: bool,
) -> tuple[int, ...]:
    """Bytes each layer keeps: K and V over its cache's cells in every stream, plus its
    recurrent state (f32) per sequence. ``v_padded``: without flash attention V is
    stored transposed and every layer's V is padded to the widest (llama_kv_cache)."""
    v_max = max((la.v for la in layout.layers if la.k), default=0)
    out = []
    for la in layout.layers:
        cells = window_cells if la.swa else full_cells
        v = v_max if v_padded and la.v else la.v
        out.append(cells * streams * (la.k + v) * kv_bytes_per_elem + la.rs * 4 * max(1, streams))
    return tuple(out)
