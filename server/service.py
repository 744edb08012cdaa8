"""What the routes share: the loaded bundle, its batchers and admission, the checks that turn a request
into validated labels, seeds, steps and a guidance scale (or a 4xx naming the field), and `execute`,
which admits a planned request and runs its stages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable

import numpy as np
from starlette.requests import Request

from export.bundle import Bundle
from server.admission import IMAGES, Admission, Ticket, images_need
from server.batcher import DynamicBatcher
from server.encoding import Encoder
from server.metrics import Metrics
from server.noise import MAX_SEED
from server.prompts import PromptEncoder
from server.schemas import DEFAULT_TEACHER_STEPS, MAX_STUDENT_STEPS, MAX_TEACHER_STEPS
from server.settings import Settings
from server.stages import Stage, State, Timing, host_work_of, images_held, needs_of, run_stages


def shown(value, limit: int = 60) -> str:
    """A client's value echoed in a message: as JSON, and cut short."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


class ClientDisconnected(Exception):
    pass


class Service:
    def __init__(self, settings: Settings, bundle: Bundle, metrics: Metrics):
        self.settings, self.bundle, self.metrics = settings, bundle, metrics
        self.batchers: dict[str, DynamicBatcher] = {}
        self.admission: Admission | None = None
        self.encoder: Encoder | None = None
        self.prompts: PromptEncoder | None = None  # text bundles: tokenizers and the condition cache
        self.ready = False
        self.failure: str | None = None  # why the warm-up failed, if it did
        self.draining = False
        self.inflight = 0  # HTTP requests being handled (the drain waits for zero)
        self.teacher_name = f"{bundle.name}-teacher"
        self.started_at = time.time()

    def model_cards(self) -> list[dict]:
        """The OpenAI-style model list: the student (with its baked guidance scales) and the teacher."""
        bundle, created = self.bundle, int(self.started_at)
        common = {"object": "model", "created": created, "owned_by": "flowmap-serve",
                  "conditioning": bundle.conditioning, "classes": list(bundle.classes),
                  "image": list(bundle.image_shape), "search": bundle.verifier is not None}
        return [
            {"id": bundle.name, **common, "kind": "student", "cfg_scales": list(bundle.guidance_scales),
             "steps": [1, MAX_STUDENT_STEPS], "method": bundle.provenance.get("method")},
            {"id": self.teacher_name, **common, "kind": "teacher", "cfg_scales": [bundle.teacher.guidance_scale],
             "steps": [1, MAX_TEACHER_STEPS], "negative_prompt": bundle.teacher_takes_negative},
        ]

    # -- request checks ---------------------------------------------------------------------------
    def resolve_model(self, model: str | None, param: str = "model") -> str:
        """'student' or 'teacher' for a model id (None = the student)."""
        if model in (None, "", self.bundle.name):
            return "student"
        if model == self.teacher_name:
            return "teacher"
        raise ApiError(404, f"{param}: unknown model {shown(model)}; this server has {self.bundle.name!r} and "
                            f"{self.teacher_name!r}", param, "model_not_found")

    def resolve_label(self, value: int | str, param: str) -> int:
        classes = self.bundle.classes
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(classes):
                return value
            raise ApiError(422, f"{param}: class index {value} is out of range 0..{len(classes) - 1}", param)
        text = str(value).strip()
        if text in classes:
            return classes.index(text)
        if text.isascii() and text.isdigit() and int(text) < len(classes):  # not "²": str.isdigit says yes
            return int(text)
        listed = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
        raise ApiError(422, f"{param}: unknown class {shown(text)}; the classes are {listed} (or their index "
                            f"0..{len(classes) - 1})", param)

    def resolve_guidance(self, kind: str, guidance: float | None, param: str = "guidance") -> float:
        if kind == "teacher":
            scale = self.bundle.teacher.guidance_scale
            if guidance is not None and not abs(guidance - scale) <= 1e-6:  # NaN too
                raise ApiError(422, f"{param}: the teacher graph has guidance {scale:g} baked in; got {guidance:g}",
                               param)
            return scale
        if guidance is None:
            return self.bundle.students[0].guidance_scale
        try:
            return self.bundle.student_for(guidance).guidance_scale
        except KeyError:
            offered = ", ".join(f"{s:g}" for s in self.bundle.guidance_scales)
            raise ApiError(422, f"{param}: no student graph has guidance {guidance:g} baked in; available: "
                                f"{offered}", param) from None

    def resolve_steps(self, kind: str, steps: int | None, param: str = "steps") -> int:
        if kind == "student":
            steps = 1 if steps is None else steps
            if not 1 <= steps <= MAX_STUDENT_STEPS:
                raise ApiError(422, f"{param}: the student takes 1..{MAX_STUDENT_STEPS} jumps, got {steps}", param)
            return steps
        steps = DEFAULT_TEACHER_STEPS if steps is None else steps
        if not 1 <= steps <= MAX_TEACHER_STEPS:
            raise ApiError(422, f"{param}: the teacher takes 1..{MAX_TEACHER_STEPS} steps, got {steps}", param)
        return steps

    @staticmethod
    def check_seeds(seeds: list[int], count: int, param: str = "seeds", per: str = "one per image") -> list[int]:
        if len(seeds) != count:
            raise ApiError(422, f"{param}: expected {count} seeds ({per}), got {len(seeds)}", param)
        for seed in seeds:
            if not 0 <= seed <= MAX_SEED:
                raise ApiError(422, f"{param}: every seed must lie in 0..{MAX_SEED}, got {seed}", param)
        return seeds

    @staticmethod
    def unavailable() -> ApiError:
        """The answer to a /v1 request while the server drains."""
        return ApiError(503, "the server is shutting down; retry on another replica", kind="unavailable",
                        headers={"Retry-After": "1"})

    def check_ready(self) -> None:
        if self.draining:
            raise self.unavailable()
        if not self.ready:
            raise ApiError(503, "the server is warming up its engines; retry shortly", kind="unavailable",
                           headers={"Retry-After": "1"})

    # -- running work -----------------------------------------------------------------------------
    def deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout_s

    async def call(self, engine: str, feeds: dict[str, np.ndarray], ticket: Ticket) -> np.ndarray:
        """One batched call of an engine, counted against the request's admission ticket."""
        output = await self.batchers[engine].infer(feeds, ticket.deadline)
        ticket.advance(engine, len(output))
        return output

    async def execute(self, stages: list[Stage], state: State, deadline: float) -> list[Timing]:
        """Admit the request whole (what all its stages need), then run its stages in order."""
        needs = needs_of(stages)
        if IMAGES in self.admission.loads:
            needs.append(images_need(needs, images_held(stages)))
        async with self.admission.admitted(needs, deadline, host_work_of(stages)) as ticket:
            return await run_stages(stages, state, self.call, ticket, self.metrics)


# Requests that finish within this long never start a disconnect watcher: most requests, and a client
# that leaves sooner wastes little work.
WATCH_AFTER_S = 0.25


async def until_disconnect(request: Request, work: Awaitable, deadline: float):
    """Await `work` until the deadline, cancelling it if the client goes away (its queued rows are then
    skipped by the batchers and its admission released).

    The disconnect is awaited, not polled: the body has been read, so the next message the server
    sends on this request's channel is `http.disconnect`. The watcher starts only once the request
    has taken WATCH_AFTER_S, so quick requests pay nothing for it."""
    task = asyncio.ensure_future(work)
    gone = None
    try:
        await asyncio.wait({task}, timeout=max(0.0, min(WATCH_AFTER_S, deadline - time.monotonic())))
        if not task.done():
            gone = asyncio.ensure_future(_disconnected(request))
            await asyncio.wait({task, gone}, timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        if gone.done():
            raise ClientDisconnected
        raise TimeoutError
    finally:
        pending = [t for t in (task, gone) if t is not None]
        for waiting in pending:
            if not waiting.done():
                waiting.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
