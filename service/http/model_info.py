"""A served model as GET /models describes it: what its file states, the request fields it reads and this
server's limits on them, and its replay buffer as the worker last published it."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from service.catalogue.buffer_store import BufferStore
from service.catalogue.registry import ServedModel
from service.engine.worker import Worker
from service.http.orders import COMMON_FIELDS, accepted_fields
from service.http.schemas import ModelInfo, field_limits
from service.http.score_route import score_limits
from service.settings import Settings


class ServedModelInfo(ModelInfo):
    """A model as GET /models lists it: what ModelInfo says, and which version of its file serves now."""

    version: str = Field(description="its file's digest prefix (an ensemble's: its buffer group's); X-Model-Version")
    loaded_at: datetime | None = Field(None, description="when this version was loaded, ISO 8601 UTC")


def model_info(model: ServedModel, worker: Worker, store: BufferStore, settings: Settings) -> ServedModelInfo:
    config = model.config
    buffer = worker.buffers.get(model.group) if model.group and model.has_buffer else None  # the worker's snapshot
    ensemble_only = {key: value for key, value in config.metrics.items() if key.startswith("evaluate_ensemble")}
    return ServedModelInfo(
        name=model.name,
        version=model.version,
        loaded_at=model.loaded_at,
        family=model.family,
        members=[member.name for member in model.members],
        shape=list(config.data["shape"]),
        data_range=list(model.members[0].data_range),
        dataset=config.data.get("dataset"),
        ensemble=config.ensemble,
        sampler=model.kind.shown_sampler(model.members[0]),
        classes=model.classes,
        latent_langevin="ddls" in model.kind.pools(model.members[0]),
        fields=accepted_fields(model),
        limits={
            "max_n": settings.max_n,
            "max_steps": settings.max_steps,
            "max_frames": settings.max_frames,
            "max_gif_pixels": settings.max_gif_pixels,  # a GIF answer's frames x its grid's pixels
            "fields": _request_limits(settings, model),
            "score": score_limits(settings, model),
            "device": worker.device_limits(model),  # images and bytes within --device-budget-mb (None: unbounded)
        },
        metrics=config.metrics if len(model.members) == 1 else ensemble_only,
        buffer_size=buffer.size if buffer else None,
        buffer_capacity=buffer.capacity if buffer else None,
        buffer_bytes=buffer.nbytes if buffer else None,
        buffer_note=buffer.note if buffer else None,
        buffer_saved_at=store.saved_at.get(model.group) if model.group else None,
    )


def _request_limits(settings: Settings, model: ServedModel) -> dict[str, dict[str, float]]:
    """The bounds of each numeric request field the model reads, as the schema states them, with this server's
    caps on n and steps."""
    reads = {*COMMON_FIELDS, *accepted_fields(model)}
    limits = {name: bounds for name, bounds in field_limits().items() if name in reads}
    limits["n"] = {**limits["n"], "le": min(settings.max_n, settings.chain_budget)}
    if "steps" in limits:
        limits["steps"] = {**limits["steps"], "le": settings.max_steps}
    return limits
