"""Tiny random diffusers text-to-image pipelines (SD3, FLUX, SANA) saved with save_pretrained: the
transformer, the VAE and each family's text encoders, with tokenizers trained offline on a few
captions (distill/text.py: train_tokenizer). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

CAPTIONS = ["a red circle left of a blue square", "a small green triangle above a yellow star",
            "a photo of a cat on a sofa", "two dogs running on the grass", "a large purple square",
            "an orange star below a white circle", "a blue triangle right of a red square"]
FAMILIES = ("sd3", "flux", "sana")
LATENT = (4, 16, 16)  # latent channels and size: 32 px images through a 2-block VAE (SANA wants 32k)
TOKENS = {"clip": 12, "t5": 10, "gemma": 10}  # tokenizer max lengths (the real ones: 77, 256 / 512, 300)


def _trained_tokenizer(kind: str):
    from distill.text import train_tokenizer

    return train_tokenizer("generic" if kind == "gemma" else kind, CAPTIONS * 3)


def _clip(tokenizer, projection: int | None, width: int):
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENS["clip"], projection_dim=projection or width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config)


def _t5(tokenizer, width: int):
    import transformers

    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=8, num_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def _gemma(tokenizer, width: int):
    import transformers

    return transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))


def _transformer(family: str):
    import diffusers

    channels, size, _ = LATENT
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=size, patch_size=2, in_channels=channels, out_channels=channels, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
            pooled_projection_dim=32, pos_embed_max_size=16)
    if family == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=channels * 4, out_channels=channels * 4, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
            axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    return diffusers.SanaTransformer2DModel(
        in_channels=channels, out_channels=channels, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=size)


def _vae(family: str):
    import diffusers

    if family == "sana":  # SANA's deep-compression autoencoder, two blocks: 2x like the others here
        return diffusers.AutoencoderDC(
            latent_channels=LATENT[0], attention_head_dim=4, encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
            decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), scaling_factor=0.41)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=LATENT[0],
        norm_num_groups=4, sample_size=LATENT[1] * 2)


def tiny_pipeline(family: str, out: str | Path, seed: int = 0) -> Path:
    """Write a tiny random `family` pipeline folder (model_index.json and its subfolders) to `out`."""
    out = Path(out)
    torch.manual_seed(seed)
    import diffusers

    from distill.diffusers_models import save_pipeline

    parts = {"transformer": _transformer(family), "vae": _vae(family),
             "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)}
    if family == "sd3":
        clip_l, clip_g, t5 = _trained_tokenizer("clip"), _trained_tokenizer("clip"), _trained_tokenizer("t5")
        parts.update(tokenizer=clip_l, tokenizer_2=clip_g, tokenizer_3=t5, text_encoder=_clip(clip_l, 16, 16),
                     text_encoder_2=_clip(clip_g, 16, 16), text_encoder_3=_t5(t5, 32))
    elif family == "flux":
        clip, t5 = _trained_tokenizer("clip"), _trained_tokenizer("t5")
        parts.update(tokenizer=clip, tokenizer_2=t5, text_encoder=_clip(clip, None, 16), text_encoder_2=_t5(t5, 32))
    else:
        gemma = _trained_tokenizer("gemma")
        parts.update(tokenizer=gemma, text_encoder=_gemma(gemma, 16))
    for name, part in parts.items():
        if name.startswith("tokenizer"):
            kind = "clip" if "CLIP" in type(part).__name__ else "t5" if "T5" in type(part).__name__ else "gemma"
            part.model_max_length = TOKENS[kind]
    return save_pipeline(out, {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
                               "sana": "SanaPipeline"}[family], parts)


def tiny_clip(out: str | Path, seed: int = 0) -> Path:
    """A tiny random transformers CLIPModel with its tokenizer, saved to `out` (a text-image scorer)."""
    import transformers

    from distill.text import train_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_tokenizer("clip", CAPTIONS * 3)
    tokenizer.model_max_length = TOKENS["clip"]
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": TOKENS["clip"],
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
