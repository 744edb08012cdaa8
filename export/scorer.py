"""Text-image scorers: the verifier of a text bundle, what Best-of-N search ranks candidates by.

The signature any scorer graph follows (CLIP here; PickScore or an ImageReward-style model plug in the
same way, exported from their own torch modules):

    inputs   image [B, 3, H, W] float32 in [-1, 1]   the served images, as the decoder makes them
             ids   [B, L] int64                      the prompt in the scorer's own tokens
    output   score [B] float32                       higher = a better match of image and prompt

and a tokenizer file (HF `tokenizers` JSON, padding and truncation to L set) that the server turns
prompts into `ids` with. Preprocessing (resizing, the scorer's normalisation) lives inside the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from distill.clip import CLIP_MEAN, CLIP_STD, clip_features
from distill.diffusers_models import local_folder


class ClipScoreGraph(nn.Module):
    """(image, ids) -> CLIP's logit: logit_scale x cosine(image features, text features)."""

    input_names = ("image", "ids")
    output_name = "score"

    def __init__(self, model: nn.Module, size: int, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.model, self.size = model.eval(), size
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1))

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # square images: CLIP's resize of the short side and centre crop is one resize
        pixels = nn.functional.interpolate((image.clamp(-1, 1) + 1) / 2, size=(self.size, self.size),
                                           mode="bilinear", align_corners=False, antialias=False)
        image_features = clip_features(self.model.get_image_features(pixel_values=(pixels - self.mean) / self.std))
        text_features = clip_features(self.model.get_text_features(input_ids=ids))
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (image_features * text_features).sum(-1)


def scorer_inputs(scorer: nn.Module, tokenizer, image_shape: tuple[int, int, int]):
    """make(batch) -> random parity inputs of a scorer graph: images in [-1, 1] and token ids."""
    def make(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed + batch)
        return {"image": torch.rand((batch, *image_shape), generator=generator) * 2 - 1,
                "ids": torch.randint(0, len(tokenizer), (batch, tokenizer.model_max_length), generator=generator)}
    return make


def load_clip_scorer(folder: str | Path) -> tuple[ClipScoreGraph, object]:
    """A transformers CLIPModel saved with save_pretrained, its tokenizer beside it (and, if present, its
    preprocessor_config.json for the normalisation): the score graph and the tokenizer."""
    from transformers import AutoTokenizer, CLIPModel

    folder = local_folder(folder, "--verifier clip:FOLDER")
    model = CLIPModel.from_pretrained(folder, local_files_only=True).float().eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.model_max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    mean, std = CLIP_MEAN, CLIP_STD
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        config = json.loads(preprocessor.read_text())
        mean, std = config.get("image_mean", mean), config.get("image_std", std)
    return ClipScoreGraph(model, model.config.vision_config.image_size, mean, std), tokenizer
