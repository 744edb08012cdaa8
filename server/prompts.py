"""Prompts to conditions for text bundles: the bundle's tokenizers (HF `tokenizers`, no torch) and an
LRU cache of conditions, so a repeated prompt costs no text-encoder call (a demo repeats prompts; an
API mostly does not: the cache's hit rate is in /metrics).

Prompts longer than a tokenizer's limit are truncated, as the diffusers pipelines do; the response
says so (`x-flowmap-prompt-truncated`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from export.bundle import TextConditioning


@dataclass
class Tokenized:
    feeds: dict[str, np.ndarray]  # the text-encoder graph's inputs, ids_0, ids_1, ...
    truncated: list[bool]  # per prompt: cut to some tokenizer's limit


class PromptEncoder:
    """Tokenizes prompts for the text-encoder graph and remembers the conditions it produced."""

    def __init__(self, text: TextConditioning, cache_size: int, metrics=None, cache_bytes: int | None = None):
        from tokenizers import Tokenizer

        self.tokenizers = [Tokenizer.from_file(str(graph.path)) for graph in text.tokenizers]
        # the verifier's own tokens for the prompt (a text-image scorer, export/scorer.py), if it has one
        self.scorer = Tokenizer.from_file(str(text.verifier_tokenizer.path)) if text.verifier_tokenizer else None
        # the empty prompt's condition, computed at export: the teacher's negative unless a request gives one
        self.null = np.load(text.null.path).astype(np.float32) if text.null else None
        # both bounds hold: a count, and bytes, since one T5 condition of SD3 or FLUX is 5-8 MB in float32
        self.cache_size, self.cache_bytes, self.metrics = cache_size, cache_bytes, metrics
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.held_bytes = 0
        self.hits = self.lookups = 0

    def tokenize(self, prompts: list[str]) -> Tokenized:
        feeds, truncated = {}, [False] * len(prompts)
        for i, tokenizer in enumerate(self.tokenizers):
            encodings = tokenizer.encode_batch(prompts)
            feeds[f"ids_{i}"] = np.array([e.ids for e in encodings], dtype=np.int64)
            truncated = [cut or bool(e.overflowing) for cut, e in zip(truncated, encodings, strict=True)]
        return Tokenized(feeds, truncated)

    def scorer_ids(self, prompts: list[str]) -> np.ndarray:
        """The verifier graph's `ids` input for each image's prompt."""
        return np.array([e.ids for e in self.scorer.encode_batch(prompts)], dtype=np.int64)

    def lookup(self, prompt: str) -> np.ndarray | None:
        # the empty prompt is the export-time null itself: the same bytes whether a request names it or not
        condition = self.null if prompt == "" and self.null is not None else self.cache.get(prompt)
        if prompt in self.cache:
            self.cache.move_to_end(prompt)
        self.lookups, self.hits = self.lookups + 1, self.hits + (condition is not None)
        if self.metrics is not None:
            self.metrics.prompt_cache.labels(result="miss" if condition is None else "hit").inc()
            self.metrics.prompt_cache_hit_ratio.set(self.hits / self.lookups)
        return condition

    def remember(self, prompt: str, condition: np.ndarray) -> np.ndarray:
        """Keep `condition` for `prompt`, as a copy: it is one row of the text encoder's (padded) batch, which a
        view would keep alive. Returns that copy, for the request to hold instead of the view (one copy, kept or
        not)."""
        own = condition.copy()
        budget = self.cache_bytes if self.cache_bytes is not None else float("inf")
        if self.cache_size <= 0 or own.nbytes > budget:
            return own
        if prompt in self.cache:
            self.held_bytes -= self.cache.pop(prompt).nbytes
        self.cache[prompt] = own
        self.held_bytes += own.nbytes
        while len(self.cache) > self.cache_size or self.held_bytes > budget:
            self.held_bytes -= self.cache.popitem(last=False)[1].nbytes
        if self.metrics is not None:
            self.metrics.prompt_cache_bytes.set(self.held_bytes)
        return own
