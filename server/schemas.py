"""Request and response bodies. Ranges live here, in one place, and 422 messages quote them.

Requests are strict: `"2"` or `true` for a number is refused with a 422, never coerced. `steps` has
no schema range because its range depends on the model (the student takes 1..8 jumps, the teacher
1..1000 Euler steps): the route checks it and names the right one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.noise import MAX_SEED


def bounds_of(field) -> dict:
    """A pydantic field's declared range, what a refusal quotes: its ge, gt, le, lt, min_length and max_length
    where set (none for None)."""
    return {key: getattr(item, key) for item in (getattr(field, "metadata", None) or [])
            for key in ("ge", "gt", "le", "lt", "min_length", "max_length") if getattr(item, key, None) is not None}

Seed = Field(default=None, ge=0, le=MAX_SEED, description="noise seed; omitted = random, returned")
MAX_STUDENT_STEPS, MAX_TEACHER_STEPS = 8, 1000
MAX_RAW_VALUES = 1 << 22  # format raw: pixels a response holds as JSON text (one 1024 px RGB image fits)
DEFAULT_TEACHER_STEPS = 50
STEPS_HELP = (f"student jumps 1..{MAX_STUDENT_STEPS} (default 1); teacher Euler steps 1..{MAX_TEACHER_STEPS} "
              f"(default {DEFAULT_TEACHER_STEPS})")
Model = Field(None, max_length=200, description="the bundle name (student) or <name>-teacher; default the student")
PROMPT_MAX_CHARS = 4000  # text bundles' tokenizers cut far earlier (77 to 512 tokens); see server/prompts.py
Size = Field(None, max_length=32, description='native ("8x8") or a whole multiple ("64x64"), nearest-neighbour')


class ImageOutput(BaseModel):
    """How the images come back, as the OpenAI Images API asks for them."""

    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="the images' encoding")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg and webp quality, 0..100 (100, "
                                           "the default, compresses least; jpeg's lowest quality is 1, so 0 "
                                           "gives 1's bytes); png is lossless and ignores it")


class ImagesRequest(ImageOutput):
    """OpenAI Images API request; `prompt` is free text for text bundles and names a class for class
    bundles. Extras: seed, steps, guidance. OpenAI's fields that change nothing here (user, safety_identifier,
    quality, complexity, style, moderation; an opaque background, no streaming) are accepted for its clients; any
    other field is refused, as on the other routes (a `seeds` meant for /v1/generate would otherwise be dropped and
    the seeds random)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # OpenAI's own extras are fields below
    prompt: str = Field(..., min_length=1, max_length=PROMPT_MAX_CHARS,
                        description='text bundles: the prompt; class bundles: a class, "7" or a class name')
    negative_prompt: str | None = Field(None, max_length=PROMPT_MAX_CHARS, description="text bundles, the teacher "
                                        "with guidance only: the unconditional side of its guidance (default: the "
                                        "empty prompt)")
    model: str | None = Model
    n: int = Field(1, ge=1, le=64)
    size: str | None = Size
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = Seed
    steps: int | None = Field(None, description=STEPS_HELP)
    guidance: float | None = Field(None, description="a guidance scale the bundle has baked")
    user: str | None = Field(None, max_length=256, description="OpenAI's end-user tag: accepted, not used")
    safety_identifier: str | None = Field(None, max_length=256, description="OpenAI's end-user tag (user's "
                                          "successor): accepted, not used")
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "hd", "standard"] | None = Field(
        None, description="OpenAI's: accepted, not used (a bundle has one quality; steps sets the teacher's)")
    complexity: Literal["low", "medium", "high"] | None = Field(None, description="OpenAI's: accepted, not used")
    style: Literal["vivid", "natural"] | None = Field(None, description="OpenAI's: accepted, not used")
    moderation: Literal["auto", "low"] | None = Field(None, description="OpenAI's: accepted; nothing is moderated")
    background: Literal["auto", "opaque"] | None = Field(None, description="OpenAI's: images are opaque (no "
                                                           "transparent background)")
    stream: Literal[False] | None = Field(None, description="OpenAI's: no streaming, the images come whole")
    partial_images: Literal[0] | None = Field(None, description="OpenAI's, for streaming: none here")


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str


class GenerateRequest(ImageOutput):
    """Native batch form: one image per label (class bundles) or per prompt (text bundles)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    labels: list[int | str] | None = Field(None, min_length=1, max_length=256,
                                           description="class bundles: class indices or names")
    prompts: list[Annotated[str, Field(min_length=1, max_length=PROMPT_MAX_CHARS)]] | None = Field(
        None, min_length=1, max_length=256, description="text bundles: prompts")
    negative_prompt: str | None = Field(None, max_length=PROMPT_MAX_CHARS, description="text bundles, the teacher "
                                        "with guidance only: one negative prompt for every image")
    seeds: list[int] | None = Field(None, description="one per label or prompt; omitted = random")
    steps: int | None = Field(None, description=STEPS_HELP)
    model: str | None = Model
    guidance: float | None = None
    format: Literal["png", "raw"] = Field("png", description="encoded images (base64, in output_format) or raw "
                                          f"float arrays [C, H, W] in [-1, 1], at most {MAX_RAW_VALUES} values")
    size: str | None = Size


class GenerateResponse(BaseModel):
    model: str
    guidance: float
    steps: int
    seeds: list[int]
    images: list[str] | None = None
    output_format: str | None = None
    arrays: list[list[list[list[float]]]] | None = None
    timings: dict[str, float]


class SearchRequest(ImageOutput):
    """Best-of-N noise search: N student candidates, verifier scores, top_k, optional teacher."""

    model_config = ConfigDict(extra="forbid", strict=True)
    label: int | str | None = Field(None, description="class bundles: the class to search for")
    prompt: str | None = Field(None, min_length=1, max_length=PROMPT_MAX_CHARS,
                               description="text bundles: the prompt to search for")
    n: int = Field(64, ge=1, le=1024, description="candidates")
    top_k: int = Field(1, ge=1, le=64)
    student_steps: int = Field(1, ge=1, le=MAX_STUDENT_STEPS)
    teacher_steps: int = Field(0, ge=0, le=MAX_TEACHER_STEPS, description="0 = return the student's images")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="candidates use seed, seed+1, ... (seed + n - 1 "
                             "at most the largest seed)")
    seeds: list[int] | None = Field(None, description="explicit candidate seeds (length n); not with seed")
    model: str | None = Model
    guidance: float | None = None
    return_noise: bool = Field(False, description="include the chosen noise as base64 .npy")
    size: str | None = Size


class Candidate(BaseModel):
    seed: int
    score: float


class SearchResponse(BaseModel):
    model: str
    label: int | None = None
    prompt: str | None = None
    guidance: float
    chosen_seeds: list[int]
    images: list[str]
    output_format: str
    final_scores: list[float]
    candidates: list[Candidate] = Field(description="every candidate's seed and verifier score, best first")
    noise: list[str] | None = None
    stages: list[dict]
    total_nfe: int
    seconds: float
