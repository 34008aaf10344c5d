"""A tiny random-weight multimodal projector (mmproj GGUF) that llama.cpp's mtmd loads.

A CLIP-style vision encoder (patch embedding, position embedding, a few pre-norm
transformer blocks) and the LLaVA-1.5 two-layer MLP projector (``clip.projector_type``
``mlp``) into the language model's embedding size. With the tiny llama GGUF of
``tiny_gguf.py`` as the language model it makes a vision pair for tests and the demo:
a few hundred KB, an image is 16 tokens, the answers are noise. What each key and
tensor is for, and what failed before it loaded, is in ``docs/vision-projector.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# CLIP's own normalization (what LLaVA-1.5's mmproj files carry).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyVisionShape:
    """Hyper-parameters of a tiny CLIP vision encoder and its MLP projector."""

    n_embd_text: int = 64  # must equal the language model's n_embd (mtmd refuses otherwise)
    n_embd: int = 32
    n_ff: int = 64  # must differ from n_embd: see docs/vision-projector.md (ffn swap)
    n_layer: int = 2
    n_head: int = 2
    image_size: int = 32
    patch_size: int = 8
    proj_hidden: int = 64

    @property
    def n_patches(self) -> int:
        """The tokens one image takes in the language model's context."""
        return (self.image_size // self.patch_size) ** 2


def write_tiny_mmproj(
    path: Path, shape: TinyVisionShape = TinyVisionShape(), seed: int = 0
) -> Path:
    """Write a loadable tiny mmproj GGUF at ``path`` and return it."""
    import gguf

    if shape.n_ff == shape.n_embd:
        raise ValueError("n_ff must differ from n_embd (llama.cpp would swap ffn up and down)")
    if shape.image_size % shape.patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    rng = np.random.default_rng(seed)

    def w(*dims: int) -> np.ndarray:
        # numpy shape (out, in) is ggml ne [in, out]: a linear layer's weight.
        return (rng.standard_normal(dims) * 0.02).astype(np.float16)

    def vec(n: int, value: float = 0.0) -> np.ndarray:
        return np.full(n, value, dtype=np.float32)

    d, ff = shape.n_embd, shape.n_ff
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(path.stem)
    writer.add_description("tiny random-weight CLIP encoder + LLaVA MLP projector (Edison demo)")
    writer.add_file_type(1)  # mostly f16
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_audio_encoder", False)
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", shape.image_size)
    writer.add_uint32("clip.vision.patch_size", shape.patch_size)
    writer.add_uint32("clip.vision.embedding_length", d)
    writer.add_uint32("clip.vision.feed_forward_length", ff)
    writer.add_uint32("clip.vision.projection_dim", shape.n_embd_text)
    writer.add_uint32("clip.vision.block_count", shape.n_layer)
    writer.add_uint32("clip.vision.attention.head_count", shape.n_head)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", list(IMAGE_MEAN))
    writer.add_array("clip.vision.image_std", list(IMAGE_STD))

    # The patch embedding is a convolution: ggml kernel ne [patch, patch, 3, n_embd].
    p = shape.patch_size
    writer.add_tensor("v.patch_embd.weight", w(d, 3, p, p))
    writer.add_tensor("v.patch_embd.bias", vec(d))
    writer.add_tensor("v.position_embd.weight", w(shape.n_patches, d))
    writer.add_tensor("v.pre_ln.weight", vec(d, 1.0))
    writer.add_tensor("v.pre_ln.bias", vec(d))
    for i in range(shape.n_layer):
        blk = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{blk}.{name}.weight", w(d, d))
            writer.add_tensor(f"{blk}.{name}.bias", vec(d))
        for name in ("ln1", "ln2"):
            writer.add_tensor(f"{blk}.{name}.weight", vec(d, 1.0))
            writer.add_tensor(f"{blk}.{name}.bias", vec(d))
        writer.add_tensor(f"{blk}.ffn_up.weight", w(ff, d))
        writer.add_tensor(f"{blk}.ffn_up.bias", vec(ff))
        writer.add_tensor(f"{blk}.ffn_down.weight", w(d, ff))
        writer.add_tensor(f"{blk}.ffn_down.bias", vec(d))
    # The LLaVA-1.5 projector: mm.0 (linear), GELU, mm.2 (linear) into the text model.
    writer.add_tensor("mm.0.weight", w(shape.proj_hidden, d))
    writer.add_tensor("mm.0.bias", vec(shape.proj_hidden))
    writer.add_tensor("mm.2.weight", w(shape.n_embd_text, shape.proj_hidden))
    writer.add_tensor("mm.2.bias", vec(shape.n_embd_text))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
