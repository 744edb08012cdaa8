"""Prompts to text conditions: each family's tokenizers and text encoders, combined the way its
diffusers pipeline combines them, as one module from token ids to the packed condition.

- SD3: CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded to T5's width, then
  T5's tokens after them; the pooled embedding is both CLIPs' projections side by side.
- FLUX: T5's tokens; the pooled embedding is CLIP-L's pooled output.
- SANA: its decoder-only text model's last hidden states, with the attention mask (prompts are
  encoded as given: SanaPipeline's optional "complex human instruction" prefix is not added).

The module is what export writes as the conditioning graph, so training and serving encode alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from distill.diffusers_models import Family, TextLayout, family_of, local_folder


@dataclass(frozen=True)
class TokenizerSpec:
    folder: str  # tokenizer, tokenizer_2, ...
    max_length: int
    pad_id: int


# (tokenizer folder, encoder folder, the pipeline's max_length, the transformers class) per family, in
# the graph's input order; SD3's CLIPs are loaded with their projection, which gives the pooled embedding
ENCODERS = {
    "sd3": (("tokenizer", "text_encoder", 77, "CLIPTextModelWithProjection"),
            ("tokenizer_2", "text_encoder_2", 77, "CLIPTextModelWithProjection"),
            ("tokenizer_3", "text_encoder_3", 256, "T5EncoderModel")),
    "flux": (("tokenizer", "text_encoder", 77, "CLIPTextModel"),
             ("tokenizer_2", "text_encoder_2", 512, "T5EncoderModel")),
    "sana": (("tokenizer", "text_encoder", 300, "AutoModel"),),
}


class TextConditioner(nn.Module):
    """(token ids of each tokenizer, [B, L_i] int64) -> the condition [B, rows, width]."""

    output_name = "condition"

    def __init__(self, family: Family, encoders: list[nn.Module], tokenizers: list[TokenizerSpec],
                 layout: TextLayout):
        super().__init__()
        self.family, self.layout, self.tokenizers = family, layout, tokenizers
        self.encoders = nn.ModuleList(encoders)
        self.input_names = tuple(f"ids_{i}" for i in range(len(encoders)))

    def forward(self, ids_0: torch.Tensor, ids_1: torch.Tensor | None = None,
                ids_2: torch.Tensor | None = None) -> torch.Tensor:
        # named arguments, not *ids: the exporter names and batches the graph's inputs by them
        ids = (ids_0, ids_1, ids_2)
        if self.family.name == "sd3":
            clip_l, clip_g, t5 = self.encoders
            out_l = clip_l(ids[0], output_hidden_states=True)
            out_g = clip_g(ids[1], output_hidden_states=True)
            clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
            tokens = t5(ids[2], return_dict=False)[0]
            clip = nn.functional.pad(clip, (0, tokens.shape[-1] - clip.shape[-1]))
            return self.layout.pack(torch.cat([clip, tokens], dim=1),
                                    pooled=torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1))
        if self.family.name == "flux":
            clip, t5 = self.encoders
            pooled = clip(ids[0], return_dict=False)[1]
            return self.layout.pack(t5(ids[1], return_dict=False)[0], pooled=pooled)
        mask = (ids[0] != self.tokenizers[0].pad_id).long()
        return self.layout.pack(self.encoders[0](ids[0], attention_mask=mask, return_dict=False)[0], mask=mask)


def load_tokenizers(path: str | Path, family: Family) -> list:
    """The pipeline's tokenizers (transformers), each with the max length it pads and truncates to."""
    from transformers import AutoTokenizer

    tokenizers = []
    for folder, _, max_length, _ in ENCODERS[family.name]:
        tokenizer = AutoTokenizer.from_pretrained(local_folder(Path(path) / folder, f"the pipeline's {folder}"),
                                                  local_files_only=True)
        # the pipeline's length, unless the tokenizer (and so its encoder) holds fewer positions
        tokenizer.model_max_length = min(max_length, tokenizer.model_max_length)
        tokenizers.append(tokenizer)
    return tokenizers


def tokenize(tokenizers: list, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids per tokenizer, padded and truncated to its max length, as the diffusers pipelines do."""
    return [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids for tokenizer in tokenizers]


def load_conditioner(path: str | Path) -> tuple[TextConditioner, list]:
    """The pipeline folder's text encoders as one conditioner, and its tokenizers."""
    import transformers

    family = family_of(path)
    tokenizers = load_tokenizers(path, family)
    encoders = [getattr(transformers, class_name).from_pretrained(
                    local_folder(Path(path) / folder, f"the pipeline's {folder}"), local_files_only=True).float().eval()
                for _, folder, _, class_name in ENCODERS[family.name]]
    specs = [TokenizerSpec(folder, tokenizer.model_max_length, tokenizer.pad_token_id)
             for (folder, *_), tokenizer in zip(ENCODERS[family.name], tokenizers, strict=True)]
    conditioner = TextConditioner(family, encoders, specs, _layout(family, encoders, specs))
    return conditioner.requires_grad_(False), tokenizers


def _layout(family: Family, encoders: list[nn.Module], specs: list[TokenizerSpec]) -> TextLayout:
    """The condition's layout, from the encoders' widths (what each pipeline's combination yields)."""
    if family.name == "sd3":
        pooled = sum(encoder.config.projection_dim for encoder in encoders[:2])
        return TextLayout(specs[0].max_length + specs[2].max_length, encoders[2].config.d_model, pooled)
    if family.name == "flux":
        return TextLayout(specs[1].max_length, encoders[1].config.d_model, encoders[0].config.hidden_size)
    return TextLayout(specs[0].max_length, encoders[0].config.hidden_size, mask=True)


@torch.no_grad()
def encode_prompts(conditioner: TextConditioner, tokenizers: list, prompts: list[str],
                   batch_size: int = 32) -> torch.Tensor:
    """Conditions [N, rows, width] for N prompts, encoded in batches (with a progress bar beyond a few)."""
    starts = range(0, len(prompts), batch_size)
    chunks = [conditioner(*tokenize(tokenizers, prompts[i:i + batch_size]))
              for i in tqdm(starts, desc="encoding prompts", unit="batch", leave=False, disable=len(starts) <= 4)]
    return torch.cat(chunks)


def train_tokenizer(kind: str, sentences: list[str], vocab_size: int = 320):
    """A transformers tokenizer trained offline on `sentences` (tests and benchmarks with random weights
    have no real vocabulary to load): "clip" (byte-level BPE with </w>, as CLIP's), "t5" (Unigram, as
    T5's) or "generic" (a fast Unigram tokenizer with <pad> and </s>, e.g. a stand-in for SANA's Gemma)."""
    import json

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "clip":
        bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                     pre_tokenizers.ByteLevel(use_regex=False)])
        bpe.train_from_iterator(sentences, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        model = json.loads(bpe.to_str())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        return transformers.CLIPTokenizer(vocab=model["vocab"], merges=merges)
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer, unigram.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    unigram.train_from_iterator(sentences, trainers.UnigramTrainer(
        vocab_size=max(vocab_size // 4, 40), special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    if kind == "t5":
        return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
