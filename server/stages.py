"""A request is a list of stages: conditioning -> denoising steps -> decoding -> scoring -> encoding.

The planning step (`plan_generation`, `plan_search`) turns a checked request into its stages; each
stage that runs a network names its engine (its batcher, its metrics label) and the rows and calls
admission must reserve for it; `run_stages` carries the request's `State` through them in order and
times each. Every network call goes through its engine's batcher one step at a time, so concurrent
requests share batches at every step, whatever their step counts.

Digits is the case with a label table for conditioning (resolved before planning) and no decoder:
its stages are denoise -> score -> encode. A text bundle's prompts go through EncodePrompts first, and a
latent bundle's samples through Decode before scoring and encoding.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from server.admission import IMAGES, HostWork, Need, Ticket
from server.encoding import Encoder, OutputFormat
from server.engines import student_engine
from server.imaging import DeviceImages, to_host
from server.noise import noise_for
from server.prompts import PromptEncoder


@dataclass
class State:
    """What a request carries from stage to stage."""

    seeds: list[int]
    labels: np.ndarray  # conditioning, one row per image: class ids, or text conditions [rows, R, W]
    prompts: list[str] | None = None  # text bundles: what EncodePrompts turns into `labels`
    negative_prompts: list[str] | None = None  # text bundles: the teacher's negatives (default: the empty prompt)
    negatives: np.ndarray | None = None  # their conditions, when the teacher graph takes them
    truncated: bool = False  # some prompt was cut to a tokenizer's limit
    noise: np.ndarray | None = None  # [rows, C, H, W], one row per seed (made by the Noise stage)
    x: np.ndarray | None = None  # the current sample
    scores: np.ndarray | None = None  # the last scoring stage's log p(label | image)
    candidate_scores: list[float] = field(default_factory=list)  # search: every candidate's score
    chosen: list[int] = field(default_factory=list)  # search: indices of the kept candidates, best first
    encoded: list[str] = field(default_factory=list)  # base64 PNGs


@dataclass
class Timing:
    """One stage of a request as the response reports it: its network evaluations and seconds."""

    name: str
    nfe: int
    seconds: float

    def as_dict(self) -> dict:
        return {"stage": self.name, "nfe": self.nfe, "seconds": round(self.seconds, 6)}


class Stage(Protocol):
    name: str  # as the response and the stage metrics name it

    def needs(self) -> list[Need]: ...

    async def run(self, state: State, call, ticket: Ticket) -> int:
        """Advance `state`; return the network evaluations spent. `call(engine, feeds, ticket)` runs
        one batched engine call."""


def grid(steps: int) -> np.ndarray:
    """1 = t_0 > ... > t_steps = 0 in float32 (identical in every request, so results are too)."""
    return np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@dataclass
class Noise:
    """Each seed's noise (server/noise.py's recipe), made after admission so a refusal costs nothing."""

    shape: tuple[int, ...]
    name: str = "noise"

    def needs(self) -> list[Need]:
        return []

    async def run(self, state: State, call, ticket: Ticket) -> int:
        state.noise = state.x = noise_for(state.seeds, self.shape)
        return 0


@dataclass
class Denoise:
    """Sequential calls of one denoising engine on `rows` rows; admission reserves them all."""

    steps: int
    rows: int
    rows_param: str  # the request fields that set rows and steps, named in refusals
    steps_param: str = "steps"

    @property
    def engine(self) -> str:
        raise NotImplementedError

    def needs(self) -> list[Need]:
        return [Need(self.engine, self.rows, self.steps, self.rows_param, self.steps_param)]


@dataclass
class StudentJumps(Denoise):
    """M flow-map jumps x <- f(x, tau_i, tau_{i+1}); M = 1 is the one-step sample f(eps, 1, 0)."""

    guidance_scale: float = 1.0  # which baked student graph
    name: str = "student"

    @property
    def engine(self) -> str:
        return student_engine(self.guidance_scale)

    async def run(self, state: State, call, ticket: Ticket) -> int:
        times, rows = grid(self.steps), len(state.labels)
        for t_now, t_next in zip(times[:-1], times[1:], strict=True):
            state.x = await call(self.engine, {"x": state.x, "t": np.full(rows, t_now, np.float32),
                                               "s": np.full(rows, t_next, np.float32), "label": state.labels}, ticket)
        return rows * self.steps


@dataclass
class TeacherSteps(Denoise):
    """K Euler steps of the guided teacher (guidance baked into its graph), from the state's noise; a
    text teacher with guidance also takes the negatives' conditions."""

    negative: bool = False
    name: str = "teacher"
    engine = "teacher"

    async def run(self, state: State, call, ticket: Ticket) -> int:
        times, rows, x = grid(self.steps), len(state.labels), state.noise
        negative = {"negative": state.negatives} if self.negative else {}
        for t_now, t_next in zip(times[:-1], times[1:], strict=True):
            velocity = await call(self.engine, {"x": x, "t": np.full(rows, t_now, np.float32),
                                                "label": state.labels, **negative}, ticket)
            x = x - (t_now - t_next) * velocity
        state.x = x
        return rows * self.steps


