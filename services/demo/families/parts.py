"""Pieces the tiny families share: tokenizers built in code, small encoders, a VAE."""

from __future__ import annotations

from services.demo.tiny_pipelines import WORDS, _byte_chars


def byte_level_bpe(specials: list[str], space: str = "\u0120") -> tuple[dict, list]:
    """A GPT-2 style byte-level vocabulary (Qwen2, RoBERTa): specials, the 256 byte
    characters, and merges that make ``space + word`` one token for each of WORDS."""
    tokens = list(specials) + _byte_chars()
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = [space, *word]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged, *pieces[2:]]
    return {t: i for i, t in enumerate(tokens)}, merges


QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def qwen2_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_level_bpe(QWEN_SPECIALS)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)


def roberta_tokenizer():
    from transformers import RobertaTokenizer

    vocab, merges = byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def gemma_tokenizer():
    """SentencePiece-style BPE with byte fallback, as Gemma 3's tokenizer is."""
    from transformers import GemmaTokenizer

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = ["\u2581", *word]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged, *pieces[2:]]
    vocab = {t: i for i, t in enumerate(tokens)}
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=1024)


def t5_encoder(vocab_size: int, d_model: int = 32, umt5: bool = False):
    import torch
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(4)
    config_class, model_class = (
        (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    )
    config = config_class(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    # Why eval(): a model built directly is in training mode, with dropout on.
    return model_class(config).eval()


def clip_vision(image_size: int, patch_size: int, hidden: int, projection: bool):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(8)
    config = CLIPVisionConfig(
        hidden_size=hidden,
        projection_dim=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    return (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(config).eval()


def clip_image_processor(size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )


def published_processor_name(pipe, component: str):
    """Record ``CLIPImageProcessor`` in model_index.json, as published folders do.

    Without torchvision, transformers builds its PIL variant and the saved folder would name
    ``CLIPImageProcessorPil``; the published name loads either way (transformers falls back).
    """
    pipe.register_to_config(**{component: ("transformers", "CLIPImageProcessor")})
    return pipe


def kl_vae(latent_channels: int, **extra):
    """An SD-style AutoencoderKL with four blocks: the real scale factor of 8."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        **extra,
    )
