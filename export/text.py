"""A bundle's text conditioning: each tokenizer as a `tokenizers` JSON file that pads and truncates
as the diffusers pipeline does (so the torch-free server tokenizes alike), and the text encoders as one
graph from token ids to the packed condition."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from export.bundle import GraphEntry, TextEntry, sha256_of
from export.onnx_export import ExportError

# what the tokenizer files are checked on against transformers: empty, short, long (truncated), odd
PROBE_PROMPTS = ("", "a red circle", "a photo of a cat sitting on a sofa beside a window, soft light, " * 12,
                 "Ünïcode — 数字 and digits 0123456789")


def tokenizer_file(tokenizer, path: Path) -> Path:
    """`tokenizer`'s fast backend with its padding and truncation to `model_max_length` set, saved as
    one JSON file that the `tokenizers` library loads without transformers."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.enable_truncation(tokenizer.model_max_length)
    backend.enable_padding(length=tokenizer.model_max_length, pad_id=tokenizer.pad_token_id,
                           pad_token=tokenizer.pad_token)
    backend.save(str(path))
    check_tokenizer_file(tokenizer, path)
    return path


def check_tokenizer_file(tokenizer, path: Path) -> None:
    """The file gives transformers' ids on the probe prompts, or ExportError names the difference."""
    from tokenizers import Tokenizer

    from distill.text import tokenize

    served = Tokenizer.from_file(str(path))
    expected = tokenize([tokenizer], list(PROBE_PROMPTS))[0].tolist()
    for prompt, ids, encoding in zip(PROBE_PROMPTS, expected, served.encode_batch(list(PROBE_PROMPTS)), strict=True):
        if encoding.ids != ids:
            raise ExportError(f"{path.name}: tokenizes {prompt[:30]!r} as {encoding.ids[:12]}..., transformers as "
                              f"{ids[:12]}...")


def random_ids(conditioner) -> Callable[[int, torch.Generator], list[torch.Tensor]]:
    """Token ids of every tokenizer for `batch` random prompts (parity inputs)."""
    def draw(batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        return [torch.randint(0, encoder.config.vocab_size, (batch, spec.max_length), generator=generator)
                for encoder, spec in zip(conditioner.encoders, conditioner.tokenizers, strict=True)]
    return draw


def export_text(conditioner, tokenizers: list, out: Path, build: Callable, null_condition: torch.Tensor,
                scorer_tokenizer=None) -> TextEntry:
    """Write the tokenizer files (the verifier's too, when it scores prompts), the empty prompt's
    condition (the teacher's null, its default negative) and the encoder graph into `out`;
    `build(graph, filename, label, make)` exports and checks a graph (the writer's)."""
    import numpy as np

    null = out / "null_condition.npy"
    np.save(null, null_condition.numpy().astype(np.float32))
    files = [tokenizer_file(tokenizer, out / f"tokenizer_{i}.json") for i, tokenizer in enumerate(tokenizers)]
    scorer_file = tokenizer_file(scorer_tokenizer, out / "verifier_tokenizer.json") if scorer_tokenizer else None
    draw = random_ids(conditioner)

    def make(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        return dict(zip(conditioner.input_names, draw(batch, torch.Generator().manual_seed(seed + batch)),
                        strict=True))

    encoder = build(conditioner, "text_encoder.onnx", "text encoder graph", make)
    return TextEntry([GraphEntry(path.name, sha256_of(path)) for path in files], encoder,
                     (conditioner.layout.rows, conditioner.layout.width),
                     GraphEntry(scorer_file.name, sha256_of(scorer_file)) if scorer_file else None,
                     GraphEntry(null.name, sha256_of(null)))