@dataclass
class OneCall:
    """One call of one engine on `rows` rows."""

    rows: int
    rows_param: str
    engine = ""

    def needs(self) -> list[Need]:
        # one call: fewer rows is the only way to ask for less of it, so a refusal names the rows' field
        return [Need(self.engine, self.rows, 1, self.rows_param, steps_param=self.rows_param)]


@dataclass
class EncodePrompts(OneCall):
    """Prompts to the denoisers' conditions: remembered ones from the cache, each new prompt once
    through the text-encoder engine (admission reserves a row per image, the most it can take)."""

    prompts: PromptEncoder | None = None
    negatives: bool = False  # also the teacher's negatives (its graph takes them)
    name: str = "text_encoder"
    engine = "text_encoder"

    async def run(self, state: State, call, ticket: Ticket) -> int:
        unique = list(dict.fromkeys(state.prompts + (state.negative_prompts or [])))
        tokenized = self.prompts.tokenize(unique)  # cheap; it also tells whether any prompt was cut
        state.truncated = any(tokenized.truncated)
        conditions = {prompt: self.prompts.lookup(prompt) for prompt in unique}
        new = [i for i, prompt in enumerate(unique) if conditions[prompt] is None]
        if new:
            feeds = {name: ids[new] for name, ids in tokenized.feeds.items()}
            for i, condition in zip(new, await call(self.engine, feeds, ticket), strict=True):
                # the cache's copy, not the row: that is a view of the encoder's whole padded batch (537 MB for FLUX)
                conditions[unique[i]] = self.prompts.remember(unique[i], condition)
        state.labels = rows_of(conditions, state.prompts)
        if self.negatives:
            state.negatives = rows_of({"": self.prompts.null, **conditions},
                                      state.negative_prompts or [""] * len(state.prompts))
        return len(new)


def rows_of(conditions: dict[str, np.ndarray], prompts: list[str]) -> np.ndarray:
    """[rows, ...] conditions, one per prompt. Rows of one prompt are views of one array, not copies: a search
    of 1024 candidates would otherwise hold 1024 copies of a FLUX T5 condition (8 MB each); the batcher copies
    only the rows of each batch it runs."""
    if len(set(prompts)) == 1:
        return np.broadcast_to(conditions[prompts[0]], (len(prompts), *conditions[prompts[0]].shape))
    return np.stack([conditions[prompt] for prompt in prompts])


@dataclass
class Decode(OneCall):
    """Latents to images with the bundle's decoder (a VAE's, its scaling baked in)."""

    name: str = "decoder"
    engine = "decoder"

    async def run(self, state: State, call, ticket: Ticket) -> int:
        state.x = await call(self.engine, {"latent": state.x}, ticket)
        return len(state.labels)


