"""Model families: each kind of model is one object (training/families/base.py says what each answers), and
`family_of` is the one place that decides which family a loaded model is (`family_stating`, for an exported
program's sidecar before anything is built: a "flow" whose sampler names an ODE solver is a CNF's velocity field).

Adding a family touches three files: its own module here (a `Family` subclass), FAMILIES below, and its typed
sampler config in training/sampling/sampler_config.py (SAMPLERS, from which the file schema takes the families it
samples); serving its exported programs too is one more name in training/runtime/exported.py FAMILIES. The CLI,
the server, export and evaluate ask the family; none of them branches on its name
(tests/training_families/test_families.py).
"""

from __future__ import annotations

import torch

from training.families.base import DrawRequest, Family
from training.families.cnf import CNF
from training.families.energy import ENERGY
from training.families.flow import FLOW
from training.families.gan import GAN
from training.runtime.loaded import LoadedModel
from training.sampling.langevin import StepCallback
from training.sampling.replay_buffer import ReplayBuffer

# By name, in the order a refusal lists the families that read a field; families that share a stated name are
# asked in this order whether a model is theirs (a CNF before the exact-inverse flows).
FAMILIES: dict[str, Family] = {family.name: family for family in (ENERGY, CNF, GAN, FLOW)}


def family_named(stated: str) -> Family:
    """The family a checkpoint's or sidecar's `family` names: what its file, sampler and records follow (the rules
    a CNF shares with the other flows); ValueError for a name no family has."""
    if stated not in FAMILIES:
        raise ValueError(f"sampling {stated} checkpoints is not supported yet")
    return FAMILIES[stated]


def family_stating(stated: str, sampler: object) -> Family:
    """The family of a sidecar that states `stated` with this `sampler`: the first family of that stated name that
    takes it (a "flow" whose sampler names an ODE solver is a CNF's velocity field); ValueError as `family_named`."""
    named = family_named(stated)
    for family in FAMILIES.values():
        if family.stated == stated and isinstance(sampler, dict) and family.states(sampler):
            return family
    return named


def family_of(model: LoadedModel) -> Family:
    """The family of a loaded model: the first of those its file's family names that owns its module."""
    for family in FAMILIES.values():
        if family.stated == model.config.family and family.owns(model):
            return family
    raise ValueError(f"sampling {model.config.family} checkpoints is not supported yet")


def draw_samples(
    model: LoadedModel | list[LoadedModel],
    seeds: torch.Tensor,
    steps: int | None = None,
    init: str | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    labels: torch.Tensor | None = None,
    buffer: ReplayBuffer | None = None,
    chain_steps: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One entry point for every family, used by the `sample` and `evaluate` commands: one sample per
    chain seed [B] (see `training.sampling.noise.chain_seeds`), drawn as the server draws it. `labels` [B] pick
    the class of each chain of a class-conditional model. The steps of chains (Langevin, DDLS, ODE) compute in
    `dtype` (training/runtime/device.py `chain_precision`), one-shot passes in float32, as in the server.

    A list of EBM checkpoints of one ensemble samples as the server samples the ensemble: chains move
    under the members in turn and start from their pooled buffers, or from `buffer` when given (the one
    a server saved: `load_server_buffer`). `generator` draws buffer slots only. For an EBM, `chain_steps` [B],
    when given, is filled with the steps each chain ran (fewer than `steps` where its tolerance stopped it).
    """
    members = model if isinstance(model, list) else [model]
    first = members[0]
    family = family_of(first)
    if len(members) > 1:
        ensembles = {member.config.ensemble for member in members}
        if not family.keeps_buffers or len(ensembles) != 1 or None in ensembles:
            raise ValueError(
                "several checkpoints are sampled together only as EBMs of one declared ensemble; "
                f"got {', '.join(f'{m.name} ({m.config.family}, {m.config.ensemble})' for m in members)}"
            )
    request = DrawRequest(seeds, steps, init, generator, callback, labels, buffer, chain_steps, dtype)
    return family.draw(members, request)
