"""Pre-flight memory estimate of a llama.cpp model, from its GGUF header.

The estimate follows where llama.cpp (as vendored by llama-cpp-python 0.3.36) puts
each buffer:

- **Weights.** With ``n_gpu_layers = N`` llama.cpp offloads the *last* N blocks
  (``blk.{n_layer-N}`` .. ``blk.{n_layer-1}``). The output layer (``output.weight`` and
  ``output_norm``) goes to the GPU only when N > n_layer; ``token_embd`` always stays on
  the CPU. Models without ``output.weight`` tie it to ``token_embd``, and llama.cpp then
  puts a copy of ``token_embd`` on the output layer's device. A split model counts
  every shard (services/memory/gguf_header.py).
- **KV cache** (f16 by default), per layer on the device of its layer, as each family
  keeps it (services/memory/gguf_families.py: window layers, K-only MLA, per-layer KV
  heads, recurrent state). llama.cpp pads the context to 256 cells; llama-server with
  ``--parallel N`` keeps N per-slot streams of ``n_ctx / N`` cells padded to 256 (see
  :func:`kv_cells`), llama-cpp-python one stream.
- **Compute buffer**: the worst-case graph llama.cpp reserves, one micro-batch over
  one stream's cells (see :func:`graph_bytes`), with or without flash attention.

"All layers" is written ``n_layer + 1`` everywhere here (every block plus the output
layer); llama.cpp reads any value above ``n_layer``, and llama-cpp-python's -1, the
same way. MB means MiB. The configured reserve is not added: the memory ledger
subtracts it, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.memory.gguf_families import cache_bytes, pad256, swa_cells
from services.memory.gguf_header import (
    GGUFInfo,
    InvalidModelFile,
    ProjectorSize,
    projector_dim,
    projector_mb,
    projector_size,
    read_gguf_info,
)

__all__ = [
    "Estimate",
    "GGUFInfo",
    "InvalidModelFile",
    "estimate",
    "graph_bytes",
    "kv_cells",
    "ladder",
    "projector_dim",
    "projector_mb",
    "projector_size",
    "ProjectorSize",
    "read_gguf_info",
]

MB = 1024 * 1024


@dataclass(frozen=True)
class Estimate:
    """Predicted memory of one load; ``n_gpu_layers`` is the effective (clamped) count."""

    n_gpu_layers: int
    n_ctx: int
    weights_vram_mb: float
    kv_vram_mb: float
    compute_vram_mb: float
    vram_mb: float  # total on the GPU
    ram_mb: float  # weights not offloaded + their KV + the host compute buffer


def effective_layers(n_gpu_layers: int, n_layer: int) -> int:
    """Clamp a GPU-layer count: negative or above n_layer means all, written n_layer + 1."""
    if n_gpu_layers < 0 or n_gpu_layers > n_layer:
        return n_layer + 1
    return n_gpu_layers


def effective_ctx(n_ctx: int, n_ctx_train: int) -> int:
    """Clamp a context to what the model was trained for; 0 means the trained context."""
    if n_ctx <= 0:
        return n_ctx_train
    return min(n_ctx, n_ctx_train)


def kv_cells(n_ctx: int, slots: int | None = None) -> int:
    """KV cells a context allocates: n_ctx for one unified cache (``slots`` None, as
    llama-cpp-python asks), else llama.cpp's non-unified split over ``slots`` sequences,
    ``slots x GGML_PAD(n_ctx / slots, 256)`` (llama_context, as llama-server asks).
    llama_context pads n_ctx itself to 256 first; :func:`estimate` does that."""
    if slots is None:
        return n_ctx
    per_slot = -(-(n_ctx // slots) // 256) * 256
    return max(per_slot, 256) * slots


def graph_bytes(
    info: GGUFInfo,
    cells: int,
    n_batch: int,
    *,
    flash_attn: bool = False,
    window_cells: int = 0,
    n_seqs: int = 1,
) -> tuple[int, int]:
    """Compute-buffer size in bytes, (everything on one device, partial offload).

    llama.cpp reserves the graph of one micro-batch of b = min(n_batch, n_ctx) tokens
    (rounded up to a multiple of ``n_seqs``) over ``cells``, the cells of *one* stream:
    with ``--parallel N`` each slot's tokens attend to its own stream only
    (llama_context::sched_reserve, build_attn_mha). The buffer is what the graph holds
    at once, as ggml-alloc reuses memory between layers. Per token, in f32 (4b bytes):

    - the KQ masks of each cache (full, window), f32, or f16 with flash attention;
    - without flash attention, the scores of the widest cache, ``cells x n_head``: with
      the masks and ``1 + 4 n_embd`` of activations that is Ollama's llama ``GraphSize``
      (fs/ggml/ggml.go) generalised to windows, unchanged for llama itself;
    - whichever stage holds most: attention (flash: ``2 n_embd + 2 q + k + v``; MLA
      ``2 n_embd + 3 q + 2 k + 3 n_head v_lora``), the feed-forward (``2 n_embd + 3 ff``,
      ff the experts a token uses), a recurrent block, or the logits of every token of
      the micro-batch (``n_vocab + 2 n_embd``).

    Measured against llama.cpp's "CPU compute buffer size" on tiny files of each family
    at n_ctx 1024 and 4096, with and without flash attention: within 8 %
    (tests/integration/test_gguf_families_llama.py). The partial-offload figure is
    Ollama's partial ``GraphSize`` (with flash attention the scores become the f16 mask),
    not measured here: it needs a GPU.
    """
    lay = info.layout
    b = max(1, min(n_batch, cells))
    b = -(-b // n_seqs) * n_seqs
    u = 4 * b
    e, v, h = info.n_embd, info.n_vocab, info.n_head
    caches = ([cells] if lay.has_full else []) + ([window_cells or cells] if lay.has_swa else [])
    masks = sum(caches) * b * (2 if flash_attn else 4)
    widest = max(caches, default=0)
    stages = max(2 * e + 3 * lay.ff, lay.rec, v + 2 * e)
    if flash_attn:
        attn = 2 * e + 2 * lay.q + lay.kv_width
        if lay.mla_v:
            attn = 2 * e + 3 * lay.q + 2 * lay.kv_width + 3 * lay.mla_v
        full = masks + u * max(attn if caches else 0, stages)
    else:
        scores = u * (1 + 4 * e) + u * widest * h if caches else 0
        full = masks + max(scores, u * stages)
    c, d, hkv = widest or cells, info.head_dim, info.n_head_kv
    scores_or_mask = 2 * c * b if flash_attn else 4 * c * b * h
    partial = u * e + max(
        u * (1 + e + max(c, e)) + e * e * 9 // 16 + scores_or_mask + 4 * c * d * hkv,
        u * (e + v) + e * v * 105 // 128,
    )
    return full, max(partial, full) if flash_attn else partial


def estimate(
    info: GGUFInfo,
    n_gpu_layers: int,
    n_ctx: int,
    *,
    kv_bytes_per_elem: int = 2,
    n_batch: int = 512,
    slots: int | None = None,
    flash_attn: bool = False,
    swa_full: bool | None = None,
) -> Estimate:
    """Predict VRAM and RAM of loading ``info`` with these GPU layers and context.

    ``slots``: llama-server's parallel slots, whose KV cache is :func:`kv_cells` and
    whose graph is sized for one slot's cells. ``flash_attn``: llama-server turns it on
    (its "auto" does, on CPU and on CUDA), llama-cpp-python leaves it off unless asked.
    ``swa_full``: whether window layers get the full context; None means each backend's
    default, llama-cpp-python's full cache (``slots`` None: llama_context_default_params
    sets it) and llama-server's window (common_params). ``n_batch``: the micro-batch
    (``n_ubatch``, 512 in both backends) that sizes the graph.

    The compute buffer is counted on the GPU only when at least one layer is
    offloaded: a worker started with 0 GPU layers is hidden from the GPU (see
    services/llama_worker.py), so it allocates nothing there. On the CPU side the
    host compute buffer is the full graph when nothing is offloaded, the partial
    graph when some layers run on the CPU, and a staging allowance of
    4 x batch x 3 x n_embd bytes when everything is offloaded (24 MiB for an 8B model
    at batch 512, about what llama.cpp logs as "CUDA_Host compute buffer"; recalled,
    not yet measured here). The CPU figures are allowances, the GPU ones the gate's.
    """
    ngl = effective_layers(n_gpu_layers, info.n_layer)
    ctx = effective_ctx(n_ctx, info.n_ctx_train)
    blocks_on_gpu = min(ngl, info.n_layer)
    output_on_gpu = ngl > info.n_layer
    split = info.n_layer - blocks_on_gpu  # blocks [0, split) on the CPU, [split, n) on the GPU

    gpu_weights = sum(info.layer_bytes[split:])
    cpu_weights = sum(info.layer_bytes[:split]) + info.other_bytes
    if output_on_gpu:
        gpu_weights += info.output_bytes
        # A tied output is a copy of token_embd: the original stays on the CPU.
        cpu_weights -= info.output_bytes - info.tied_output_bytes

    # KV cells of one stream (llama_context pads n_ctx to 256 first) and of the window.
    streams = slots or 1
    b = max(1, min(n_batch, ctx))
    cells = kv_cells(pad256(ctx), slots) // streams
    full_swa = slots is None if swa_full is None else swa_full
    window = swa_cells(cells, info.layout.n_swa, b, swa_full=full_swa)
    per_layer = cache_bytes(
        info.layout,
        cells,
        window,
        streams,
        kv_bytes_per_elem=kv_bytes_per_elem,
        v_padded=not flash_attn,  # without flash attention V is stored transposed
    )
    full, partial = graph_bytes(
        info, cells, b, flash_attn=flash_attn, window_cells=window, n_seqs=streams
    )
    if ngl == 0:
        gpu_compute, cpu_compute = 0, full
    elif output_on_gpu:
        gpu_compute, cpu_compute = full, 4 * b * 3 * info.n_embd
    else:
        gpu_compute, cpu_compute = partial, partial

    weights_mb = gpu_weights / MB
    kv_mb = sum(per_layer[split:]) / MB
    compute_mb = gpu_compute / MB
    ram_mb = (cpu_weights + sum(per_layer[:split]) + cpu_compute) / MB
    return Estimate(
        n_gpu_layers=ngl,
        n_ctx=ctx,
        weights_vram_mb=weights_mb,
        kv_vram_mb=kv_mb,
        compute_vram_mb=compute_mb,
        vram_mb=weights_mb + kv_mb + compute_mb,
        ram_mb=ram_mb,
    )


def _dedup(values: Iterable[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def ladder(
    configured_layers: int,
    configured_ctx: int,
    gpu_layers: Sequence[int],
    contexts: Sequence[int],
    n_layer: int,
    n_ctx_train: int,
) -> list[tuple[int, int]]:
    """The (n_gpu_layers, n_ctx) rungs to try, in order; the configured pair first.

    Layer counts are clamped (negative or above n_layer = all = n_layer + 1) and
    contexts clamped to n_ctx_train (0 = n_ctx_train); both lists are deduplicated
    after clamping. Fallbacks only shrink: a fallback above the configured value is
    dropped. Layer counts go from most to fewest, and 0 (CPU) is always the last.

    Order: for each layer count, every context from largest to smallest, then fewer
    GPU layers. This is llama.cpp's own ``--fit`` order (shrink the context first,
    then move weights to RAM): a shorter context costs only prompt room, while each
    layer moved to the CPU slows every token. The CPU rungs start again at the
    largest context, since there the context costs RAM, not VRAM.
    """
    top_layers = effective_layers(configured_layers, n_layer)
    top_ctx = effective_ctx(configured_ctx, n_ctx_train)
    layers = _dedup(
        [top_layers]
        + sorted(
            (effective_layers(n, n_layer) for n in gpu_layers),
            reverse=True,
        )
        + [0]
    )
    layers = [n for n in layers if n <= top_layers]
    ctxs = _dedup(
        [top_ctx] + sorted((effective_ctx(c, n_ctx_train) for c in contexts), reverse=True)
    )
    ctxs = [c for c in ctxs if c <= top_ctx]
    return [(n, c) for n in layers for c in ctxs]
