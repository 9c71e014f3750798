"""Train an energy-based model by contrastive divergence with Langevin negatives and a replay buffer.

Du & Mordatch 2019, "Implicit Generation and Generalization in Energy-Based Models"; defaults from the
UvA deep-EBM tutorial on MNIST.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.models import build_model
from training.runtime.checkpoint import Checkpoint
from training.sampling.langevin import EnergyFn, frozen_energy, sample_langevin
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import EBMSampler
from training.train.data import ImageDataset
from training.train.ebm_config import EBMTrainConfig, ebm_model_config
from training.train.ebm_eqm import train_eqm
from training.train.lifecycle import EpochHooks, EpochSave, TrainingRun
from training.train.losses import contrastive_divergence


def _arch_for(dataset: ImageDataset, config: EBMTrainConfig) -> dict:
    if len(dataset.shape) == 1:
        return {"name": "mlp_energy", "kwargs": {"dim": dataset.shape[0], "spectral": config.spectral}}
    channels, size, _ = dataset.shape
    return {
        "name": "conv_energy",
        "kwargs": {
            "channels": channels,
            "image_size": size,
            "width": config.setting("width"),
            "spectral": config.spectral,
        },
    }


def cd_sampler(config: EBMTrainConfig) -> EBMSampler:
    """Langevin from the replay buffer with the settings the model was trained with."""
    return EBMSampler(
        steps=config.setting("sample_steps"),
        train_steps=config.setting("steps"),
        step_size=config.setting("step_size"),
        noise=config.setting("noise"),
        grad_clip=config.setting("grad_clip"),
        init="buffer",
        restart_prob=config.restart_prob,
    )


@torch.no_grad()
def validate(model: torch.nn.Module, test: ImageDataset, batch_size: int, limit: int, device: torch.device) -> dict:
    """The seed's check: energy of test images vs uniform noise (negative gap = data is more likely)."""
    model.eval()
    real, noise = [], []
    for index, chunk in enumerate(torch.split(test.images, batch_size)):
        if index >= limit:
            break
        chunk = chunk.to(device)
        real.append(model(chunk))
        noise.append(model(torch.rand_like(chunk) * 2 - 1))
    model.train()
    e_real, e_noise = torch.cat(real).mean().item(), torch.cat(noise).mean().item()
    return {"val_e_test": e_real, "val_e_noise": e_noise, "val_cd": e_real - e_noise}


def cd_update(
    model: torch.nn.Module,
    energy: EnergyFn,
    optimizer: torch.optim.Optimizer,
    buffer: ReplayBuffer,
    real: torch.Tensor,  # [B, *shape] training images
    langevin: EBMSampler,
    config: EBMTrainConfig,
) -> dict[str, float]:
    """One contrastive-divergence update: Langevin negatives from the replay buffer, then one Adam step."""
    real = (real + config.real_noise * torch.randn_like(real)).clamp_(-1, 1)
    start, slots = buffer.draw(len(real))
    fake = sample_langevin(energy, start.to(real.device), langevin, (-1.0, 1.0))
    buffer.write_back(slots, fake)
    energies = model(torch.cat([real, fake]))  # [2B]
    energy_real, energy_fake = energies.chunk(2)  # [B], [B]
    loss, parts = contrastive_divergence(energy_real, energy_fake, alpha=config.alpha)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return parts


def train_ebm(config: EBMTrainConfig) -> Path:
    """Train, writing the checkpoint after every epoch; returns its path."""
    config.setting("lr")  # an unknown --objective fails here, before any data is read
    if config.objective == "eqm":
        return train_eqm(config)
    run = TrainingRun.begin(config, "ebm")
    if run is None:
        return Path(config.out)
    device, train, test = run.device, run.train, run.test
    arch = _arch_for(train, config)
    model = build_model(arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.setting("lr"), betas=(config.beta1, 0.999))
    buffer = ReplayBuffer(train.shape, config.setting("buffer_capacity"), config.restart_prob)
    langevin = EBMSampler(
        steps=config.setting("steps"),
        step_size=config.setting("step_size"),
        noise=config.setting("noise"),
        grad_clip=config.setting("grad_clip"),
    )
    origin = run.restore(arch, {"model": optimizer})
    if origin is not None:  # the weights and replay buffer of the resume state or of a shipped checkpoint
        model.load_state_dict(origin.weights)
        buffer_state = origin.extras["replay_buffer"]
        if origin.resumed:
            for group in optimizer.param_groups:  # the command line wins over the saved hyperparameters
                group.update(lr=config.setting("lr"), betas=(config.beta1, 0.999))
        else:  # a shipped buffer takes this run's capacity and restart rate
            buffer_state = buffer_state | {
                "capacity": torch.tensor(config.setting("buffer_capacity")),
                "restart_prob": torch.tensor(config.restart_prob),
            }
        buffer = ReplayBuffer.from_state_dict(buffer_state)

    def save(epoch: int, seconds: float, record: dict[str, float]) -> EpochSave:
        """The model and the newest `keep_buffer` chains in float16 ship; the resume state keeps the whole buffer."""
        metrics = {key: round(value, 5) for key, value in record.items() if key.startswith("val_")}
        model_config = ebm_model_config(config, train, arch, cd_sampler(config), device, seconds, epoch, metrics)
        weights = dict(model.state_dict())
        shipped = buffer.state_dict()
        shipped["samples"] = shipped["samples"][len(buffer) - min(config.keep_buffer, len(buffer)) :].half()
        checkpoint = Checkpoint(model_config, weights, {"replay_buffer": shipped})
        return EpochSave(checkpoint, weights, {"replay_buffer": buffer.state_dict()})

    hooks = EpochHooks(
        save=save,
        grid=lambda: buffer.samples[max(0, len(buffer) - 64) : len(buffer)],
        summary=lambda record: f"loss {record.get('loss', float('nan')):.4f} val_cd {record['val_cd']:.4f}",
        validate=lambda: validate(model, test, config.batch_size, config.validate_batches, device),
    )
    energy = frozen_energy(model)
    for epoch in run.epochs():
        bar = run.batches(epoch, "ebm")
        totals: dict[str, float] = {}
        for index in bar:
            parts = cd_update(model, energy, optimizer, buffer, train.images[index].to(device), langevin, config)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix(
                loss=f"{parts['loss']:.3f}", e_real=f"{parts['e_real']:.3f}", e_fake=f"{parts['e_fake']:.3f}"
            )
        run.end_epoch(epoch, {key: value / max(run.batches_per_epoch, 1) for key, value in totals.items()}, hooks)
    return run.out
