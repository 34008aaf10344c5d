"""Pre-flight memory estimate of a llama.cpp model, read from its GGUF header.

Nothing here loads weights: ``gguf.GGUFReader`` maps the file and reads the metadata
and the tensor table. The estimate follows where llama.cpp puts each buffer:

- **Weights.** With ``n_gpu_layers = N`` llama.cpp offloads the *last* N blocks
  (``blk.{n_layer-N}`` .. ``blk.{n_layer-1}``). The output layer (``output.weight`` and
  ``output_norm``) goes to the GPU only when N > n_layer; ``token_embd`` always stays on
  the CPU. Models without ``output.weight`` tie it to ``token_embd``, and llama.cpp then
  puts a copy of ``token_embd`` on the output layer's device.
- **KV cache** (f16 by default): ``2 x n_ctx x n_head_kv x head_dim x bytes`` per layer,
  on the device of its layer (``offload_kqv`` is on in llama-cpp-python). llama-server
  with ``--parallel N`` keeps N per-slot caches of ``n_ctx / N`` cells rounded up to a
  multiple of 256 (see :func:`kv_cells`); llama-cpp-python one unified cache of n_ctx.
- **Compute buffer**: Ollama's graph-size formula for llama-type models (see
  :func:`graph_bytes`); it matches what llama.cpp logs as the CUDA compute buffer.

"All layers" is written ``n_layer + 1`` everywhere here (every block plus the output
layer); llama.cpp reads any value above ``n_layer``, and llama-cpp-python's -1, the
same way. MB means MiB. The configured reserve is not added: the memory ledger
subtracts it, once.

Blocking: :func:`read_gguf_info` reads the file (about a second for a 150k-token
vocabulary); async callers run it through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import ModelLoadFailed

MB = 1024 * 1024
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class InvalidModelFile(ModelLoadFailed):
    """The model file is missing, is not GGUF, is truncated, or lacks the keys needed."""

    code = "invalid_model_file"


@dataclass(frozen=True)
class GGUFInfo:
    """What the memory estimate needs from a GGUF file; sizes in bytes."""

    path: Path
    arch: str
    n_layer: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    file_bytes: int
    layer_bytes: tuple[int, ...]  # weights of each block blk.N.*
    other_bytes: int  # everything outside the blocks (token_embd, output_norm, output, ...)
    output_bytes: int  # output.weight + output_norm: on the GPU only when all layers are
    # A model without output.weight ties it to token_embd: llama.cpp then puts a copy of
    # token_embd on the output's device, counted in output_bytes; these are its bytes.
    tied_output_bytes: int = 0


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


def _field(reader: Any, key: str) -> Any:
    """A scalar metadata value, the largest entry of a per-layer array, or None."""
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.contents()
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv of some models)
        return max(value) if value else None
    return value


def _open(path: Path, what: str) -> Any:
    """A GGUFReader over ``path``; InvalidModelFile when it is missing or not GGUF."""
    if not path.is_file():
        raise InvalidModelFile(f"{what} file not found: {path}", path=str(path))
    try:
        import gguf

        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct and numpy errors
        raise InvalidModelFile(
            f"not a readable GGUF file: {path} ({type(exc).__name__}: {exc})", path=str(path)
        ) from exc


def projector_dim(path: Path) -> int | None:
    """The width of the embeddings a multimodal projector (mmproj GGUF) hands the language
    model (``clip.vision.projection_dim``); None when the file does not say. Raises
    InvalidModelFile for a file that is missing or not GGUF."""
    reader = _open(Path(path), "projector")
    value = _field(reader, "clip.vision.projection_dim")
    return value if isinstance(value, int) and value > 0 else None


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read the header and tensor table of a GGUF file; raise InvalidModelFile if unusable."""
    path = Path(path)
    reader = _open(path, "model")
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidModelFile(f"{path}: no general.architecture key", path=str(path))

    def need(key: str) -> int:
        value = _field(reader, f"{arch}.{key}")
        if not isinstance(value, int) or value <= 0:
            raise InvalidModelFile(f"{path}: missing or invalid key {arch}.{key}", path=str(path))
        return value

    n_layer = need("block_count")
    n_ctx_train = need("context_length")
    n_embd = need("embedding_length")
    n_head = need("attention.head_count")
    n_head_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_head
    head_dim = _field(reader, f"{arch}.attention.key_length") or n_embd // n_head

    file_bytes = path.stat().st_size
    layer_bytes = [0] * n_layer
    other = 0
    output = 0
    has_output = False
    tensor_sizes: dict[str, int] = {}
    for t in reader.tensors:
        size = int(t.n_bytes)
        tensor_sizes[t.name] = size
        if int(t.data_offset) + size > file_bytes:
            raise InvalidModelFile(
                f"{path}: tensor {t.name} lies beyond the end of the file (truncated?)",
                path=str(path),
            )
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layer_bytes[int(m.group(1))] += size
            continue
        other += size
        if t.name in ("output.weight", "output_norm.weight"):
            output += size
            has_output = has_output or t.name == "output.weight"
    if not tensor_sizes:
        raise InvalidModelFile(f"{path}: the file holds no tensors", path=str(path))
    tied = 0 if has_output else tensor_sizes.get("token_embd.weight", 0)
    output += tied

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else 0)
    if not n_vocab and "token_embd.weight" in tensor_sizes:
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        n_vocab = int(embd.shape[-1])
    if not n_vocab:
        raise InvalidModelFile(f"{path}: vocabulary size not found", path=str(path))

    return GGUFInfo(
        path=path,
        arch=arch,
        n_layer=n_layer,
        n_ctx_train=n_ctx_train,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(n_head_kv),
        head_dim=int(head_dim),
        n_vocab=int(n_vocab),
        file_bytes=file_bytes,
        layer_bytes=tuple(layer_bytes),
        other_bytes=other,
        output_bytes=output,
        tied_output_bytes=tied,
    )


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


