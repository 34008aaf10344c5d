"""Tiny random-weight diffusers pipelines that really run, for tests and the demo.

Built from configs only (no download, works with ``HF_HUB_OFFLINE=1``), seeded so the
same call writes the same weights, and saved with ``save_pretrained`` so that
``DiffusionPipeline.from_pretrained(folder)`` reloads them like any real pipeline folder.
Each folder is a few MB; one step runs in well under a second on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from services.settings import KINDS

# Music: StableAudio's longest clip is sample_size * hop_length / sampling_rate.
# 16 kHz and a hop of 2*4*4*4 = 128 give 125 latent frames per second; 2048 frames is 16.384 s,
# just over the demo's `max_duration_s: 16`.
MUSIC_SAMPLING_RATE = 16_000
MUSIC_DOWNSAMPLING = [2, 4, 4, 4]
MUSIC_SAMPLE_SIZE = 2048
MUSIC_MAX_DURATION_S = MUSIC_SAMPLE_SIZE * 128 / MUSIC_SAMPLING_RATE

WORDS = ["a", "the", "cat", "dog", "music", "piano", "sunset", "city", "video", "edison"]


def write_tiny_pipeline(kind: str, folder: Path) -> Path:
    """Build the tiny ``kind`` pipeline ("image" | "video" | "music"), save it in ``folder``."""
    builders = {"image": _image, "video": _video, "music": _music}
    if kind not in builders:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {KINDS}")
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Why: seeding before each component makes the saved weights identical run to run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = builders[kind]()
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    # A handful of whole words so prompts do not spell out byte by byte.
    for word in WORDS:
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def _clip_text_encoder(vocab_size: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=32,
    )
    return CLIPTextModel(config).eval()


def _unet_kwargs(layers_per_block: int) -> dict:
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=layers_per_block,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )


def _ddim(**extra):
    from diffusers import DDIMScheduler

    config = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return DDIMScheduler(**{**config, **extra})


def _image():
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_kwargs(layers_per_block=1))
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_clip_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _video():
    import torch
    from diffusers import (
        AnimateDiffPipeline,
        MotionAdapter,
        UNet2DConditionModel,
        UNetMotionModel,
    )

    tokenizer = _clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_kwargs(layers_per_block=1))
    torch.manual_seed(3)
    adapter = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=4,
        motion_max_seq_length=32,
    )
    # Why merge here: the pipeline would otherwise save the adapter twice (inside the motion
    # UNet and as its own folder); reloading needs only the merged UNetMotionModel.
    motion_unet = UNetMotionModel.from_unet2d(unet, adapter)
    return AnimateDiffPipeline(
        vae=_vae(),
        text_encoder=_clip_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=motion_unet,
        motion_adapter=None,
        scheduler=_ddim(beta_schedule="linear", timestep_spacing="linspace"),
        feature_extractor=None,
        image_encoder=None,
    )


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [f"\u2581{w}" for w in WORDS]
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=32)


def _music():
    import torch
    from diffusers import (
        AutoencoderOobleck,
        EDMDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
    )
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _t5_tokenizer()
    torch.manual_seed(4)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    torch.manual_seed(5)
    transformer = StableAudioDiTModel(
        sample_size=MUSIC_SAMPLE_SIZE,
        in_channels=3,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        num_key_value_attention_heads=2,
        out_channels=3,
        cross_attention_dim=4,
        time_proj_dim=8,
        global_states_input_dim=8,
        cross_attention_input_dim=4,
    )
    torch.manual_seed(6)
    vae = AutoencoderOobleck(
        encoder_hidden_size=6,
        downsampling_ratios=MUSIC_DOWNSAMPLING,
        channel_multiples=[1, 2, 2, 2],
        decoder_channels=6,
        decoder_input_channels=3,
        audio_channels=2,
        sampling_rate=MUSIC_SAMPLING_RATE,
    )
    torch.manual_seed(7)
    projection = StableAudioProjectionModel(
        text_encoder_dim=32, conditioning_dim=4, min_value=0, max_value=32
    )
    # Why EDM DPM-Solver: the default CosineDPMSolverMultistepScheduler needs torchsde.
    scheduler = EDMDPMSolverMultistepScheduler(
        prediction_type="v_prediction", sigma_data=1.0, sigma_min=0.3, sigma_max=500.0
    )
    return StableAudioPipeline(
        vae=vae,
        text_encoder=text_encoder,
        projection_model=projection,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
    )
