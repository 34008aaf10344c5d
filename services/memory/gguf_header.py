"""Reading a llama.cpp model's GGUF header: what the memory estimate needs.

Nothing here loads weights: ``gguf.GGUFReader`` maps the file (every shard of a split
one) and reads the metadata and the tensor table. The estimate itself is in
services/memory/gguf_estimate.py, what each family keeps per layer in
services/memory/gguf_families.py.

Blocking: :func:`read_gguf_info` reads the file (about a second for a 150k-token
vocabulary); async callers run it through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.errors import ModelLoadFailed
from services.memory.gguf_families import Layout, llama_layout, read_layout

MB = 1024 * 1024

_BLOCK = re.compile(r"^blk\.(\d+)\.")
# llama.cpp's llama_split_path: "<prefix>-%05d-of-%05d.gguf"
_SHARD = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


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
    file_bytes: int  # all shards
    layer_bytes: tuple[int, ...]  # weights of each block blk.N.*
    other_bytes: int  # everything outside the blocks (token_embd, output_norm, output, ...)
    output_bytes: int  # output.weight + output_norm: on the GPU only when all layers are
    # A model without output.weight ties it to token_embd: llama.cpp then puts a copy of
    # token_embd on the output's device, counted in output_bytes; these are its bytes.
    tied_output_bytes: int = 0
    # Per-layer memory and graph widths; None: llama attention in every layer.
    family: Layout | None = field(default=None, repr=False)
    shards: tuple[Path, ...] = ()  # every file of a split model, the first first

    @property
    def layout(self) -> Layout:
        if self.family is not None:
            return self.family
        return llama_layout(self.n_layer, self.n_head, self.n_head_kv, self.head_dim)


def _raw(reader: Any, key: str) -> Any:
    """A metadata value as stored (a scalar, or a list for arrays), or None."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _field(reader: Any, key: str) -> Any:
    """A scalar metadata value, the largest entry of a per-layer array, or None."""
    value = _raw(reader, key)
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


@dataclass(frozen=True)
class ProjectorSize:
    """What a multimodal projector (mmproj GGUF) takes once loaded, in MiB."""

    weights_mb: float
    compute_mb: float

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.compute_mb


