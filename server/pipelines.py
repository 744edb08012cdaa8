"""Generation pipelines over the batchers: student jumps, teacher Euler steps, and Best-of-N search.

Every network call goes through an engine's batcher one step at a time, so concurrent requests
share batches at every step (step-level batching), whatever their step counts. Each call runs under
the request's admission ticket: its deadline, and the work it reports done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from server.admission import Ticket
from server.batcher import DynamicBatcher
from server.engines import student_engine
from server.metrics import Metrics


@dataclass
class Stage:
    """One stage of a request: how many network evaluations it took and how long."""

    name: str
    nfe: int
    seconds: float

    def as_dict(self) -> dict:
        return {"stage": self.name, "nfe": self.nfe, "seconds": round(self.seconds, 6)}


@dataclass
class SearchResult:
    candidate_seeds: list[int]
    candidate_scores: list[float]  # log p(label | student image) per candidate, in seed order
    chosen: list[int]  # indices into the candidates, best first
    images: np.ndarray  # final images of the chosen seeds (teacher's if teacher_steps > 0)
    final_scores: list[float]
    stages: list[Stage] = field(default_factory=list)


def grid(steps: int) -> np.ndarray:
    """1 = t_0 > ... > t_steps = 0 in float32 (identical in every request, so results are too)."""
    return np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class Pipelines:
    def __init__(self, batchers: dict[str, DynamicBatcher], metrics: Metrics | None = None):
        self.batchers, self.metrics = batchers, metrics

    async def _call(self, engine: str, feeds: dict[str, np.ndarray], ticket: Ticket) -> np.ndarray:
        output = await self.batchers[engine].infer(feeds, ticket.deadline)
        ticket.advance(engine, len(output))
        return output

    async def student(self, noise: np.ndarray, labels: np.ndarray, steps: int, guidance_scale: float,
                      ticket: Ticket) -> np.ndarray:
        """M flow-map jumps x <- f(x, tau_i, tau_{i+1}); M = 1 is the one-step sample f(eps, 1, 0)."""
        engine, times, x = student_engine(guidance_scale), grid(steps), noise
        rows = len(labels)
        for t_now, t_next in zip(times[:-1], times[1:], strict=True):
            x = await self._call(engine, {"x": x, "t": np.full(rows, t_now, np.float32),
                                          "s": np.full(rows, t_next, np.float32), "label": labels}, ticket)
        self._count("student", rows, steps)
        return x

    async def teacher(self, noise: np.ndarray, labels: np.ndarray, steps: int, ticket: Ticket) -> np.ndarray:
        """K Euler steps of the guided teacher; each step is its own batched call."""
        times, x = grid(steps), noise
        rows = len(labels)
        for t_now, t_next in zip(times[:-1], times[1:], strict=True):
            velocity = await self._call("teacher", {"x": x, "t": np.full(rows, t_now, np.float32), "label": labels},
                                        ticket)
            x = x - (t_now - t_next) * velocity
        self._count("teacher", rows, steps)
        if self.metrics:
            self.metrics.teacher_steps.inc(steps)
        return x

    async def scores(self, images: np.ndarray, labels: np.ndarray, ticket: Ticket) -> np.ndarray:
        """The verifier's log-probability of each image's requested class."""
        logits = await self._call("verifier", {"image": np.clip(images, -1, 1)}, ticket)
        return log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels]

    async def search(self, noise: np.ndarray, seeds: list[int], label: int, top_k: int, student_steps: int,
                     teacher_steps: int, guidance_scale: float, ticket: Ticket) -> SearchResult:
        """Best-of-N: N candidates from the student (one batched call per jump), verifier scores, the
        best `top_k` seeds, then optionally the teacher from the chosen noise."""
        count = len(seeds)
        labels = np.full(count, label, np.int64)
        stages = []
        tick = time.perf_counter()
        candidates = await self.student(noise, labels, student_steps, guidance_scale, ticket)
        stages.append(Stage("student", count * student_steps, time.perf_counter() - tick))
        tick = time.perf_counter()
        scores = await self.scores(candidates, labels, ticket)
        stages.append(Stage("verifier", count, time.perf_counter() - tick))
        chosen = [int(i) for i in np.argsort(-scores, kind="stable")[:top_k]]
        images, final_scores = candidates[chosen], [float(scores[i]) for i in chosen]
        if teacher_steps > 0:
            tick = time.perf_counter()
            images = await self.teacher(noise[chosen], labels[:top_k], teacher_steps, ticket)
            stages.append(Stage("teacher", top_k * teacher_steps, time.perf_counter() - tick))
            tick = time.perf_counter()
            final_scores = [float(s) for s in await self.scores(images, labels[:top_k], ticket)]
            stages.append(Stage("verifier_final", top_k, time.perf_counter() - tick))
        if self.metrics:
            self.metrics.search_candidates.inc(count)
        return SearchResult(list(seeds), [float(s) for s in scores], chosen, images, final_scores, stages)

    def _count(self, model: str, rows: int, steps: int) -> None:
        if self.metrics:
            self.metrics.nfe.labels(model=model).inc(rows * steps)