def graph_bytes(info: GGUFInfo, n_ctx: int, n_batch: int) -> tuple[int, int]:
    """Compute-buffer size in bytes, (full offload, partial offload).

    Ollama's ``GraphSize`` for llama models (fs/ggml/ggml.go), used for every
    architecture here. With batch b = min(n_batch, n_ctx) (llama.cpp clamps it):

    - full   = max(4b(1 + 4 n_embd + n_ctx (1 + n_head)),  4b (n_embd + n_vocab))
    - partial = 4b n_embd + max(4b(1 + n_embd + max(n_ctx, n_embd)) + n_embd^2 * 9/16
                                + 4 n_ctx (b n_head + head_dim n_head_kv),
                                4b (n_embd + n_vocab) + n_embd n_vocab * 105/128)

    The first term of ``full`` is the f32 attention scores (n_ctx x b x n_head) plus
    activations; the second is the logits. For Llama-3-8B at n_ctx 8192, batch 512 it
    gives 560.0 MiB, which we recall as the "CUDA0 compute buffer size" llama.cpp logs
    for that load without flash attention (not yet measured on this project's GPU;
    flash attention needs less, so this is an upper bound).
    """
    b = max(1, min(n_batch, n_ctx))
    e, h, hkv, v, c = info.n_embd, info.n_head, info.n_head_kv, info.n_vocab, n_ctx
    full = max(4 * b * (1 + 4 * e + c * (1 + h)), 4 * b * (e + v))
    partial = 4 * b * e + max(
        4 * b * (1 + e + max(c, e)) + e * e * 9 // 16 + 4 * c * (b * h + info.head_dim * hkv),
        4 * b * (e + v) + e * v * 105 // 128,
    )
    return full, partial


def kv_cells(n_ctx: int, slots: int | None = None) -> int:
    """KV cells a context allocates: n_ctx for one unified cache (``slots`` None, as
    llama-cpp-python asks), else llama.cpp's non-unified split over ``slots`` sequences,
    ``slots x GGML_PAD(n_ctx / slots, 256)`` (llama_context, as llama-server asks)."""
    if slots is None:
        return n_ctx
    per_slot = -(-(n_ctx // slots) // 256) * 256
    return max(per_slot, 256) * slots


def kv_bytes_per_layer(info: GGUFInfo, n_ctx: int, kv_bytes_per_elem: int = 2) -> int:
    """K and V of one layer: 2 x n_ctx x n_head_kv x head_dim x bytes per element."""
    return 2 * n_ctx * info.n_head_kv * info.head_dim * kv_bytes_per_elem


def estimate(
    info: GGUFInfo,
    n_gpu_layers: int,
    n_ctx: int,
    *,
    kv_bytes_per_elem: int = 2,
    n_batch: int = 512,
    slots: int | None = None,
) -> Estimate:
    """Predict VRAM and RAM of loading ``info`` with these GPU layers and context.

    The compute buffer is counted on the GPU only when at least one layer is
    offloaded: a worker started with 0 GPU layers is hidden from the GPU (see
    services/llama_worker.py), so it allocates nothing there. On the CPU side the
    host compute buffer is the full graph when nothing is offloaded, the partial
    graph when some layers run on the CPU, and a staging allowance of
    4 x batch x 3 x n_embd bytes when everything is offloaded (24 MiB for an 8B model
    at batch 512, about what llama.cpp logs as "CUDA_Host compute buffer"; recalled,
    not yet measured here). The CPU figures are allowances, the GPU ones the gate's.
    ``slots``: llama-server's parallel slots, whose KV cache is :func:`kv_cells`.
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

    cells = kv_cells(ctx, slots)
    kv_layer = kv_bytes_per_layer(info, cells, kv_bytes_per_elem)
    full, partial = graph_bytes(info, cells, n_batch)
    b = max(1, min(n_batch, ctx))
    if ngl == 0:
        gpu_compute, cpu_compute = 0, full
    elif output_on_gpu:
        gpu_compute, cpu_compute = full, 4 * b * 3 * info.n_embd
    else:
        gpu_compute, cpu_compute = partial, partial

    weights_mb = gpu_weights / MB
    kv_mb = blocks_on_gpu * kv_layer / MB
    compute_mb = gpu_compute / MB
    ram_mb = (cpu_weights + split * kv_layer + cpu_compute) / MB
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


def first_fitting_rung(
    info: GGUFInfo, rungs: Sequence[tuple[int, int]], usable_vram_mb: float, **kw: Any
) -> int:
    """Index of the first rung whose estimated VRAM fits in usable_vram_mb.

    When none fits: the first CPU rung (0 GPU layers), or the last rung if there is
    none. ``kw`` goes to :func:`estimate` (kv_bytes_per_elem, n_batch).
    """
    if not rungs:
        raise ValueError("no rungs to choose from")
    for i, (layers, ctx) in enumerate(rungs):
        if estimate(info, layers, ctx, **kw).vram_mb <= usable_vram_mb:
            return i
    return next((i for i, (layers, _) in enumerate(rungs) if layers == 0), len(rungs) - 1)
