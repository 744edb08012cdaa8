"""A tiny CLIP for the shapes data set: a transformers CLIPModel trained contrastively on captions
(Radford et al. 2021: a symmetric cross-entropy over the batch's image-caption similarities), with a
CLIP tokenizer trained offline on the captions' words. Saved with save_pretrained, it is what any
user's CLIP is to this project: `--verifier clip:FOLDER` of a text bundle (export/scorer.py), and its
text tower a text encoder to condition a generator on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.shapes import ShapesConfig, batch, vocabulary

# CLIP's own pixel normalisation (export/scorer.py applies the same inside the score graph)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipConfig:
    width: int = 64  # both towers' width and the shared embedding's
    layers: int = 2  # transformer layers per tower
    heads: int = 4
    patch: int = 4  # the vision tower's patch size
    # caption tokens, <|startoftext|> and <|endoftext|> included: the longest caption (two objects and their
    # relation) is 25 in the shapes tokenizer's pieces, and at 16 the second object was cut from every such caption
    max_length: int = 32
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


def shapes_tokenizer(max_length: int = ClipConfig.max_length):
    """A CLIP tokenizer (byte-level BPE with </w>) trained on the shapes vocabulary and captions."""
    from distill.text import train_tokenizer

    sentences = vocabulary() * 4 + [scene.caption for scene in batch(range(512))[1]]
    tokenizer = train_tokenizer("clip", sentences, vocab_size=400)
    tokenizer.model_max_length = max_length
    return tokenizer


def clip_model(config: ClipConfig, tokenizer, image_size: int):
    import transformers

    return transformers.CLIPModel(transformers.CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": config.width, "intermediate_size": 4 * config.width,
                     "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
                     "max_position_embeddings": config.max_length, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": config.width, "intermediate_size": 4 * config.width,
                       "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
                       "image_size": image_size, "patch_size": config.patch},
        projection_dim=config.width))


def clip_features(output) -> torch.Tensor:
    """transformers 4 returns CLIP's projected features, 5 an output whose pooler_output holds them."""
    return output if torch.is_tensor(output) else output.pooler_output


def embed(model, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and text embeddings; images in [-1, 1], normalised as CLIP expects."""
    mean, std = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1), torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    image = clip_features(model.get_image_features(pixel_values=((images + 1) / 2 - mean) / std))
    text = clip_features(model.get_text_features(input_ids=ids))
    return nn.functional.normalize(image, dim=-1), nn.functional.normalize(text, dim=-1)


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def contrastive_loss(model, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy: each image's caption among the batch's, each caption's image likewise."""
    image, text = embed(model, images, ids)
    logits = model.logit_scale.exp() * image @ text.T
    target = torch.arange(len(images))
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def train_clip(config: ClipConfig = ClipConfig(), shapes: ShapesConfig | None = None, progress: bool = True):
    """(CLIPModel, tokenizer), trained on fresh training scenes every step (held-out pairs never seen)."""
    from tqdm import tqdm

    shapes = shapes or ShapesConfig()
    torch.manual_seed(config.seed)
    tokenizer = shapes_tokenizer(config.max_length)
    model = clip_model(config, tokenizer, shapes.size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    bar = tqdm(range(config.steps), desc="clip", disable=not progress)
    for step in bar:
        images, scenes = batch(range(step * config.batch_size, (step + 1) * config.batch_size), shapes)
        loss = contrastive_loss(model, torch.from_numpy(images), token_ids(tokenizer, [s.caption for s in scenes]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP: the temperature stays above 0.01
        for group in optimiser.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / config.steps))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False), tokenizer


def save_clip(model, tokenizer, folder: str | Path) -> Path:
    """The save_pretrained layout a user's CLIP has: model, tokenizer and preprocessor_config.json."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
         "crop_size": model.config.vision_config.image_size}, indent=2))
    return folder
