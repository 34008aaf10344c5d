"""Tiny random-weight GGUF models that llama.cpp really loads, for tests and the demo.

Architecture ``llama`` with a byte-fallback SentencePiece vocabulary: a few hundred KB,
loads in milliseconds, generates gibberish quickly. No weights are downloaded.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A list of parts (what the mtmd chat handler renders, an image part turned into its
# media marker) is joined; a string is as is. No newline follows a block tag, so the
# result is the same with and without jinja's trim_blocks (the mtmd handler sets it).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{{ m['content'] if m['content'] is string "
    "else m['content'] | map(attribute='text') | join('') }}"
    "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = ["the", "and", "model", "memory", "image", "hello", "world", "edison", "gpu", "fast"]


@dataclass(frozen=True)
class TinyShape:
    """Hyper-parameters of a tiny llama model."""

    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx_train: int = 256
    f16: bool = True

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _vocab() -> tuple[list[str], list[float], list[int]]:
    import gguf

    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    normal = ["\u2581"] + [c for c in string.printable[:94]] + [f"\u2581{w}" for w in WORDS]
    tokens += normal
    types += [gguf.TokenType.NORMAL] * len(normal)
    scores = [0.0] * 259 + [-float(i) for i in range(len(normal))]
    return tokens, scores, [int(t) for t in types]


def write_tiny_gguf(path: Path, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Write a loadable tiny llama GGUF file at ``path`` and return it."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    dt = np.float16 if shape.f16 else np.float32

    def w(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * 0.02).astype(dt)

    def norm(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(1 if shape.f16 else 0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    kv_dim = shape.head_dim * shape.n_head_kv
    writer.add_tensor("token_embd.weight", w(n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm(shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_q.weight", w(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", w(kv_dim, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", w(kv_dim, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", w(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm(shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(shape.n_embd, shape.n_ff))
    writer.add_tensor("output_norm.weight", norm(shape.n_embd))
    writer.add_tensor("output.weight", w(n_vocab, shape.n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
