"""POST /score: what the client sends (images under one model) and hands back (each image's scores and OOD
verdict, typed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from samplebay_client.answers import ImageInput, encode_image
from samplebay_client.errors import BadRequest

SCORE_FIELDS = ("energy", "log_prob", "bits_per_dim", "evaluations", "critic")  # what a family may add


def _number(value: Any) -> float | None:
    """A finite float, or None where the server sent null (JSON has no NaN)."""
    if value is None:
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"a score of {value!r} is not a finite number")
    return number


@dataclass(frozen=True)
class ScoreResult:
    """One image's scores: `ood` (higher = further out of distribution), `ood_p` (the fraction of the model's
    own held-out data scoring at least as high; None without a recorded reference) and what its family knows."""

    ood: float | None
    ood_p: float | None
    energy: float | None = None  # EBMs (an ensemble: its members' mean)
    log_prob: float | None = None  # flows and CNFs, nats
    bits_per_dim: float | None = None
    evaluations: int | None = None  # a CNF's field evaluations
    critic: float | None = None  # GANs

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScoreResult:
        values = {name: _number(data.get(name)) for name in ("ood", "ood_p", *SCORE_FIELDS)}
        evaluations = values.pop("evaluations")
        return cls(**values, evaluations=None if evaluations is None else int(evaluations))


@dataclass(frozen=True)
class Scores:
    """A POST /score answer: one result per image sent, in order."""

    model: str
    model_version: str
    ood_score: str  # `ood`'s score: energy, bits_per_dim, complexity_bits, typicality, reconstruction, negative_critic
    results: list[ScoreResult]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Scores:
        results = data["results"]
        if not isinstance(results, list):
            raise TypeError(f"results is a {type(results).__name__}, not a list")
        return cls(
            str(data["model"]),
            str(data["model_version"]),
            str(data["ood_score"]),
            [ScoreResult.from_json(item) for item in results],
        )


def score_body(model: str, images: Sequence[ImageInput], label: int | None) -> dict[str, Any]:
    """The request: each image as base64 (scored exactly as sent: the server resizes nothing)."""
    if isinstance(images, str | bytes) or not len(images):
        raise BadRequest("images: give a list of one or more images (base64, PNG/JPEG bytes, PIL or uint8 arrays)")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise BadRequest(f"label must be an integer class index, not {label!r}")
    body: dict[str, Any] = {"model": model, "images": [encode_image(image) for image in images]}
    return body if label is None else {**body, "label": label}
