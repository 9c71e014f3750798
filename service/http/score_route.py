"""POST /score: request -> ScoreOrder (images decoded exactly, checked against the model) -> the worker's score
pools (service/engine/pools/score.py) -> ScoreResponse with each image's OOD verdict. The scores themselves are
training/sampling/scoring.py's, the same functions `python -m training score` runs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse

from service.catalogue.registry import ServedModel
from service.catalogue.served_models import ServedModels
from service.engine.messages import CancelledByClient, ScoreOrder, ScoreResult
from service.engine.worker import Worker
from service.http.bridge import record, worker_answer
from service.http.schemas import ErrorBody, ScoreRequest, ScoreResponse
from service.metrics import Metrics
from service.settings import Settings
from training.runtime.images import ImageDecodeError, exact_pixels, pixels_in_range
from training.sampling.scoring import (
    LikelihoodSettings,
    OodReference,
    ScoreFamily,
    ood_reference,
    ood_score_name,
    result_rows,
    score_family,
)

MODEL_VERSION_HEADER = "X-Model-Version"  # on every POST /sample and /score answer: the version that served it
SCORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body is not valid JSON, not UTF-8 or empty"},
    401: {"model": ErrorBody, "description": "missing or wrong API key (only when the server has one)"},
    404: {"model": ErrorBody, "description": "unknown model; the message lists the served ones"},
    408: {"model": ErrorBody, "description": "the body did not arrive in time"},
    413: {"model": ErrorBody, "description": "body larger than max_score_body_bytes (/models limits.score)"},
    415: {"model": ErrorBody, "description": "the body was not sent with 'content-type: application/json'"},
    422: {
        "model": ErrorBody,
        "description": "invalid field, too many images, an image that is not a readable PNG or JPEG or whose "
        "size or channels are not the model's (named), a label the model does not take, or a model that cannot "
        "score (a GAN saved without its critic, a model of 2-D points)",
    },
    499: {"description": "the client went away before the answer (nobody reads it)"},
    503: {
        "model": ErrorBody,
        "description": "queue full (Retry-After), the device failed the batch, or shutting down",
        "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    },
    504: {"model": ErrorBody, "description": "the request's deadline (score_timeout_s) passed"},
}


def served_reference(model: ServedModel) -> OodReference | None:
    """The reference `ood_p` is read against: the checkpoint's own; none for an ensemble, whose energy (its
    members' mean) is not what any member's reference recorded."""
    return ood_reference(model.members[0].config.metrics) if len(model.members) == 1 else None


def score_limits(settings: Settings, model: ServedModel) -> dict[str, Any]:
    """What /models says of POST /score for a model: the caps, which score `ood` is, and its reference (or why
    `ood_p` is null, or why the model cannot score)."""
    limits: dict[str, Any] = {
        "max_images": min(settings.max_score_images, settings.chain_budget),
        "max_body_bytes": settings.max_score_body_bytes,
        "timeout_s": settings.score_timeout_s,
    }
    try:
        family = score_family(model.members[0])
    except ValueError as error:
        return {**limits, "scores": None, "why_not": str(error)}
    reference = served_reference(model)
    limits.update(
        scores=list(family.fields),
        label=family.conditional_label and model.classes is not None,
        ood_score=ood_score_name(model.members[0], family),
        ood_reference={"n": len(reference.reference), "split": reference.split} if reference else None,
    )
    if reference is None and len(model.members) > 1:
        limits["ood_p"] = "null: an ensemble's energy is its members' mean, which no member's reference recorded"
    elif reference is None:
        limits["ood_p"] = "null: the checkpoint records no reference scores (python -m training score --help)"
    if not family.one_pass:
        limits["likelihood"] = LikelihoodSettings(settings.score_rtol, settings.score_atol).report()
    return limits


def _pixels(index: int, text: str, shape: tuple[int, ...]) -> np.ndarray:
    """images[index] -> its 8-bit levels [H, W, C], exactly as sent; 422 naming what is wrong."""
    encoded = text.partition(",")[2] if text.startswith("data:") else text
    try:
        payload = base64.b64decode("".join(encoded.split()), validate=True)
        return exact_pixels(payload, shape)
    except binascii.Error as error:
        raise HTTPException(422, detail=f"images[{index}] is not base64: {error}") from error
    except ImageDecodeError as error:
        raise HTTPException(422, detail=f"images[{index}]: {error}") from error


def decode_images(texts: list[str], model: ServedModel) -> torch.Tensor:
    """The request's images -> [N, *shape] in the model's data range: each image's levels into one uint8 array,
    then one conversion of all of them (decode_exact's numbers in about half its time: 32 µs an image, not 58)."""
    member = model.members[0]
    channels, height, width = member.shape
    levels = np.empty((len(texts), height, width, channels), dtype=np.uint8)
    for index, text in enumerate(texts):
        levels[index] = _pixels(index, text, member.shape)
    return pixels_in_range(torch.from_numpy(levels), member.data_range)


def _family(model: ServedModel) -> ScoreFamily:
    try:
        return score_family(model.members[0])
    except ValueError as error:
        raise HTTPException(422, detail=f"{model.name} cannot score images: {error}") from error


async def make_score_order(body: ScoreRequest, model: ServedModel, settings: Settings) -> ScoreOrder:
    """The order the worker scores: every image decoded exactly, the label checked against the model."""
    family = _family(model)
    largest = min(settings.max_score_images, settings.chain_budget)
    if len(body.images) > largest:
        raise HTTPException(422, detail=f"{len(body.images)} images; this server scores at most {largest} a request")
    labels = None
    if body.label is not None:
        classes = model.classes
        if not family.conditional_label or classes is None:
            raise HTTPException(
                422, detail=f"'label' applies to class-conditional EBMs and CNFs; {model.name} takes no label"
            )
        if body.label >= len(classes):
            raise HTTPException(
                422, detail=f"'label' {body.label} is out of range for {model.name}: 0..{len(classes) - 1}"
            )
        labels = torch.full((len(body.images),), body.label)

    return ScoreOrder(model, await asyncio.to_thread(decode_images, body.images, model), labels)


@dataclass(frozen=True)
class Scoring:
    """What a served model's answers read that does not change while it is served: its family, which score `ood`
    is, and the reference `ood_p` is read against (checking and sorting a checkpoint's 1,000 recorded scores takes
    0.15 ms; it was done twice a request)."""

    family: ScoreFamily
    score_name: str
    reference: OodReference | None


_scorings: dict[int, Scoring] = {}  # id(ServedModel) -> its Scoring, dropped with the model (weakref.finalize)


def scoring_of(model: ServedModel) -> Scoring:
    """The model's Scoring, worked out once for each ServedModel (a reload makes a new one)."""
    known = _scorings.get(id(model))
    if known is None:
        member = model.members[0]
        family = score_family(member)
        known = Scoring(family, ood_score_name(member, family), served_reference(model))
        _scorings[id(model)] = known
        weakref.finalize(model, _scorings.pop, id(model), None)
    return known


ALWAYS_SENT = ("ood", "ood_p")  # in every result, null where unknown; a family's scores only where finite


def score_body(result: ScoreResult, order: ScoreOrder, started: float) -> dict[str, Any]:
    """The JSON body, ScoreResponse's fields in its order, built as plain data (validating and dumping a
    ScoreItem an image cost more than the rest of the answer): every result has `ood` and `ood_p` (null where
    unknown) and only its family's scores."""
    scoring = scoring_of(order.model)
    rows = result_rows(result.scores, scoring.family, scoring.score_name, scoring.reference)
    body: dict[str, Any] = {
        "model": order.model.name,
        "model_version": order.model.version,
        "ood_score": scoring.score_name,
    }
    if result.likelihood is not None:
        body["likelihood"] = result.likelihood
    results: list[dict[str, float | int | None]] = [
        {name: value for name, value in row.items() if value is not None} for row in rows
    ]
    for result_row in results:  # after the others where null, as ScoreResponse's dump then setting them put them
        for name in ALWAYS_SENT:
            result_row.setdefault(name, None)
    body["results"] = results
    body["timings"] = {
        "queue_ms": round(result.queue_seconds * 1000, 2),
        "run_ms": round(result.run_seconds * 1000, 2),
        "total_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    return body


def add_score_route(app: FastAPI, settings: Settings, metrics: Metrics, json_body: DependsParam) -> None:
    """Register POST /score (behind the API key with /sample; `json_body` refuses a body not sent as JSON)."""

    @app.post(
        "/score",
        response_model=ScoreResponse,
        responses=SCORE_RESPONSES,
        dependencies=[json_body],
    )
    async def score(body: ScoreRequest, request: Request) -> Response:
        """Score images under a model: energies, likelihoods or critic values, and an OOD verdict each."""
        started = time.perf_counter()
        served: ServedModels = request.app.state.served
        worker: Worker = request.app.state.worker
        with served.lease(body.model) as model:
            label, status = (body.model if model else "unknown"), 500
            try:
                if model is None:
                    known = ", ".join(sorted(served.registry.models)) or "none"
                    raise HTTPException(404, detail=f"unknown model {body.model!r}; served models: {known}")
                order = await make_score_order(body, model, settings)
                result = await worker_answer(worker, order, settings, request, settings.score_timeout_s)
                assert isinstance(result, ScoreResult)
                status = 200
                body_out = score_body(result, order, started)
                return JSONResponse(body_out, headers={MODEL_VERSION_HEADER: model.version})
            except HTTPException as error:
                status = error.status_code
                raise
            except CancelledByClient:
                status = 499
                raise HTTPException(499, detail="client disconnected") from None
            finally:
                record(metrics, label, status, started)