@dataclass
class Score(OneCall):
    """The verifier's log-probability of each image's requested class, or (text bundles) its score of
    each image against its prompt."""

    prompts: PromptEncoder | None = None
    name: str = "verifier"
    engine = "verifier"

    async def run(self, state: State, call, ticket: Ticket) -> int:
        # the host copy the verifier reads replaces the device one: a search's N candidates need not hold the
        # GPU's memory while the verifier's queue drains (the chosen few are encoded from it)
        images = await to_host(state.x)
        # in place where the array is ours: a copy would be a second set of every candidate
        state.x = images = np.clip(images, -1, 1, out=images if images.flags.writeable else None)
        if state.prompts is not None:
            scores = await call(self.engine, {"image": images, "ids": self.prompts.scorer_ids(state.prompts)}, ticket)
            state.scores = scores.astype(np.float64)
        else:
            logits = await call(self.engine, {"image": images}, ticket)
            state.scores = log_softmax(logits.astype(np.float64))[np.arange(len(state.labels)), state.labels]
        return len(state.labels)


SEARCH_CHUNK = 64  # candidates made, decoded and scored at once (about 1 GB of images at 1024 px)


@dataclass
class Candidates:
    """Best-of-N a chunk of candidates at a time: each chunk's noise, student jumps, decoding (bundles with a
    decoder) and scores, keeping only the best `top_k` so far (their images, noise, conditions and scores). A
    search holds a chunk and top_k images, not N (1024 candidates at 1024 px would be 15 GB); the engines see the
    same rows. The kept candidates are the best scores, ties to the lower index, best first."""

    stages: list  # Noise, StudentJumps, [Decode], Score, each run on one chunk
    count: int
    top_k: int
    chunk: int = SEARCH_CHUNK
    name: str = "candidates"

    def needs(self) -> list[Need]:
        chunks = math.ceil(self.count / self.chunk)
        return [Need(need.engine, need.rows, need.steps * chunks, need.rows_param, need.steps_param)
                for stage in self.stages for need in stage.needs()]

    def images_held(self) -> Need:
        """Images held on the host at once: a chunk, the best so far and the next best picked from both. A refusal
        names the field that holds the more of them: top_k, or n (below a chunk, fewer candidates hold fewer)."""
        chunk = min(self.count, self.chunk)
        param = "top_k" if 2 * self.top_k > chunk else "n"
        return Need(IMAGES, chunk + 2 * self.top_k, 0, param,
                    rows_what=f"a search holds a chunk of {chunk} candidates and twice top_k {self.top_k} at once")

    async def run(self, state: State, call, ticket: Ticket) -> int:
        spent: dict[str, Timing] = {}  # by step: what the response and the metrics report, summed over the chunks

        def add(name: str, nfe: int, seconds: float) -> None:
            done = spent.setdefault(name, Timing(name, 0, 0.0))
            done.nfe, done.seconds = done.nfe + nfe, done.seconds + seconds

        best, scores = Best(np.zeros(0, np.int64), np.zeros(0), None, None), []
        for start in range(0, self.count, self.chunk):
            rows = slice(start, start + self.chunk)
            part = State(state.seeds[rows], state.labels[rows],
                         prompts=state.prompts[rows] if state.prompts is not None else None,
                         negatives=state.negatives[rows] if state.negatives is not None else None)
            for stage in self.stages:
                tick = time.perf_counter()
                nfe = await stage.run(part, call, ticket)
                add(stage.name, nfe, time.perf_counter() - tick)
            scores.append(part.scores)
            tick = time.perf_counter()
            best = best.merged(Best(np.arange(start, start + len(part.seeds)), part.scores, part.x, part.noise),
                               self.top_k)
            add("choose", 0, time.perf_counter() - tick)
        chosen = best.index
        state.candidate_scores = [float(s) for s in np.concatenate(scores)]
        state.chosen, state.x, state.noise, state.scores = chosen.tolist(), best.x, best.noise, best.scores
        # every candidate shares the request's one prompt (or label): its rows are picked, not carried along
        state.labels = take_rows(state.labels, chosen)
        state.negatives = take_rows(state.negatives, chosen) if state.negatives is not None else None
        state.prompts = [state.prompts[i] for i in chosen] if state.prompts is not None else None
        self.timings = list(spent.values())  # its steps' own, for the metrics (the response keeps those with NFE)
        return sum(timing.nfe for timing in spent.values())


