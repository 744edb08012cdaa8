"""The HTTP routes: OpenAI-style images, native batch generation, Best-of-N search, models, health."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.encoding import DEFAULT_COMPRESSION, OutputFormat, formats_for
from server.imaging import b64_npy, parse_size, to_host
from server.noise import MAX_SEED, random_seeds
from server.schemas import (
    MAX_RAW_VALUES,
    GenerateRequest,
    GenerateResponse,
    ImageOutput,
    ImagesRequest,
    ImagesResponse,
    SearchRequest,
    SearchResponse,
)
from server.service import ApiError, Service, until_disconnect
from server.stages import EncodeImages, State, plan_generation, plan_search


class JsonBodyRoute(APIRoute):
    """A route that reads its body as JSON whatever Content-Type says (curl -d sends a form's), as the fast path
    does: served by FastAPI or by the fast path, a request gets the same answer."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def read_as_json(request: Request):
            headers = [(key, value) for key, value in request.scope["headers"] if key != b"content-type"]
            scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
            return await handler(Request(scope, request.receive))

        return read_as_json


router = APIRouter(route_class=JsonBodyRoute)


def fast_json(body: dict) -> Response:
    """Serialise with orjson and skip FastAPI's response re-validation on the hot paths; the response
    models still document the shape in the OpenAPI schema."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def service(request: Request) -> Service:
    return request.app.state.service


def upscale(svc: Service, size: str | None) -> int:
    try:
        _, height, width = svc.bundle.image_shape
        return parse_size(size, height, width)
    except ValueError as err:
        raise ApiError(422, f"size: {err}", "size") from None


def consecutive_seeds(seed: int | None, count: int, param: str = "seed") -> list[int]:
    if seed is None:
        return random_seeds(count)
    if seed + count - 1 > MAX_SEED:
        raise ApiError(422, f"{param}: seed + n - 1 must stay within 0..{MAX_SEED}", param)
    return [seed + i for i in range(count)]


def output_of(svc: Service, body: ImageOutput) -> OutputFormat:
    """The encoding a request asks for (format, quality, upscaling to its `size`)."""
    if body.output_format not in formats_for(svc.bundle.image_shape):
        raise ApiError(422, f"output_format: {body.output_format} has no alpha channel, and this bundle's images "
                            f"are RGBA: ask for {' or '.join(formats_for(svc.bundle.image_shape))}", "output_format")
    return OutputFormat(body.output_format, DEFAULT_COMPRESSION if body.output_compression is None
                        else body.output_compression, upscale(svc, body.size))


@dataclass
class Generation:
    """A generation request, checked: the one planning step both generation routes share."""

    kind: str  # "student" or "teacher"
    guidance_scale: float
    steps: int
    output: OutputFormat

    negative_prompt: str | None = None

    @classmethod
    def resolve(cls, svc: Service, body: ImagesRequest | GenerateRequest) -> Generation:
        svc.check_ready()
        kind = svc.resolve_model(body.model)
        if body.negative_prompt is not None and not (kind == "teacher" and svc.bundle.teacher_takes_negative):
            if svc.prompts is None:
                why = "this bundle is conditioned on class labels, not prompts: there is no prompt to negate"
            elif kind == "teacher":
                why = (f"this bundle's teacher runs without classifier-free guidance (w = "
                       f"{svc.bundle.teacher.guidance_scale:g})")
            else:
                why = (f"only the teacher ({svc.teacher_name}) of a text bundle with guidance takes one; the "
                       "student's guidance is distilled against the empty prompt")
            raise ApiError(422, f"negative_prompt: {why}", "negative_prompt")
        return cls(kind, svc.resolve_guidance(kind, body.guidance), svc.resolve_steps(kind, body.steps),
                   output_of(svc, body), body.negative_prompt)

    async def run(self, svc: Service, request: Request, conditions: list[int] | list[str], seeds: list[int],
                  rows_param: str, encode: bool = True) -> State:
        """Plan the stages, admit them, run them; the state holds the images (and their encodings).
        `conditions` are class ids, or prompts for a text bundle."""
        text = svc.prompts is not None
        stages = plan_generation(svc.bundle.sample_shape, self.kind, self.guidance_scale, self.steps, len(conditions),
                                 rows_param, EncodeImages(svc.encoder, self.output, svc.bundle.image_shape,
                                                          len(conditions), rows_param) if encode else None,
                                 decode=svc.bundle.decoder is not None, prompts=svc.prompts,
                                 negative=svc.bundle.teacher_takes_negative,
                                 distinct_prompts=len({*conditions, *filter(None, [self.negative_prompt])}) if text
                                 else None)
        negatives = [self.negative_prompt] * len(conditions) if self.negative_prompt is not None else None
        state = (State(seeds, np.zeros(0, np.float32), prompts=list(conditions), negative_prompts=negatives) if text
                 else State(seeds, np.asarray(conditions, dtype=np.int64)))
        deadline = svc.deadline()
        await until_disconnect(request, svc.execute(stages, state, deadline), deadline)
        svc.metrics.images.labels(model=self.kind).inc(len(conditions))
        return state


def answer(body: dict, state: State) -> Response:
    """The JSON response; says when a prompt was cut to a tokenizer's limit."""
    response = fast_json(body)
    if state.truncated:
        response.headers["x-flowmap-prompt-truncated"] = "true"
    return response


@router.post("/v1/images/generations", response_model=ImagesResponse, tags=["generation"])
async def images_generations(body: ImagesRequest, request: Request):
    """OpenAI Images API: `prompt` is the text (text bundles) or names a class; `n` images from
    consecutive seeds."""
    svc = service(request)
    generation = Generation.resolve(svc, body)
    if svc.prompts is not None:
        condition, name = body.prompt, body.prompt
    else:
        condition = svc.resolve_label(body.prompt, "prompt")
        name = svc.bundle.classes[condition]
    seeds = consecutive_seeds(body.seed, body.n)
    state = await generation.run(svc, request, [condition] * body.n, seeds, "n")
    return answer({"created": int(time.time()), "output_format": body.output_format, "data": [
        {"b64_json": image, "revised_prompt": name, "seed": seed}
        for image, seed in zip(state.encoded, seeds, strict=True)]}, state)


@router.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_none=True, tags=["generation"])
async def generate(body: GenerateRequest, request: Request):
    """Native batch form: one image per label (class bundles) or prompt (text bundles), from the given
    or random seeds."""
    svc = service(request)
    generation = Generation.resolve(svc, body)
    # given (an explicit null size or output_compression is the default, as everywhere): they shape encoded images,
    # and raw arrays are the model's own pixels
    encoding = [field for field in ("size", "output_format", "output_compression") if getattr(body, field) is not None
                and field in body.model_fields_set]
    if body.format == "raw" and encoding:
        raise ApiError(422, f"{encoding[0]}: format raw returns float arrays at the bundle's native size; "
                            f"{', '.join(encoding)} {'applies' if len(encoding) == 1 else 'apply'} to encoded images "
                            "(format png)", encoding[0])
    if svc.prompts is not None:
        if body.prompts is None or body.labels is not None:
            instead = ", not labels" if body.labels is not None else " (the field is required)"
            raise ApiError(422, f"prompts: this is a text bundle; give prompts (a list of strings){instead}",
                           "prompts")
        conditions, param = body.prompts, "prompts"
    else:
        if body.labels is None or body.prompts is not None:
            instead = ", not prompts" if body.prompts is not None else " (the field is required)"
            raise ApiError(422, f"labels: this bundle is conditioned on classes ({svc.bundle.classes[0]}, ...); give "
                                f"labels{instead}", "labels")
        conditions = [svc.resolve_label(value, f"labels[{i}]") for i, value in enumerate(body.labels)]
        param = "labels"
    values = len(conditions) * math.prod(svc.bundle.image_shape)
    if body.format == "raw" and values > MAX_RAW_VALUES:
        raise ApiError(422, f"format: raw writes every pixel as JSON text (about 20 bytes each), at most "
                            f"{MAX_RAW_VALUES} values a response; {len(conditions)} images of "
                            f"{'x'.join(map(str, svc.bundle.image_shape))} are {values}: ask for fewer {param}, or "
                            "format png", "format")
    seeds = svc.check_seeds(body.seeds, len(conditions)) if body.seeds is not None else random_seeds(len(conditions))
    tick = time.perf_counter()
    state = await generation.run(svc, request, conditions, seeds, param, encode=body.format == "png")
    model = svc.bundle.name if generation.kind == "student" else svc.teacher_name
    timing = {"seconds": round(time.perf_counter() - tick, 6), "nfe": len(conditions) * generation.steps}
    body_out = {"model": model, "guidance": generation.guidance_scale, "steps": generation.steps, "seeds": seeds,
                "timings": timing}
    if body.format == "raw":
        return answer({**body_out, "arrays": (await to_host(state.x)).clip(-1, 1)}, state)
    return answer({**body_out, "images": state.encoded, "output_format": body.output_format}, state)


