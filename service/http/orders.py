"""Request -> order: which fields apply to the model and the server's limits, with the refusals and defaults its
family gives (training/families/; the defaults are the checkpoint's sampler config, none is written here), and
uploaded images."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import math
import secrets

import torch
from fastapi import HTTPException

from service.catalogue.registry import ServedModel
from service.engine.messages import SampleOrder
from service.http.schemas import SampleRequest
from service.settings import Settings
from training.families import FAMILIES
from training.runtime.images import decode_image, grid_pixels, image_size

UNSTREAMED_FRAMES = 33  # a GIF or JSON body keeps a trajectory to at most this many frames


COMMON_FIELDS = ("model", "n", "seed", "format", "stream")  # what every model reads
CONDITIONAL_FIELDS = ("label", "guidance")  # of these families, only a class-conditional model reads them


def accepted_fields(model: ServedModel) -> list[str]:
    """The request fields a model reads beyond COMMON_FIELDS (what /models lists), as its family says: the
    Langevin fields for an EBM, the DDLS ones for a GAN with a critic, the ODE's for a CNF; temperature for all;
    label (and guidance) for a class-conditional energy or CNF."""
    return model.kind.request_fields(model.members[0])


def _chain_fields() -> list[str]:
    """Every field some family's chains read, in the order the families list them."""
    return list(dict.fromkeys(name for kind in FAMILIES.values() for name in kind.fields))


def _readers(name: str) -> str:
    """The families that read a field: 'EBMs, CNFs and GANs with a critic', 'class-conditional EBMs and CNFs'."""
    families = [kind.readers for kind in FAMILIES.values() if kind.readers and name in kind.fields]
    named = families[0] if len(families) == 1 else f"{', '.join(families[:-1])} and {families[-1]}"
    return f"class-conditional {named}" if name in CONDITIONAL_FIELDS else named


def _kind(model: ServedModel) -> str:
    """A model as a refusal describes it: conditional or not, its family, and how it samples."""
    conditional = "a class-conditional" if model.classes is not None else "an unconditional"
    return f"{conditional} {model.kind.describe(model.members[0])}"


def _inapplicable(name: str, model: ServedModel) -> str:
    """Why a field does not apply to a model that does not read it: who reads it, and what this model reads."""
    takes = ", ".join(accepted_fields(model))
    return f"'{name}' applies to {_readers(name)}; {model.name} is {_kind(model)}, which takes {takes}"


def check_applicable(body: SampleRequest, model: ServedModel, settings: Settings) -> None:
    """422 for fields that do not apply to the model's family or exceed the server's limits."""
    classes = model.classes
    accepted = accepted_fields(model)
    apart = model.kind.refused_apart(model.members[0])  # fields its family refuses with a message of its own
    problems = [
        _inapplicable(name, model)
        for name in _chain_fields()
        if name not in accepted and getattr(body, name) is not None and name not in apart
    ]
    if body.label is not None and classes is not None and body.label >= len(classes):
        problems.append(
            f"'label' {body.label} is out of range for {model.name}: 0..{len(classes) - 1} ({', '.join(classes)})"
        )
    problems += model.kind.refusals(body, model.members[0], model.name, model.has_buffer)
    if body.init == "image" and body.image is None:
        problems.append("init 'image' needs 'image': a base64 PNG or JPEG")
    if body.image is not None and body.init != "image":
        problems.append("'image' is only read with init 'image'")
    if body.mask is not None and body.image is None:
        problems.append("'mask' needs an 'image' to complete")
    largest = min(settings.max_n, settings.chain_budget)
    if body.n > largest:
        problems.append(f"'n' is {body.n}; this server allows at most {largest}")
    steps = requested_steps(body, model)
    if steps > settings.max_steps:
        problems.append(f"'steps' is {steps}; this server allows at most {settings.max_steps}")
    if body.trajectory_every is not None:
        frames = math.ceil(steps / body.trajectory_every) + 1
        if frames > settings.max_frames:
            problems.append(
                f"trajectory_every={body.trajectory_every} over {steps} steps gives {frames} frames; "
                f"at most {settings.max_frames} are allowed (raise trajectory_every)"
            )
    if problems:
        raise HTTPException(422, detail="; ".join(problems))


def requested_steps(body: SampleRequest, model: ServedModel) -> int:
    """The steps a request's chains take: an EBM's Langevin steps, a GAN's DDLS steps (0: one plain pass), a
    CNF's ODE solver steps; 1 for another flow: one pass of its inverse (whose trajectory, when asked for,
    reports the number of states the inverse went through)."""
    return model.kind.requested_steps(model.members[0], body.steps)