@dataclass
class Best:
    """A search's best candidates so far, best first: their indices, scores, images and noise."""

    index: np.ndarray
    scores: np.ndarray
    x: np.ndarray | None
    noise: np.ndarray | None

    def merged(self, chunk: Best, top_k: int) -> Best:
        """The `top_k` best of these and a new chunk's, ties to the lower index; each kept row is copied once
        from where it is (no joined copy of both)."""
        index, scores = np.concatenate([self.index, chunk.index]), np.concatenate([self.scores, chunk.scores])
        order = np.lexsort((index, -scores))[:top_k]

        def pick(mine, theirs):
            out = np.empty((len(order), *theirs.shape[1:]), theirs.dtype)
            ours = order < len(self.index)
            if ours.any():
                out[ours] = mine[order[ours]]
            out[~ours] = theirs[order[~ours] - len(self.index)]
            return out

        return Best(index[order], scores[order], pick(self.x, chunk.x), pick(self.noise, chunk.noise))


def take_rows(rows: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """`rows[indices]`, where rows that are one row broadcast (a prompt's condition) stay a broadcast view."""
    if rows.ndim and rows.strides[0] == 0:
        return np.broadcast_to(rows[0], (len(indices), *rows.shape[1:]))
    return rows[indices]


@dataclass
class EncodeImages:
    """The images as base64 bytes of the requested format, off the event loop (server/encoding.py)."""

    encoder: Encoder
    output: OutputFormat
    shape: tuple[int, ...]  # [C, H, W] of each image, before upscaling
    rows: int  # images encoded
    rows_param: str  # the request field that sets `rows`, named in refusals
    name: str = "encode"

    def needs(self) -> list[Need]:
        return []

    def host_work(self) -> HostWork:
        """Its encoding job, for admission: the time jobs like it took so far."""
        _, height, width = self.shape
        what = (f"{self.rows} images of {width * self.output.upscale}x{height * self.output.upscale} "
                f"{self.output.format}")
        return HostWork(self.encoder.job_seconds(self.rows, self.shape, self.output), what, self.rows_param)

    async def run(self, state: State, call, ticket: Ticket) -> int:
        if isinstance(state.x, DeviceImages) and not self.encoder.on_gpu(state.x, self.output):
            # a CPU encoder reads the host pixels: the decoder's floats (3.2 GB of GPU memory for 256 images at
            # 1024 px) are not held while the request waits for the encoders' pool
            state.x = state.x.pixels_only()
        state.encoded = await self.encoder.encode(state.x, self.output)
        state.x = None  # the float images (3.2 GB for 256 at 1024 px) are not kept while the response is written
        return 0


def plan_generation(shape: tuple[int, ...], kind: str, guidance_scale: float, steps: int, rows: int,
                    rows_param: str, encode: EncodeImages | None, decode: bool = False,
                    prompts: PromptEncoder | None = None, negative: bool = False,
                    distinct_prompts: int | None = None) -> list[Stage]:
    """Generation: prompts (and the teacher's negatives, when its graph takes them) to conditions (text
    bundles), noise, denoise with the student or the teacher, decode latents (bundles with a decoder),
    then encode (unless raw arrays are asked for). `distinct_prompts`: how many different prompts the request
    encodes at most, a negative prompt included (the text encoder's rows; one an image where not given)."""
    negative = negative and kind == "teacher"
    denoise = (TeacherSteps(steps, rows, rows_param, negative=negative) if kind == "teacher"
               else StudentJumps(steps, rows, rows_param, guidance_scale=guidance_scale))
    condition = [EncodePrompts(distinct_prompts or rows, rows_param, prompts, negatives=negative)] \
        if prompts else []
    return [*condition, Noise(shape), denoise, *([Decode(rows, rows_param)] if decode else []),
            *([encode] if encode else [])]


def plan_search(shape: tuple[int, ...], guidance_scale: float, count: int, student_steps: int, top_k: int,
                teacher_steps: int, encode: EncodeImages, decode: bool = False,
                prompts: PromptEncoder | None = None, negative: bool = False) -> list[Stage]:
    """Best-of-N: the prompt to its condition (text bundles), then the N candidates a chunk at a time (noise,
    student jumps, decoding for bundles with a decoder, scores; the best top_k kept), optionally the teacher from
    their noise, decoded and scored, then encode the kept images. Only what must be scored is decoded: every
    candidate, and the teacher's finished images."""
    def decoded(rows: int, param: str) -> list[Stage]:
        return [Decode(rows, param, name="decoder_final" if param == "top_k" else "decoder")] if decode else []

    negative = negative and teacher_steps > 0  # the teacher's finish takes the empty prompt's condition
    condition = [EncodePrompts(1, "n", prompts, negatives=negative)] if prompts else []  # one prompt, n candidates
    rows = min(count, SEARCH_CHUNK)
    stages = [*condition, Candidates([Noise(shape), StudentJumps(student_steps, rows, "n", "student_steps",
                                                                 guidance_scale=guidance_scale),
                                      *decoded(rows, "n"), Score(rows, "n", prompts)], count, top_k)]
    if teacher_steps:
        stages += [TeacherSteps(teacher_steps, top_k, "top_k", "teacher_steps", negative=negative),
                   *decoded(top_k, "top_k"),
                   Score(top_k, "top_k", prompts, name="verifier_final")]
    return [*stages, encode]


def needs_of(stages: list[Stage]) -> list[Need]:
    """What admission reserves for the stages: per engine, the most rows any of them holds at once and
    all their calls."""
    merged: dict[str, Need] = {}
    for stage in stages:
        for need in stage.needs():
            held = merged.get(need.engine)
            merged[need.engine] = need if held is None else Need(
                need.engine, max(held.rows, need.rows), held.steps + need.steps, held.rows_param, held.steps_param)
    return list(merged.values())


def images_held(stages: list[Stage]) -> Need | None:
    """The images a stage holds on the host beyond its rows (a search's chunk and its best), None if none does."""
    return next((stage.images_held() for stage in stages if isinstance(stage, Candidates)), None)


def host_work_of(stages: list[Stage]) -> HostWork | None:
    """The request's work off the engines, for admission: its encoding job, if it encodes."""
    return next((stage.host_work() for stage in stages if isinstance(stage, EncodeImages)), None)


async def run_stages(stages: list[Stage], state: State, call, ticket: Ticket, metrics=None) -> list[Timing]:
    """Run the stages in order on `state`, timing each (network stages are reported; the stage
    duration metric covers all of them)."""
    last_call = {need.engine: i for i, stage in enumerate(stages) for need in stage.needs()}
    timings = []
    for i, stage in enumerate(stages):
        tick = time.perf_counter()
        nfe = await stage.run(state, call, ticket)
        for engine in (engine for engine, last in last_call.items() if last == i):
            ticket.done_with(engine)  # its rows go to whoever waits, while this request goes on elsewhere
        seconds = time.perf_counter() - tick
        # a stage of stages (a search's candidates, chunk by chunk) reports each of its own steps, and in the
        # response those that ran a network
        steps = getattr(stage, "timings", None)
        parts = steps or [Timing(stage.name, nfe, seconds)]
        if metrics:
            for part in parts:
                metrics.stage_duration.labels(stage=part.name).observe(part.seconds)
                if part.nfe:
                    metrics.nfe.labels(stage=part.name).inc(part.nfe)
        if stage.needs():
            timings.extend([part for part in parts if part.nfe] if steps else parts)
    return timings
