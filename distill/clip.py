"""A tiny CLIP for the shapes data set: an image tower and a text tower trained contrastively on
captions (Radford et al. 2021: a symmetric cross-entropy over the batch's image-caption similarities).
Its text tower is what a shapes generator is conditioned on; its score, `forward(image, ids)`, follows
the scorer signature of export/scorer.py, so it is the shapes bundle's search verifier as it stands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distill.shapes import ShapesConfig, batch, word_tokenizer

PAD, EOS = 0, 1  # word_tokenizer's ids


@dataclass(frozen=True)
class ClipConfig:
    width: int = 64  # the shared embedding's width (and the text tower's)
    channels: int = 32  # the image tower's first convolution
    layers: int = 2  # text transformer layers
    heads: int = 4
    max_length: int = 16  # caption tokens, <eos> included
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


class TextTower(nn.Module):
    """ids [B, L] -> features [B, width]: word and position embeddings, a transformer that ignores the
    padding, the hidden state at <eos>, projected."""

    def __init__(self, vocab: int, config: ClipConfig):
        super().__init__()
        self.words = nn.Embedding(vocab, config.width)
        self.positions = nn.Parameter(torch.randn(config.max_length, config.width) * 0.02)
        layer = nn.TransformerEncoderLayer(config.width, config.heads, 4 * config.width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm, self.projection = nn.LayerNorm(config.width), nn.Linear(config.width, config.width, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.transformer(self.words(ids) + self.positions[: ids.shape[1]], src_key_padding_mask=ids == PAD)
        at_eos = (ids == EOS).float().argmax(dim=1)  # the first <eos> of each caption
        return self.projection(self.norm(h[torch.arange(ids.shape[0]), at_eos]))


class ImageTower(nn.Module):
    """image [B, 3, H, W] in [-1, 1] -> features [B, width]."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        c = config.channels

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                                 nn.MaxPool2d(2))

        width = config.width
        self.features = nn.Sequential(block(3, c), block(c, 2 * c), block(2 * c, 2 * c), nn.Flatten(),
                                      nn.LazyLinear(2 * width), nn.SiLU(), nn.Linear(2 * width, width))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.features(image)


class ShapesClip(nn.Module):
    """(image, ids) -> score = exp(logit_scale) x cosine(image features, text features)."""

    input_names = ("image", "ids")
    output_name = "score"

    def __init__(self, config: ClipConfig = ClipConfig(), image_size: int = 32):
        super().__init__()
        self.config = config
        self.text = TextTower(word_tokenizer(config.max_length).get_vocab_size(), config)
        self.image = ImageTower(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.image(torch.zeros(1, 3, image_size, image_size))  # materialise the lazy layer

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text(ids), dim=-1)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image(image), dim=-1)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * (self.embed_image(image) * self.embed_text(ids)).sum(-1)


def token_ids(captions: list[str], max_length: int = 16) -> torch.Tensor:
    tokenizer = word_tokenizer(max_length)
    return torch.tensor([encoding.ids for encoding in tokenizer.encode_batch(captions)])


def contrastive_loss(model: ShapesClip, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy: each image's caption among the batch's, each caption's image likewise."""
    logits = model.logit_scale.exp() * model.embed_image(images) @ model.embed_text(ids).T
    target = torch.arange(len(images))
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def train_clip(config: ClipConfig = ClipConfig(), shapes: ShapesConfig | None = None,
               progress: bool = True) -> ShapesClip:
    """Fresh training scenes every step (the held-out colour-shape pairs are never seen)."""
    from tqdm import tqdm

    shapes = shapes or ShapesConfig()
    torch.manual_seed(config.seed)
    model = ShapesClip(config, shapes.size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    bar = tqdm(range(config.steps), desc="clip", disable=not progress)
    for step in bar:
        images, scenes = batch(range(step * config.batch_size, (step + 1) * config.batch_size), shapes)
        loss = contrastive_loss(model, torch.from_numpy(images), token_ids([s.caption for s in scenes],
                                                                           config.max_length))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP: the temperature stays above 0.01
        for group in optimiser.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / config.steps))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)
