"""Tiny ACE-Step 1.5 and AudioLDM2 pipelines (see services.demo.tiny_families)."""

from __future__ import annotations

from services.demo.families.parts import qwen2_tokenizer, roberta_tokenizer, t5_encoder
from services.demo.tiny_pipelines import _t5_tokenizer

ACE_STEP_SAMPLING_RATE = 48_000  # ACE-Step 1.5's VAE: 48 kHz stereo, 1920 samples a latent
ACE_STEP_DOWNSAMPLING = [2, 4, 4, 6, 10]


def _ace_step():
    import torch
    from diffusers import AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step import (
        AceStepAudioTokenDetokenizer,
        AceStepAudioTokenizer,
        AceStepConditionEncoder,
        AceStepPipeline,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen2_tokenizer()  # ACE-Step's text encoder is Qwen3-Embedding-0.6B
    torch.manual_seed(1)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
        )
    ).eval()
    # The widths the pieces share: attention blocks of 32, 8 acoustic latent channels.
    blocks = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rope_theta=10000.0,
        sliding_window=16,
    )
    torch.manual_seed(0)
    transformer = AceStepTransformer1DModel(
        **blocks,
        num_hidden_layers=1,
        in_channels=24,  # noise, source latents and chunk mask: 3 x 8
        audio_acoustic_hidden_dim=8,
        patch_size=2,
    )
    torch.manual_seed(3)
    condition_encoder = AceStepConditionEncoder(
        **blocks,
        text_hidden_dim=32,
        timbre_hidden_dim=8,
        num_lyric_encoder_hidden_layers=1,
        num_timbre_encoder_hidden_layers=1,
    )
    pooler = dict(
        blocks,
        audio_acoustic_hidden_dim=8,
        pool_window_size=2,
        num_attention_pooler_hidden_layers=1,
    )
    torch.manual_seed(5)
    audio_tokenizer = AceStepAudioTokenizer(
        **pooler, fsq_dim=32, fsq_input_levels=[4, 4, 4], fsq_input_num_quantizers=1
    )
    torch.manual_seed(6)
    audio_token_detokenizer = AceStepAudioTokenDetokenizer(**pooler)
    torch.manual_seed(2)
    vae = AutoencoderOobleck(
        encoder_hidden_size=4,
        downsampling_ratios=ACE_STEP_DOWNSAMPLING,
        channel_multiples=[1, 1, 1, 1, 1],
        decoder_channels=4,
        decoder_input_channels=8,
        audio_channels=2,
        sampling_rate=ACE_STEP_SAMPLING_RATE,
    )
    return AceStepPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        condition_encoder=condition_encoder,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),
        audio_tokenizer=audio_tokenizer,
        audio_token_detokenizer=audio_token_detokenizer,
    )


AUDIOLDM2_SAMPLING_RATE = 16_000  # 100 mel frames a second, 160 samples each, as AudioLDM2


def _audioldm2():
    import torch
    from diffusers import (
        AudioLDM2Pipeline,
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
        AutoencoderKL,
        DDIMScheduler,
    )
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        GPT2Config,
        GPT2LMHeadModel,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    tokenizer = roberta_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    torch.manual_seed(0)
    unet = AudioLDM2UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(8, 16),
    )
    torch.manual_seed(2)
    # Three blocks: the mel spectrogram is downsampled 4x, as AudioLDM2's VAE does.
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    torch.manual_seed(1)
    text_encoder = ClapModel(
        ClapConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 8,
                "intermediate_size": 37,
                "num_attention_heads": 1,
                "num_hidden_layers": 1,
                "projection_dim": 8,
                "bos_token_id": 0,
                "pad_token_id": 1,
                "eos_token_id": 2,
            },
            audio_config={
                "spec_size": 8,
                "window_size": 4,
                "num_mel_bins": 8,
                "intermediate_size": 37,
                "depths": [1, 1],
                "num_attention_heads": [1, 1],
                "num_hidden_layers": 1,
                "hidden_size": 192,
                "projection_dim": 8,
                "patch_size": 2,
                "patch_stride": 2,
                "patch_embed_input_channels": 4,
            },
            projection_dim=16,
        )
    ).eval()
    feature_extractor = ClapFeatureExtractor(
        feature_size=8, sampling_rate=48_000, hop_length=480, max_length_s=10, fft_window_size=64
    )
    torch.manual_seed(4)
    text_encoder_2 = t5_encoder(len(tokenizer_2))
    torch.manual_seed(7)
    language_model = GPT2LMHeadModel(
        GPT2Config(
            n_embd=16,
            n_head=1,
            n_layer=1,
            vocab_size=len(tokenizer),
            n_ctx=99,
            n_positions=99,
            bos_token_id=0,
            eos_token_id=2,
        )
    ).eval()
    language_model.config.max_new_tokens = 8  # AudioLDM2 reads its default from here
    torch.manual_seed(8)
    projection_model = AudioLDM2ProjectionModel(
        text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16
    )
    torch.manual_seed(9)
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=16,  # mel bins
            sampling_rate=AUDIOLDM2_SAMPLING_RATE,
            upsample_initial_channel=16,
            upsample_rates=[10, 4, 4],  # 160 samples a mel frame
            upsample_kernel_sizes=[20, 8, 8],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3, 5]],
            normalize_before=False,
        )
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return AudioLDM2Pipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        projection_model=projection_model,
        language_model=language_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        feature_extractor=feature_extractor,
        unet=unet,
        scheduler=scheduler,
        vocoder=vocoder,
    )


BUILDERS = {"ace-step": _ace_step, "audioldm2": _audioldm2}
