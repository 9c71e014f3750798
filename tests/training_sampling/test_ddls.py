"""DDLS: Langevin steps on a GAN's latent under E(z) = ||z||^2 / 2 - d(G(z)) (training/sampling/ddls.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import write_gan_whose_critic_likes_bright_images, write_tiny_gan

from training.families import draw_samples
from training.runtime.checkpoint import load_checkpoint, save_checkpoint
from training.runtime.draw import latent_energy, sample_generator
from training.runtime.load import load_model
from training.sampling.ddls import LatentEnergy, refine_latents, start_latents
from training.sampling.noise import chain_seeds


def test_refined_latents_move_where_the_critic_looks_and_their_energy_falls(tmp_path: Path) -> None:
    model = load_model(write_gan_whose_critic_likes_bright_images(tmp_path / "gan.safetensors"))
    energy = latent_energy(model)
    seeds = chain_seeds(3, 32)
    start = start_latents(seeds, 16, 1.0)
    trace: list[float] = []
    refined = refine_latents(
        energy, start, seeds, 40, 0.01, 0.02, 1.0, lambda step, z, e: trace.append(float(e.mean()))
    )
    with torch.no_grad():
        before, after = model.module(start), model.module(refined)
        assert energy(refined).mean() < energy(start).mean() - 10.0
        assert (energy.critic(after) > energy.critic(before)).all()
    brighter = after.mean((1, 2, 3)) > before.mean((1, 2, 3))  # where this critic sees data
    assert brighter.float().mean() > 0.9
    assert trace[-1] < trace[0] and len(trace) == 40


def test_zero_steps_is_the_plain_generator_bit_for_bit(tmp_path: Path) -> None:
    model = load_model(write_tiny_gan(tmp_path / "gan.safetensors"))
    seeds = chain_seeds(5, 6)
    plain = model.module(start_latents(seeds, 16, 0.8))
    assert torch.equal(sample_generator(model, seeds, temperature=0.8, steps=0), plain)
    assert torch.equal(sample_generator(model, seeds, temperature=0.8), plain)  # the checkpoint says 0 steps
    assert not torch.equal(sample_generator(model, seeds, temperature=0.8, steps=2), plain)


def test_seeded_chains_do_not_depend_on_their_batch(tmp_path: Path) -> None:
    model = load_model(write_tiny_gan(tmp_path / "gan.safetensors"))
    energy = latent_energy(model)
    seeds = chain_seeds(9, 8)
    together = refine_latents(energy, start_latents(seeds, 16, 1.0), seeds, 5, 0.05, 0.1, 1.0)
    alone = refine_latents(energy, start_latents(seeds[2:3], 16, 1.0), seeds[2:3], 5, 0.05, 0.1, 1.0)
    assert torch.allclose(together[2:3], alone, atol=1e-5, rtol=0)


def test_a_gan_saved_without_its_critic_says_why_it_cannot_refine(tmp_path: Path) -> None:
    path = write_tiny_gan(tmp_path / "gan.safetensors")
    checkpoint = load_checkpoint(path)
    del checkpoint.extras["critic"]
    save_checkpoint(path, checkpoint)
    model = load_model(path)
    assert model.critic is None
    with pytest.raises(ValueError, match="no critic"):
        sample_generator(model, chain_seeds(0, 2), steps=3)
    assert sample_generator(model, chain_seeds(0, 2), steps=0).shape == (2, 1, 28, 28)
    model.sampler = dataclasses.replace(model.sampler, steps=50)  # a DDLS default it cannot run
    assert torch.equal(sample_generator(model, chain_seeds(0, 2)), sample_generator(model, chain_seeds(0, 2), steps=0))


def test_the_energy_is_the_prior_minus_the_critic_of_the_image() -> None:
    generator = torch.nn.Linear(4, 3)
    critic = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))
    z = torch.randn(5, 4)
    expected = 0.5 * (z**2).sum(1) - critic(generator(z))
    assert torch.allclose(LatentEnergy(generator, critic)(z), expected)


def test_the_checkpoints_step_size_and_noise_are_the_defaults(tmp_path: Path) -> None:
    model = load_model(write_gan_whose_critic_likes_bright_images(tmp_path / "gan.safetensors"))
    seeds = chain_seeds(1, 4)
    sampler = model.sampler
    model.sampler = dataclasses.replace(sampler, step_size=0.02, noise=0.0)  # what `sample --step-size` does
    chosen = sample_generator(model, seeds, steps=3)
    refined = refine_latents(latent_energy(model), start_latents(seeds, 16, 1.0), seeds, 3, 0.02, 0.0, 1.0)
    with torch.no_grad():
        assert torch.equal(chosen, model.module(refined))
    assert torch.equal(draw_samples(model, seeds, steps=3), chosen.clamp(-1, 1))  # `sample`'s entry point
