"""Tiny LTX-Video, LTX-2, Wan 2.1, CogVideoX and SVD pipelines (see services.demo.tiny_families)."""

from __future__ import annotations

from services.demo.families.parts import (
    clip_image_processor,
    clip_vision,
    gemma_tokenizer,
    published_processor_name,
    t5_encoder,
)
from services.demo.tiny_pipelines import _t5_tokenizer


def _ltx():
    import torch
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    tokenizer = _t5_tokenizer()
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    )
    torch.manual_seed(2)
    # Patch 4 and three scaling blocks, as LTX-Video 0.9: 4 x 2**3 = 32 in space, 2**3 = 8
    # in time.
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return LTXPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=t5_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _ltx2():
    import torch
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = gemma_tokenizer()
    text_hidden, text_layers = 16, 2
    torch.manual_seed(1)
    text_encoder = Gemma3ForConditionalGeneration(
        Gemma3Config(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": text_hidden,
                "intermediate_size": 32,
                "num_hidden_layers": text_layers,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 8,
                "query_pre_attn_scalar": 8,
                "sliding_window": 64,
                "max_position_embeddings": 2048,
            },
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 16,
                "patch_size": 4,
            },
            mm_tokens_per_image=4,
            boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_turn>"),
            eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_turn>"),
            image_token_index=tokenizer.convert_tokens_to_ids("<mask>"),
        )
    ).eval()
    torch.manual_seed(0)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,  # audio latent channels x latent mel bins: 2 x 2
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=1,
        caption_channels=text_hidden,
        rope_double_precision=False,
        rope_type="split",
    )
    torch.manual_seed(3)
    connectors = LTX2TextConnectors(
        caption_channels=text_hidden,
        text_proj_in_factor=text_layers + 1,  # every hidden state, embeddings included
        video_connector_num_attention_heads=4,  # heads x dim = the text width
        video_connector_attention_head_dim=4,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=4,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
        rope_double_precision=False,
        rope_type="split",
    )
    torch.manual_seed(2)
    # The LTX-2 layout with tiny widths: patch 4 then spatial, temporal and two
    # spatiotemporal downsamples, 32 in space and 8 in time, stated as LTX-2's config does.
    vae = AutoencoderKLLTX2Video(
        latent_channels=4,
        block_out_channels=(8, 16, 32, 64),
        decoder_block_out_channels=(8, 16, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        decoder_inject_noise=(False,) * 4,
        decoder_causal=False,
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    )
    torch.manual_seed(5)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1, 2, 4),  # two downsamples: the real 4x in time and in mel bins
        num_res_blocks=1,
        latent_channels=2,
        sample_rate=16000,
        mel_hop_length=160,
        mel_bins=8,
    )
    torch.manual_seed(6)
    # LTX-2's vocoder: 100 mel frames a second, x 240 = 24 kHz stereo.
    vocoder = LTX2Vocoder(
        in_channels=2 * 8,
        hidden_channels=64,
        out_channels=2,
        upsample_kernel_sizes=[16, 15, 8, 4, 4],
        upsample_factors=[6, 5, 2, 2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        output_sampling_rate=24000,
    )
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )


def _wan_vae():
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(2)
    # Wan 2.1's layout: three spatial downsamples (8), two of them temporal too (4).
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def _wan_scheduler():
    from diffusers import UniPCMultistepScheduler

    # Wan's own: UniPC on flow sigmas.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )


def _wan_transformer(in_channels: int, image_dim: int | None = None):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=image_dim,
    )


def _wan_t2v():
    from diffusers import WanPipeline

    tokenizer = _t5_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(len(tokenizer), umt5=True),
        vae=_wan_vae(),
        scheduler=_wan_scheduler(),
        transformer=_wan_transformer(16),
    )


def _wan_i2v():
    from diffusers import WanImageToVideoPipeline

    tokenizer = _t5_tokenizer()
    # Wan 2.1 I2V: a CLIP vision tower's penultimate states condition the transformer, and
    # the first frame's latents and a mask join the noise (16 + 4 + 16 = 36 channels).
    image_encoder = clip_vision(image_size=32, patch_size=8, hidden=16, projection=False)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(len(tokenizer), umt5=True),
        vae=_wan_vae(),
        scheduler=_wan_scheduler(),
        image_processor=clip_image_processor(32),
        image_encoder=image_encoder,
        transformer=_wan_transformer(36, image_dim=16),
    )
    return published_processor_name(pipe, "image_processor")


def _cogvideox():
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tokenizer = _t5_tokenizer()
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=8,  # latent pixels: 64x64 and 9 frames by default (CogVideoX: 720x480, 49)
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,  # the pipeline pads prompts to 226 tokens, as CogVideoX
    )
    torch.manual_seed(2)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        clip_sample=False,
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(len(tokenizer)),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def _svd():
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8,  # x 8: 64x64 (SVD passes 576x1024 itself unless asked)
        in_channels=8,  # noise + the conditioning frame's latents
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=(4, 8),
        projection_class_embeddings_input_dim=3 * 32,  # fps, motion bucket, noise augmentation
        addition_time_embed_dim=32,
        num_frames=4,  # the default frame count (SVD: 14, SVD-XT: 25)
    )
    torch.manual_seed(2)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    # SVD resizes the image to 224x224 itself before its CLIP tower, as the real one's.
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=clip_vision(image_size=224, patch_size=32, hidden=32, projection=True),
        unet=unet,
        scheduler=scheduler,
        feature_extractor=clip_image_processor(224),
    )
    return published_processor_name(pipe, "feature_extractor")


BUILDERS = {
    "ltx": _ltx,
    "ltx2": _ltx2,
    "wan-t2v": _wan_t2v,
    "wan-i2v": _wan_i2v,
    "cogvideox": _cogvideox,
    "svd": _svd,
}