@router.post("/v1/search", response_model=SearchResponse, response_model_exclude_none=True, tags=["search"])
async def search(body: SearchRequest, request: Request):
    """Best-of-N: score N student candidates with the verifier, keep the best top_k seeds, and
    optionally run the teacher from their noise."""
    svc = service(request)
    svc.check_ready()
    text = svc.prompts is not None
    param = "prompt" if text else "label"
    if svc.bundle.verifier is None:
        raise ApiError(422, f"{param}: the bundle {svc.bundle.name!r} has no verifier to score candidates with",
                       param)
    if svc.resolve_model(body.model) != "student":
        raise ApiError(422, f"model: search draws its candidates from the student {svc.bundle.name!r}", "model")
    if (body.prompt if text else body.label) is None or (body.label if text else body.prompt) is not None:
        other = body.label if text else body.prompt
        wanted = "text: give a prompt" if text else "classes: give a label"
        instead = (", not a label" if text else ", not a prompt") if other is not None else " (the field is required)"
        raise ApiError(422, f"{param}: this bundle is conditioned on {wanted}{instead}", param)
    label = None if text else svc.resolve_label(body.label, "label")
    guidance_scale = svc.resolve_guidance("student", body.guidance)
    if body.seed is not None and body.seeds is not None:
        raise ApiError(422, "seeds: give seed (the candidates use seed, seed+1, ...) or seeds (one per candidate), "
                            "not both", "seeds")
    if body.top_k > body.n:
        raise ApiError(422, f"top_k: must lie in 1..n ({body.n}), got {body.top_k}", "top_k")
    per = f"one per candidate: n is {body.n}" + ("" if "n" in body.model_fields_set else " by default")
    seeds = (svc.check_seeds(body.seeds, body.n, per=per) if body.seeds is not None
             else consecutive_seeds(body.seed, body.n))
    stages = plan_search(svc.bundle.sample_shape, guidance_scale, body.n, body.student_steps, body.top_k,
                         body.teacher_steps, EncodeImages(svc.encoder, output_of(svc, body), svc.bundle.image_shape,
                                                          body.top_k, "top_k"),
                         decode=svc.bundle.decoder is not None, prompts=svc.prompts,
                         negative=svc.bundle.teacher_takes_negative)
    state = (State(seeds, np.zeros(0, np.float32), prompts=[body.prompt] * body.n) if text
             else State(seeds, np.full(body.n, label, np.int64)))
    tick, deadline = time.perf_counter(), svc.deadline()
    timings = await until_disconnect(request, svc.execute(stages, state, deadline), deadline)
    chosen_seeds = [seeds[i] for i in state.chosen]
    svc.metrics.images.labels(model="search").inc(len(chosen_seeds))
    svc.metrics.search_candidates.inc(body.n)
    found = {
        "model": svc.bundle.name, **({"prompt": body.prompt} if text else {"label": label}),
        "guidance": guidance_scale, "chosen_seeds": chosen_seeds,
        "images": state.encoded, "output_format": body.output_format, "final_scores": [float(s) for s in state.scores],
        "candidates": sorted(({"seed": s, "score": c} for s, c in zip(seeds, state.candidate_scores, strict=True)),
                             key=lambda candidate: -candidate["score"]),  # best first
        "stages": [t.as_dict() for t in timings], "total_nfe": sum(t.nfe for t in timings),
        "seconds": round(time.perf_counter() - tick, 6)}
    if body.return_noise:
        found["noise"] = [b64_npy(row) for row in state.noise]
    return answer(found, state)


# The generation routes, by path: their request model and handler (server/fast_path.py uses these).
ROUTES = {
    "/v1/images/generations": (ImagesRequest, images_generations),
    "/v1/generate": (GenerateRequest, generate),
    "/v1/search": (SearchRequest, search),
}


@router.get("/v1/models", tags=["models"])
async def models(request: Request):
    """OpenAI list shape: the student (listing its baked guidance scales) and the teacher."""
    return {"object": "list", "data": service(request).model_cards()}


# HEAD too: some load balancers probe with it
@router.api_route("/health/live", methods=["GET", "HEAD"], tags=["health"])
async def live():
    return {"status": "live"}


@router.api_route("/health/ready", methods=["GET", "HEAD"], tags=["health"])
async def ready(request: Request):
    svc = service(request)
    is_ready = svc.ready and not svc.draining
    body = {"ready": is_ready, "warm": svc.ready, "draining": svc.draining,
            "queue_rows": {name: b.queued_rows for name, b in svc.batchers.items()}}
    if svc.failure:
        body["error"] = svc.failure
    return JSONResponse(body, status_code=200 if is_ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    return Response(generate_latest(service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