def projector_size(path: Path) -> ProjectorSize:
    """Weights and compute buffer of a vision projector, read from its header.

    The weights are its tensors. The compute buffer is the graph clip reserves at
    load for one warm-up image of ``clip.vision.image_size`` (clip.cpp,
    ``get_dummy_batch`` and ``reserve_compute_meta``; layers reuse it): the image in
    f32, plus per patch position the wider of the encoder stage (2.5 x its width;
    2.3 measured at width 1024) and the projector's first layer with the encoder output (``mm.*``
    output + width). Against clip's "CPU compute buffer size" line (same with and
    without flash attention), ViT-L/14 at 336 px: 12.55 MiB with a 4096-wide MLP (this
    gives 12.56), 6.44 MiB with a 64-wide one (this 6.92). A 256-wide encoder at 224 px
    logged 1.35 MiB where this gives 1.15, 0.2 MiB low; projectors that tile or resize
    images (dynamic resolution) warm up at other sizes. Raises InvalidModelFile.
    """
    path = Path(path)
    reader = _open(path, "projector")
    weights = sum(int(t.n_bytes) for t in reader.tensors)
    if not weights:
        raise InvalidModelFile(f"{path}: the projector holds no tensors", path=str(path))

    def key(name: str) -> int:
        value = _field(reader, f"clip.vision.{name}")
        return int(value) if isinstance(value, int) else 0

    size, patch, width = key("image_size"), key("patch_size"), key("embedding_length")
    mlp = max(
        (int(t.shape[1]) for t in reader.tensors if t.name.startswith("mm.") and len(t.shape) > 1),
        default=0,
    )
    positions = (size // patch) ** 2 + 1 if size and patch else 0  # + a class embedding
    per_position = max(mlp + width, 5 * width // 2)
    compute = 3 * size * size * 4 + positions * per_position * 4
    return ProjectorSize(weights_mb=weights / MB, compute_mb=compute / MB)


def projector_mb(path: Path) -> float:
    """What a vision tier needs for its projector beyond its language model, in MiB
    (:func:`projector_size`); on the device the language model's layers are on."""
    return projector_size(path).total_mb


def shard_paths(path: Path, reader: Any) -> list[Path]:
    """Every file of a split model (``split.count`` > 1), as llama.cpp finds them next to
    the first; ``[path]`` for a single file. llama.cpp loads a split model only from its
    first shard (llama_model_loader), so another shard is an invalid model file."""
    count = _field(reader, "split.count") or 1
    if count <= 1:
        return [path]
    no = _field(reader, "split.no") or 0
    m = _SHARD.match(path.name)
    if no != 0 or m is None:
        raise InvalidModelFile(
            f"{path}: shard {no + 1} of {count} of a split model; give its first file "
            "(<name>-00001-of-0000N.gguf)",
            path=str(path),
        )
    return [
        path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]


def _tensors(paths: list[Path], first: Any) -> list[tuple[str, int, tuple[int, ...]]]:
    """(name, bytes, shape) of every tensor in every shard; InvalidModelFile for a shard
    that is missing, unreadable or truncated."""
    out = []
    for i, shard in enumerate(paths):
        reader = first if i == 0 else _open(shard, f"shard {i + 1} of {paths[0]}")
        size_of_file = shard.stat().st_size
        for t in reader.tensors:
            size = int(t.n_bytes)
            if int(t.data_offset) + size > size_of_file:
                raise InvalidModelFile(
                    f"{shard}: tensor {t.name} lies beyond the end of the file (truncated?)",
                    path=str(shard),
                )
            out.append((t.name, size, tuple(int(x) for x in t.shape)))
    return out


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read the header and tensor table of a GGUF file, every shard of a split one;
    raise InvalidModelFile if unusable."""
    path = Path(path)
    reader = _open(path, "model")
    shards = shard_paths(path, reader)  # later shards hold no architecture key
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidModelFile(f"{path}: no general.architecture key", path=str(path))

    def need(key: str, *, zero_ok: bool = False) -> int:
        value = _field(reader, f"{arch}.{key}")
        if not isinstance(value, int) or value < 0 or (value == 0 and not zero_ok):
            raise InvalidModelFile(f"{path}: missing or invalid key {arch}.{key}", path=str(path))
        return value

    n_layer = need("block_count")
    n_ctx_train = need("context_length")
    n_embd = need("embedding_length")
    layout = read_layout(arch, lambda key: _raw(reader, f"{arch}.{key}"), n_layer, n_embd)
    recurrent = any(la.rs for la in layout.layers)
    # A model without attention (Mamba) says head_count 0; anything else needs heads.
    n_head = need("attention.head_count", zero_ok=recurrent)
    n_head_kv = _field(reader, f"{arch}.attention.head_count_kv")
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    head_dim = _field(reader, f"{arch}.attention.key_length") or (n_embd // n_head if n_head else 0)

    tensors = _tensors(shards, reader)
    if not tensors:
        raise InvalidModelFile(f"{path}: the model holds no tensors", path=str(path))
    layer_bytes = [0] * n_layer
    other = output = 0
    sizes = {name: size for name, size, _ in tensors}
    for name, size, _ in tensors:
        m = _BLOCK.match(name)
        if m and int(m.group(1)) < n_layer:
            layer_bytes[int(m.group(1))] += size
            continue
        other += size
        if name in ("output.weight", "output_norm.weight"):
            output += size
    tied = 0 if "output.weight" in sizes else sizes.get("token_embd.weight", 0)
    output += tied

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else 0)
    if not n_vocab and "token_embd.weight" in sizes:
        n_vocab = next(shape[-1] for name, _, shape in tensors if name == "token_embd.weight")
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
        file_bytes=sum(p.stat().st_size for p in shards),
        layer_bytes=tuple(layer_bytes),
        other_bytes=other,
        output_bytes=output,
        tied_output_bytes=tied,
        family=layout,
        shards=tuple(shards) if len(shards) > 1 else (),
    )
