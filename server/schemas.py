"""Request and response bodies. Ranges live here, in one place, and 422 messages quote them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.noise import MAX_SEED

Seed = Field(default=None, ge=0, le=MAX_SEED, description="noise seed; omitted = random, returned")
MAX_STUDENT_STEPS, MAX_TEACHER_STEPS = 8, 1000


class ImagesRequest(BaseModel):
    """OpenAI Images API request; `prompt` names a class. Extras: seed, steps, guidance."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(..., min_length=1, max_length=200, description='a class: "7" or a class name')
    model: str | None = Field(None, description="the bundle name (student) or <name>-teacher")
    n: int = Field(1, ge=1, le=64)
    size: str | None = Field(None, description='native ("8x8") or a whole multiple ("64x64"), nearest-neighbour')
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = Seed
    steps: int | None = Field(None, ge=1, le=MAX_TEACHER_STEPS,
                              description=f"student jumps 1..{MAX_STUDENT_STEPS}; teacher steps 1..{MAX_TEACHER_STEPS}")
    guidance: float | None = Field(None, description="a guidance scale the bundle has baked")


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class GenerateRequest(BaseModel):
    """Native batch form: one image per label."""

    model_config = ConfigDict(extra="forbid")
    labels: list[int | str] = Field(..., min_length=1, max_length=256, description="class indices or names")
    seeds: list[int] | None = Field(None, description="one per label; omitted = random")
    steps: int = Field(1, ge=1, le=MAX_TEACHER_STEPS,
                       description=f"student jumps 1..{MAX_STUDENT_STEPS}; teacher steps 1..{MAX_TEACHER_STEPS}")
    model: str | None = None
    guidance: float | None = None
    format: Literal["png", "raw"] = Field("png", description="png (base64) or raw float arrays [C, H, W] in [-1, 1]")
    size: str | None = None


class GenerateResponse(BaseModel):
    model: str
    guidance: float
    steps: int
    seeds: list[int]
    images: list[str] | None = None
    arrays: list[list[list[list[float]]]] | None = None
    timings: dict[str, float]


class SearchRequest(BaseModel):
    """Best-of-N noise search: N student candidates, verifier scores, top_k, optional teacher."""

    model_config = ConfigDict(extra="forbid")
    label: int | str
    n: int = Field(64, ge=1, le=1024, description="candidates")
    top_k: int = Field(1, ge=1, le=64)
    student_steps: int = Field(1, ge=1, le=MAX_STUDENT_STEPS)
    teacher_steps: int = Field(0, ge=0, le=MAX_TEACHER_STEPS, description="0 = return the student's images")
    seed: int | None = Field(None, ge=0, le=MAX_SEED - 1024, description="candidates use seed, seed+1, ...")
    seeds: list[int] | None = Field(None, description="explicit candidate seeds (length n)")
    model: str | None = None
    guidance: float | None = None
    return_noise: bool = Field(False, description="include the chosen noise as base64 .npy")
    size: str | None = None


class Candidate(BaseModel):
    seed: int
    score: float


class SearchResponse(BaseModel):
    model: str
    label: int
    guidance: float
    chosen_seeds: list[int]
    images: list[str]
    final_scores: list[float]
    candidates: list[Candidate]
    noise: list[str] | None = None
    stages: list[dict]
    total_nfe: int
    seconds: float


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
