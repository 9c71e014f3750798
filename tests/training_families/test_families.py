"""A family is one object: a toy family, defined and registered here, is drawn by the CLI's entry point, described,
refused and routed by the server, and decoded by its one-pass pool, without a line of either changing.

A real new family touches three files: its module in training/families/ (a `Family` subclass like `Decoder` below),
its entry in training/families/__init__.py FAMILIES, and its typed sampler config in
training/sampling/sampler_config.py (a dataclass like `DecoderSampler` and its SAMPLERS entry, from which the file
schema takes the families it samples); serving its exported programs is one more name in
training/runtime/exported.py FAMILIES. This test registers the family and its sampler at run time instead of
editing those two tables.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi import HTTPException
from torch import nn

from service.catalogue.registry import ServedModel
from service.engine.pools.generator import GeneratorPool
from service.engine.pools.latent import pool_name
from service.http.orders import accepted_fields, check_applicable, requested_steps
from service.http.schemas import SampleRequest
from service.metrics import Metrics
from training.families import FAMILIES, draw_samples, family_of
from training.families.base import DrawRequest, Family, Signature
from training.runtime.checkpoint import ModelConfig
from training.runtime.loaded import LoadedModel
from training.sampling.noise import chain_seeds, latent_gaussian
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import SAMPLERS, check_values
from training.sampling.scoring import score_family

LATENT = 4


@dataclasses.dataclass(frozen=True)
class DecoderSampler:
    """One pass of a decoder from z ~ N(0, T^2 I)."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_values(self, {})


class Decoder(Family):
    """The toy family: images decoded from Gaussian latents by one pass of the module."""

    name = stated = "decoder"
    sampler_type = DecoderSampler
    pool = "one_pass"
    one_pass_name = "decoder"

    def describe(self, model: LoadedModel) -> str:
        return "decoder sampled by one pass"

    def signature(self, config: ModelConfig) -> Signature:
        return [("z", [LATENT])]

    def _decode(self, module: nn.Module, seeds: torch.Tensor, scale: Any) -> torch.Tensor:
        device = next(module.parameters()).device
        with torch.no_grad():
            return module((latent_gaussian(seeds, LATENT) * scale).to(device))

    def draw(self, members: list[LoadedModel], request: DrawRequest) -> torch.Tensor:
        model = members[0]
        return self._decode(model.module, request.seeds, model.sampler.temperature).clamp(*model.data_range)

    def start_description(
        self, members: list[LoadedModel], init: str | None, buffer: ReplayBuffer | None, files: list[Path] | None
    ) -> str:
        return "Gaussian latents"

    def override_sampler(self, members, args) -> None:
        pass

    def one_pass(self, model, module, seeds, scale, device, keep_states):
        return self._decode(module, seeds, scale), [], None


def decoder_model() -> LoadedModel:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(LATENT, 4), nn.Tanh(), nn.Unflatten(1, (1, 2, 2))).eval()
    config = ModelConfig(family="decoder", arch={"name": "toy"}, data={"shape": [1, 2, 2]}, sampler={})
    return LoadedModel("toy", config, module, DecoderSampler())


@pytest.fixture
def decoder(monkeypatch) -> LoadedModel:
    monkeypatch.setitem(FAMILIES, "decoder", Decoder())
    monkeypatch.setitem(SAMPLERS, "decoder", DecoderSampler)
    return decoder_model()


def test_a_registered_family_is_the_one_family_of_its_models(decoder) -> None:
    assert family_of(decoder) is FAMILIES["decoder"]
    samples = draw_samples(decoder, chain_seeds(7, 3))
    assert samples.shape == (3, 1, 2, 2)
    assert torch.equal(samples, draw_samples(decoder, chain_seeds(7, 3)))  # seeded: the same images again
    with pytest.raises(ValueError, match="toy is a decoder model; scores exist for EBMs"):
        score_family(decoder)


def test_the_server_describes_refuses_and_routes_it_by_its_family(decoder) -> None:
    served = ServedModel("toy", "decoder", [decoder])
    assert accepted_fields(served) == ["temperature"]
    assert requested_steps(SampleRequest(model="toy"), served) == 1
    assert pool_name(served, served.kind.pool_for(decoder, 1)) == "toy"
    limits = SimpleNamespace(max_n=64, chain_budget=64, max_steps=100, max_frames=10)
    with pytest.raises(HTTPException) as refused:
        check_applicable(SampleRequest(model="toy", steps=5), served, limits)
    assert refused.value.detail == (
        "'steps' applies to EBMs, CNFs and GANs with a critic; toy is an unconditional decoder sampled by one pass, "
        "which takes temperature"
    )
    pool = GeneratorPool(served, 8, 0.0, torch.device("cpu"), Metrics(), lambda: 0.0)
    images, states, bits = pool._decode(chain_seeds(7, 3), torch.ones(3, 1), False)
    assert torch.allclose(images.clamp(-1, 1), draw_samples(decoder, chain_seeds(7, 3)))
    assert states == [] and bits is None
