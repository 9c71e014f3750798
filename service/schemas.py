"""Request and response bodies and their limits: what the API promises, checked before any work."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SampleRequest(BaseModel):
    """POST /sample. Fields left out take the checkpoint's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=200)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**31)
    format: Literal["png", "json", "gif"] = "png"
    steps: int | None = Field(None, ge=1)
    step_size: float | None = Field(None, gt=0)
    noise: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1)  # heavy-ball Langevin; 0 = plain steps
    guidance: float | None = Field(None, ge=0, le=20, description="with a label: E(x) + w (E(x, y) - E(x))")
    init: Literal["buffer", "noise", "image"] | None = None
    image: str | None = Field(None, description="init 'image': base64 PNG/JPEG (a data: URL is fine)")
    mask: str | None = Field(None, description="with image: white marks pixels to fill in, black pixels stay")
    stream: bool = False  # Server-Sent Events: one event per trajectory frame, then the samples
    temperature: float | None = Field(None, gt=0, le=100)
    label: int | None = Field(None, ge=0, description="class-conditional EBMs: an index into the model's classes")
    trajectory_every: int | None = Field(None, ge=1)


# Fields that only Langevin sampling reads; for a GAN, `temperature` scales the latent instead.
EBM_ONLY_FIELDS = (
    "steps",
    "step_size",
    "noise",
    "momentum",
    "guidance",
    "init",
    "image",
    "mask",
    "trajectory_every",
)


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
    steps: int | None = None
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
    limits: dict
    metrics: dict
    buffer_size: int | None = None
    buffer_capacity: int | None = None
    buffer_saved_at: datetime | None = None  # last save to the state directory, ISO 8601 UTC