def frame_limit(settings: Settings, streaming: bool) -> int:
    """Frames a trajectory may have: all allowed when streamed, a GIF or JSON body keeps it smaller."""
    return settings.max_frames if streaming else min(settings.max_frames, UNSTREAMED_FRAMES)


def gif_frames(order: SampleOrder) -> int:
    """The frames a GIF answer to an order shows, as far as they are known before its chains run: a chain's
    kept frames (every trajectory_every-th step, and the last); one for a one-pass sampler, whose pass may show more
    states (a flow's inverse), counted again once made."""
    every = order.trajectory_every
    return -(-order.steps // every) + 1 if every and not _one_pass(order) else 1


def _one_pass(order: SampleOrder) -> bool:
    return order.model.kind.pool_for(order.model.members[0], order.steps) == "one_pass"


def check_gif_pixels(frames: int, order: SampleOrder, settings: Settings) -> None:
    """422 for a GIF answer of more than --max-gif-pixels (frames x the grid of the order's n images), naming the
    limit and what fits instead: fewer images, fewer frames, or the frames streamed (not bounded by it)."""
    shape = order.model.members[0].shape
    pixels = frames * grid_pixels(order.n, shape)
    limit = settings.max_gif_pixels
    if pixels <= limit:
        return
    fits = ["stream the frames ('stream': true, or Accept: text/event-stream)"]
    fewer_frames = limit // grid_pixels(order.n, shape)
    if fewer_frames >= 2 and frames > 1 and not _one_pass(order):
        every = math.ceil(order.steps / (fewer_frames - 1))
        fits.insert(0, f"ask for at most {fewer_frames} frames ('trajectory_every' of {every} or more)")
    fewer_images = next((n for n in range(order.n - 1, 0, -1) if frames * grid_pixels(n, shape) <= limit), 0)
    if fewer_images:
        fits.insert(0, f"ask for at most {fewer_images} images")
    raise HTTPException(
        422,
        detail=f"a GIF of {frames} frames of {order.n} images of {list(shape)} is {pixels:,} pixels; this server "
        f"encodes at most {limit:,} (--max-gif-pixels): {', or '.join(fits)}",
    )


def _decode_upload(field: str, text: str, model: ServedModel) -> tuple[torch.Tensor, tuple[int, int]]:
    """A base64 image (or data: URL) -> ([*shape] in the model's data range, its size as sent (width,
    height)); 422 when unreadable."""
    encoded = text.partition(",")[2] if text.startswith("data:") else text
    try:
        payload = base64.b64decode("".join(encoded.split()), validate=True)  # line-wrapped base64 is fine
        return decode_image(payload, model.members[0].shape, model.members[0].data_range), image_size(payload)
    except (binascii.Error, ValueError) as error:
        raise HTTPException(422, detail=f"'{field}' is not a base64 image: {error}") from error


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


async def _start_image(body: SampleRequest, model: ServedModel) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """init "image": the uploaded image [*shape] in the data range and, with a mask, the pixels to fill in
    ([*shape] bool); (None, None) without an image."""
    if body.image is None:
        return None, None
    start_image, image_wh = await asyncio.to_thread(_decode_upload, "image", body.image, model)
    if body.mask is None:
        return start_image, None
    mask, mask_wh = await asyncio.to_thread(_decode_upload, "mask", body.mask, model)
    if mask_wh != image_wh:  # resizing one to the other would move the boundary it marks
        raise HTTPException(
            422,
            detail=f"'mask' is {mask_wh[0]}x{mask_wh[1]} pixels and 'image' is "
            f"{image_wh[0]}x{image_wh[1]}; a mask must be the size of its image",
        )
    low, high = model.members[0].data_range
    # A pixel is free in every channel or none: a colour model's mask is read by its mean brightness.
    return start_image, (mask.mean(0, keepdim=True) > (low + high) / 2).expand_as(mask)


async def make_order(body: SampleRequest, model: ServedModel, settings: Settings, streaming: bool) -> SampleOrder:
    """The order the worker runs: the request's fields, the checkpoint's defaults for the rest."""
    steps = requested_steps(body, model)
    temperature = _given(body.temperature, model.members[0].sampler.temperature)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    wants_frames = body.format == "gif" or streaming
    every = body.trajectory_every
    if every is None and wants_frames:
        every = max(1, math.ceil(steps / (frame_limit(settings, streaming) - 1)))
    order = functools.partial(SampleOrder, model=model, n=body.n, seed=seed, temperature=temperature, steps=steps)
    frames = (wants_frames, frame_limit(settings, streaming))
    fields = model.kind.order_settings(model.members[0], body, steps, every, frames)
    if model.kind.starts_from_images:
        fields["start_image"], fields["free_mask"] = await _start_image(body, model)
    return order(**fields)
