"""Request and response bodies and their limits: what the API promises, checked before any work."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from training.sampling.sampler_config import (
    GUIDANCE,
    INT32_MAX,
    MOMENTUM,
    NOISE,
    STEP_SIZE,
    STEPS,
    TEMPERATURE,
    TOLERANCE,
    Bounds,
)


def _override(bounds: Bounds, description: str | None = None) -> Any:
    """A field that overrides a checkpoint's sampler default, bounded as that default is at load."""
    return Field(None, ge=bounds.ge, gt=bounds.gt, le=bounds.le, description=description)


class SampleRequest(BaseModel):
    """POST /sample. Fields left out take the checkpoint's defaults.

    Every number is bounded here, where float32 holds it and the sampler still makes sense, so no value
    a client may send overflows on the device (step_size 1e39 would fail the whole shared batch); a sampler
    setting by the bounds its checkpoint's default was checked against (training/sampling/sampler_config.py); every
    integer fits int32, and the server's tighter caps are in /models `limits`. Types are strict, as the README
    promises: "4" is not a number nor 1 a boolean (a whole number is still fine where a decimal is expected).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    model: str = Field(min_length=1, max_length=200)
    n: int = Field(1, ge=1, le=INT32_MAX, description="at most the server's max_n (see /models limits)")
    seed: int | None = Field(None, ge=0, le=INT32_MAX)
    format: Literal["png", "json", "gif"] = "png"
    steps: int | None = _override(
        STEPS,
        "at most the server's max_steps: an EBM's Langevin steps (1 or more), a CNF's ODE solver steps "
        "(1 or more), or a GAN's DDLS steps on its latent (0: one plain generator pass)",
    )
    step_size: float | None = _override(STEP_SIZE)
    noise: float | None = _override(NOISE)  # std of the noise per step; the data range is about [-1, 1]
    momentum: float | None = _override(MOMENTUM)  # heavy-ball Langevin; 0 = plain steps
    guidance: float | None = _override(
        GUIDANCE, "with a label: E(x) + w (E(x, y) - E(x)); a CNF's field v(x, t) + w (v(x, t, y) - v(x, t))"
    )
    tolerance: float | None = _override(
        TOLERANCE,
        "EBMs: a chain stops once its RMS move in one step (over the pixels it may change) falls below this; "
        "`steps` is then the most it runs (0: every chain runs `steps`)",
    )
    init: Literal["buffer", "noise", "image"] | None = Field(
        None, description="where chains start; a CNF: 'noise' (its prior) or 'image' with a 'mask' (inpainting)"
    )
    image: str | None = Field(None, description="init 'image': base64 PNG/JPEG (a data: URL is fine)")
    mask: str | None = Field(
        None, description="with image, of the same size: white marks pixels to fill in, black pixels stay"
    )
    stream: bool = False  # Server-Sent Events: one event per trajectory frame, then the samples
    temperature: float | None = _override(
        TEMPERATURE,
        "an EBM's gradient is divided by it; a GAN's latent, a flow's base sample and a CNF's prior are scaled by it",
    )
    label: int | None = Field(
        None, ge=0, le=INT32_MAX, description="class-conditional EBMs and CNFs: an index into the model's classes"
    )
    trajectory_every: int | None = Field(None, ge=1, le=INT32_MAX)


def field_limits() -> dict[str, dict[str, float]]:
    """The bounds of SampleRequest's numeric fields, {"step_size": {"gt": 0, "le": 1000}, ...}, for /models:
    read from the fields themselves, so the schema and /models state the same limits."""
    limits: dict[str, dict[str, float]] = {}
    for name, info in SampleRequest.model_fields.items():
        bounds = {
            kind: getattr(rule, kind)
            for rule in info.metadata
            for kind in ("gt", "ge", "lt", "le")
            if getattr(rule, kind, None) is not None
        }
        if bounds:
            limits[name] = bounds
    return limits


class Timings(BaseModel):
    queue_ms: float
    run_ms: float
    total_ms: float


class SampleResponse(BaseModel):
    model: str
    seed: int
    images: list[str]  # base64 PNG, one per sample
    energy: list[float | None] | None = None  # EBM: energy of each sample at its last step; null if not finite
    bits_per_dim: list[float | None] | None = None  # flow: bits/dim of each sample (256 levels); null if not finite
    steps: int | None = None  # the most steps any chain ran
    chain_steps: list[int] | None = None  # EBM: steps each image's chain ran (fewer than `steps` where it stopped)
    trajectory: list[list[str]] | None = None  # frames at steps 0, k, 2k, ... (and the last)
    trajectory_steps: list[int] | None = None
    timings: Timings


class ModelInfo(BaseModel):
    name: str
    family: str
    members: list[str]  # checkpoints behind this name (several for an ensemble)
    shape: list[int]
    data_range: list[float]
    dataset: str | None
    ensemble: str | None
    sampler: dict
    classes: list[str] | None = None  # what `label` indexes; null for an unconditional model
    latent_langevin: bool = False  # a GAN whose critic was saved: `steps` > 0 refines its latents (DDLS)
    fields: list[str] = []  # request fields it reads beyond model, n, seed, format and stream
    limits: dict
    metrics: dict
    buffer_size: int | None = None
    buffer_capacity: int | None = None
    buffer_bytes: int | None = None  # memory its slots hold (float16 samples, classes, leases)
    buffer_note: str | None = None  # why it holds fewer slots than the model asks for (--buffer-budget-mb)
    buffer_saved_at: datetime | None = None  # last save to the state directory, ISO 8601 UTC


class FieldProblem(BaseModel):
    field: str  # dotted path of the bad field ("step_size"), or "body"
    message: str


class ErrorBody(BaseModel):
    """Every error answer: what is wrong and what would be right; a 422 from validation lists each field."""

    detail: str
    errors: list[FieldProblem] | None = None


class Readiness(BaseModel):
    """GET /readyz: 200 when models are loaded and the worker runs, else 503 with the same body."""

    ready: bool
    models: list[str]
    worker_running: bool
    refused: dict[str, str]  # checkpoint file -> why it is not served


class ScoreRequest(BaseModel):
    """POST /score: images to score under one model, each exactly the model's size and channels."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    model: str = Field(min_length=1, max_length=200)
    images: list[str] = Field(
        min_length=1,
        description="base64 PNG or JPEG images (or data: URLs), each the model's width, height and channels "
        "(no resizing); at most the server's max_score_images (see /models limits.score)",
    )
    label: int | None = Field(
        None,
        ge=0,
        le=INT32_MAX,
        description="class-conditional EBMs and CNFs: score E(x, y) or log p(x | y) for this class (index into "
        "/models classes); without it the unconditional energy or likelihood",
    )


class ScoreItem(BaseModel):
    """One image's scores: the OOD verdict, and what its family knows (absent where it does not apply)."""

    ood: float | None = Field(description="the model's OOD score, higher = more out of distribution (null: not finite)")
    ood_p: float | None = Field(
        description="fraction of the model's held-out reference scores at least as high as `ood` (a p-value); "
        "null when the checkpoint records no reference (see /models limits.score)"
    )
    energy: float | None = Field(None, description="EBMs and ensembles: E(x), or E(x, y) with a label")
    log_prob: float | None = Field(None, description="flows: log p of the dequantized image in the data space, nats")
    bits_per_dim: float | None = Field(None, description="flows: -log2 P(8-bit image) per dimension")
    evaluations: int | None = Field(None, description="CNFs: field evaluations the adaptive solve took (NFE)")
    critic: float | None = Field(None, description="GANs with a critic: the critic's value d(x)")


class ScoreResponse(BaseModel):
    model: str
    model_version: str  # as /models and X-Model-Version state it
    ood_score: str  # which score `ood` is (energy, bits_per_dim, negative_critic)
    likelihood: dict[str, Any] | None = None  # CNFs: solver, tolerances and trace estimator of the solve
    results: list[ScoreItem]  # one per image, in order
    timings: Timings
