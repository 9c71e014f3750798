"""Request -> order: which fields apply to the model, the server's limits, defaults from the checkpoint's
sampler config (training/sampling/sampler_config.py; no default is written here), and uploaded images."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import math
import secrets

import torch
from fastapi import HTTPException

from service.catalogue.registry import ServedModel, runs_ode_chains
from service.engine.messages import SampleOrder
from service.http.schemas import CNF_FIELDS, DDLS_FIELDS, EBM_ONLY_FIELDS, SampleRequest
from service.settings import Settings
from training.runtime.draw import default_latent_steps
from training.runtime.images import decode_image, image_size
from training.sampling.sampler_config import EBMSampler, FlowSampler, GANSampler

UNSTREAMED_FRAMES = 33  # a GIF or JSON body keeps a trajectory to at most this many frames


COMMON_FIELDS = ("model", "n", "seed", "format", "stream")  # what every model reads
CONDITIONAL_FIELDS = ("label", "guidance")  # of these families, only a class-conditional model reads them
READERS = (  # each family's fields beyond COMMON_FIELDS and temperature, for a refusal to name who reads one
    ("EBMs", ("label", *EBM_ONLY_FIELDS)),
    ("CNFs", ("label", *CNF_FIELDS)),
    ("GANs with a critic", DDLS_FIELDS),
)


def accepted_fields(model: ServedModel) -> list[str]:
    """The request fields a model reads beyond COMMON_FIELDS (what /models lists): the Langevin fields for an
    EBM, the DDLS ones for a GAN with a critic, the ODE's for a CNF; temperature for all; label (and guidance)
    for a class-conditional energy or CNF."""
    classes = model.classes is not None
    if model.family == "ebm":
        chain_fields = [name for name in EBM_ONLY_FIELDS if classes or name != "guidance"]
    elif model.family == "gan":
        chain_fields = list(DDLS_FIELDS) if model.members[0].critic is not None else []
    elif runs_ode_chains(model):
        chain_fields = [name for name in CNF_FIELDS if classes or name != "guidance"]
    else:
        chain_fields = []
    return ["temperature", *(["label"] if classes else []), *chain_fields]


def _readers(name: str) -> str:
    """The families that read a field: 'EBMs, CNFs and GANs with a critic', 'class-conditional EBMs and CNFs'."""
    families = [family for family, fields in READERS if name in fields]
    named = families[0] if len(families) == 1 else f"{', '.join(families[:-1])} and {families[-1]}"
    return f"class-conditional {named}" if name in CONDITIONAL_FIELDS else named


def _kind(model: ServedModel) -> str:
    """A model as a refusal describes it: conditional or not, its family, and how it samples."""
    if model.family == "gan" and model.members[0].critic is not None:
        kind = "GAN whose critic refines its latent by DDLS"
    elif model.family == "gan":
        kind = "GAN saved without its critic, sampled by one generator pass"
    elif runs_ode_chains(model):
        kind = "CNF sampled by its ODE"
    elif model.family == "flow":
        kind = "flow sampled by one pass of its inverse"
    else:
        kind = "EBM"
    return f"{'a class-conditional' if model.classes is not None else 'an unconditional'} {kind}"


def _inapplicable(name: str, model: ServedModel) -> str:
    """Why a field does not apply to a model that does not read it: who reads it, and what this model reads."""
    takes = ", ".join(accepted_fields(model))
    return f"'{name}' applies to {_readers(name)}; {model.name} is {_kind(model)}, which takes {takes}"


def check_applicable(body: SampleRequest, model: ServedModel, settings: Settings) -> None:
    """422 for fields that do not apply to the model's family or exceed the server's limits."""
    classes = model.classes
    ode, gan = runs_ode_chains(model), model.family == "gan"
    critic_less = gan and model.members[0].critic is None  # its DDLS fields have a message of their own, below
    accepted = accepted_fields(model)
    problems = [
        _inapplicable(name, model)
        for name in ("label", *EBM_ONLY_FIELDS)
        if name not in accepted and getattr(body, name) is not None and not (critic_less and name in DDLS_FIELDS)
    ]
    if body.label is not None and classes is not None and body.label >= len(classes):
        problems.append(
            f"'label' {body.label} is out of range for {model.name}: 0..{len(classes) - 1} ({', '.join(classes)})"
        )
    if body.init == "buffer" and model.family == "ebm" and not model.has_buffer:
        problems.append(f"init 'buffer' needs a replay buffer; {model.name} was trained without one (use 'noise')")
    if body.init == "buffer" and ode:
        problems.append(
            f"init 'buffer' needs a replay buffer; {model.name} is a CNF, started from its prior (use 'noise')"
        )
    if ode and body.init == "image" and body.mask is None:
        problems.append(
            f"init 'image' for {model.name}, a CNF, completes a masked image: send a 'mask' (white marks the "
            "pixels to fill in)"
        )
    if model.family == "ebm" and body.steps == 0:
        problems.append(f"'steps' is 0; {model.name} is an EBM, whose chains take at least 1 Langevin step")
    if ode and body.steps == 0:
        problems.append(f"'steps' is 0; {model.name} is a CNF, whose ODE takes at least 1 solver step")
    if critic_less:
        asked = [name for name in DDLS_FIELDS if getattr(body, name) is not None and (name != "steps" or body.steps)]
        if asked or requested_steps(body, model):
            problems.append(
                f"{', '.join(repr(name) for name in asked) or 'steps'}: {model.name} was saved without its critic, "
                "so its latents cannot be refined (DDLS runs Langevin steps on ||z||^2/2 - d(G(z)), d the critic); "
                "leave these out or ask for steps 0"
            )
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
    if model.family == "gan":
        return default_latent_steps(model.members[0]) if body.steps is None else body.steps
    if runs_ode_chains(model):
        cnf_steps = model.members[0].sampler_as(FlowSampler).steps
        assert cnf_steps is not None  # a CNF's sampler names its solver and steps together
        return body.steps or cnf_steps
    if model.family != "ebm":
        return 1
    return body.steps or model.members[0].sampler_as(EBMSampler).steps


def frame_limit(settings: Settings, streaming: bool) -> int:
    """Frames a trajectory may have: all allowed when streamed, a GIF or JSON body keeps it smaller."""
    return settings.max_frames if streaming else min(settings.max_frames, UNSTREAMED_FRAMES)


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
    if model.family == "gan" and steps > 0:  # DDLS: Langevin steps on the latent, frames decoded
        ddls = model.members[0].sampler_as(GANSampler)
        return order(
            step_size=_given(body.step_size, ddls.step_size),
            noise=_given(body.noise, ddls.noise),
            trajectory_every=every,
        )
    if runs_ode_chains(model):  # a CNF: ODE chains from its prior (temperature: the prior's scale)
        start_image, free_mask = await _start_image(body, model)
        return order(
            label=body.label,
            guidance=_given(body.guidance, model.members[0].sampler_as(FlowSampler).guidance),
            init=body.init or "noise",
            trajectory_every=every,
            start_image=start_image,
            free_mask=free_mask,
        )
    if model.family != "ebm":  # frames are the states of a flow's inverse, thinned evenly (a GAN has one)
        return order(
            trajectory_every=1 if wants_frames else None,
            max_frames=frame_limit(settings, streaming),
        )
    sampler = model.members[0].sampler_as(EBMSampler)
    start_image, free_mask = await _start_image(body, model)
    return order(
        step_size=_given(body.step_size, sampler.step_size),
        noise=_given(body.noise, sampler.noise),
        momentum=_given(body.momentum, sampler.momentum),
        label=body.label,
        guidance=_given(body.guidance, sampler.guidance),
        tolerance=_given(body.tolerance, sampler.tolerance),
        init=body.init or sampler.init,
        trajectory_every=every,
        start_image=start_image,
        free_mask=free_mask,
    )
