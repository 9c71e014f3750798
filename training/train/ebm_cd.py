"""Train an energy-based model by contrastive divergence with Langevin negatives and a replay buffer.

Du & Mordatch 2019, "Implicit Generation and Generalization in Energy-Based Models"; defaults from the
UvA deep-EBM tutorial on MNIST.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.models import build_model
from training.runtime.checkpoint import Checkpoint, ModelConfig, save_checkpoint
from training.sampling.langevin import EnergyFn, ReplayBuffer, frozen_energy, sample_langevin
from training.sampling.sampler_config import EBMSampler, to_dict
from training.train.data import ImageDataset
from training.train.losses import contrastive_divergence
from training.train.run import RunConfig, Stopwatch, batches, load_resume, save_resume, start_run, warm_start

# What each objective uses when a flag is left unset (None). CD: the UvA deep-EBM tutorial on MNIST.
# EqM: gradient descent from Gaussian noise; 40-60 steps of 0.01 suffice (../shared/notes, measured).
# The EqM bridge (--cd-weight > 0) runs short persistent chains (10 steps a visit) in a small buffer.
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cd": dict(
        lr=1e-4, width=32, step_size=10.0, noise=0.005, grad_clip=0.03, sample_steps=256, steps=60, buffer_capacity=8192
    ),
    "eqm": dict(
        lr=5e-4, width=16, step_size=0.01, noise=0.0, grad_clip=None, sample_steps=60, steps=10, buffer_capacity=1000
    ),
}


@dataclass
class EBMTrainConfig(RunConfig):
    objective: str = "cd"  # cd: contrastive divergence with Langevin negatives | eqm: Equilibrium Matching
    out: str = "checkpoints/ebm.safetensors"
    epochs: int = 20
    lr: float | None = None  # Adam learning rate (default: cd 1e-4, eqm 5e-4)
    beta1: float = 0.0  # cd: Adam beta1 = 0 as in the UvA tutorial (momentum fights the moving negatives)
    alpha: float = 0.1  # cd: weight of the squared-energy regularizer
    real_noise: float = 0.005  # cd: std of Gaussian noise added to real images
    steps: int | None = None  # Langevin steps of the negatives per training iteration (default: cd 60, eqm bridge 10)
    step_size: float | None = None  # sampler step size (default: cd 10, eqm 0.01)
    noise: float | None = None  # sampler noise std (default: cd 0.005, eqm 0 = gradient descent)
    grad_clip: float | None = None  # sampler elementwise gradient clip, 0 = none (default: cd 0.03, eqm none)
    sample_steps: int | None = None  # default chain length of the checkpoint's sampler (cd 256, eqm 60)
    buffer_capacity: int | None = None  # replay-buffer size (default: cd 8192, eqm bridge 1000)
    restart_prob: float = 0.05  # cd: fraction of chains restarted from uniform noise
    keep_buffer: int = 2048  # cd: buffer samples stored in the shipped checkpoint (float16)
    width: int | None = None  # channels of the first layer (default: cd conv net 32, eqm U-Net 16)
    spectral: bool = False  # cd: spectral normalization on every layer (IGEBM)
    ensemble: str | None = None  # EBMs naming one ensemble share one replay buffer when served
    validate_batches: int = 20  # test batches in the per-epoch validation
    energy_form: str = "dot"  # eqm: scalar energy from the U-Net field f: dot <x, f(x)> | l2 -||f(x)||^2/2
    eqm_scale: float = 4.0  # eqm: c(gamma) = scale * min(1, (1 - gamma) / cutoff), the target's size
    eqm_cutoff: float = 0.2  # eqm: see eqm_scale
    prior_std: float = 1.0  # eqm: std of the Gaussian noise chains start from (and training mixes with)
    conditional: bool = False  # eqm: class-conditional energy E(x, y) with a null label for unconditional use
    label_dropout: float = 0.1  # eqm: share of training labels replaced by the null label
    sample_guidance: float = 1.25  # eqm --conditional: guidance w the checkpoint's sampler declares (1: plain E(x, y))
    ema_decay: float = 0.999  # eqm: the checkpoint's weights are this exponential moving average
    autocast: str = "bfloat16"  # eqm: bfloat16 autocast for the network (none: float32 throughout)
    lr_schedule: str = "cosine"  # eqm: after warm-up, cosine to min_lr_ratio at --epochs (resume may extend) | constant
    warmup_steps: int = 200  # eqm: linear learning-rate warm-up
    min_lr_ratio: float = 0.1  # eqm: the cosine schedule's final learning rate / peak
    max_grad_norm: float | None = 1.0  # eqm: clip the parameter-gradient norm (0 or none: no clipping)
    cd_weight: float = 0.0  # eqm: weight of a contrastive-divergence term on replay-buffer negatives (0: plain EqM)
    cd_noise: float = 0.01  # eqm bridge: noise std of the negatives' Langevin steps (step size: --step-size)
    cd_chains: int = 64  # eqm bridge: negatives drawn from the replay buffer per update

    def setting(self, name: str) -> Any:
        """A flag's value, or the objective's default when it was left unset."""
        if self.objective not in OBJECTIVE_DEFAULTS:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVE_DEFAULTS)}, not {self.objective!r}")
        value = getattr(self, name)
        if value is None:
            return OBJECTIVE_DEFAULTS[self.objective][name]
        if name == "grad_clip" and value <= 0:
            return None
        return value


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


def ebm_model_config(
    config: EBMTrainConfig,
    dataset: ImageDataset,
    arch: dict,
    sampler: EBMSampler,
    device: torch.device,
    wall_seconds: float,
    epoch: int,
    metrics: dict,
    **training_extra: Any,
) -> ModelConfig:
    """What an EBM checkpoint says about itself, for either objective; a conditional one lists its classes."""
    data: dict[str, Any] = {"shape": list(dataset.shape), "range": [-1.0, 1.0], "dataset": config.dataset}
    if arch["kwargs"].get("num_classes"):
        data["classes"] = dataset.classes
    return ModelConfig(
        family="ebm",
        arch=arch,
        data=data,
        sampler=to_dict(sampler),
        training=config.training_record("ebm", device, wall_seconds, epoch, **training_extra),
        metrics=metrics,
        ensemble=config.ensemble,
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
        from training.train.ebm_eqm import train_eqm

        return train_eqm(config)
    run = start_run(config)
    device, train, test, run_dir, log = run.device, run.train, run.test, run.run_dir, run.log
    assert test is not None  # start_run loads the test split unless asked not to
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
    first_epoch, already = 1, 0.0
    if config.resume:
        resumed = load_resume(run_dir, {"model": optimizer})
        for group in optimizer.param_groups:  # the command line wins over the saved hyperparameters
            group.update(lr=config.setting("lr"), betas=(config.beta1, 0.999))
        model.load_state_dict(resumed.checkpoint.weights)
        buffer = ReplayBuffer.from_state_dict(resumed.checkpoint.extras["replay_buffer"])
        first_epoch = resumed.epoch + 1
        already = float(resumed.checkpoint.config.training["wall_seconds"])
    elif config.init_from:  # weights and replay buffer of a shipped checkpoint; its epochs and time count on
        start = warm_start(config.init_from, "ebm", arch)
        model.load_state_dict(start.weights)
        buffer = ReplayBuffer.from_state_dict(
            start.extras["replay_buffer"]
            | {
                "capacity": torch.tensor(config.setting("buffer_capacity")),
                "restart_prob": torch.tensor(config.restart_prob),
            }
        )
        first_epoch = int(start.config.training.get("epochs_done", 0)) + 1
        already = float(start.config.training.get("wall_seconds", 0.0))
    clock = Stopwatch(already)
    energy = frozen_energy(model)
    steps_per_epoch = run.batches_per_epoch
    out = Path(config.out)
    for epoch in range(first_epoch, config.epochs + 1):
        bar = log.progress(
            batches(len(train.images), config.batch_size, config.max_batches),
            steps_per_epoch,
            f"ebm epoch {epoch}/{config.epochs}",
        )
        totals: dict[str, float] = {}
        for index in bar:
            parts = cd_update(model, energy, optimizer, buffer, train.images[index].to(device), langevin, config)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix(
                loss=f"{parts['loss']:.3f}", e_real=f"{parts['e_real']:.3f}", e_fake=f"{parts['e_fake']:.3f}"
            )
        record = {key: value / max(steps_per_epoch, 1) for key, value in totals.items()}
        record.update(validate(model, test, config.batch_size, config.validate_batches, device))
        record.update(epoch=epoch, wall_seconds=clock.seconds())
        grid_path = log.grid(buffer.samples[max(0, len(buffer) - 64) : len(buffer)], epoch, (-1.0, 1.0))
        metrics = {key: round(value, 5) for key, value in record.items() if key.startswith("val_")}
        model_config = ebm_model_config(
            config, train, arch, cd_sampler(config), device, clock.seconds(), epoch, metrics
        )
        weights = {name: tensor for name, tensor in model.state_dict().items()}
        shipped_state = buffer.state_dict()
        shipped_state["samples"] = shipped_state["samples"][len(buffer) - min(config.keep_buffer, len(buffer)) :].half()
        save_checkpoint(out, Checkpoint(model_config, weights, {"replay_buffer": shipped_state}), config.output_dtype())
        save_resume(run_dir, epoch, model_config, weights, {"model": optimizer}, {"replay_buffer": buffer.state_dict()})
        log.write(record)  # after the resume state: a crash in between never logs an epoch twice
        print(
            f"epoch {epoch}: loss {record.get('loss', float('nan')):.4f} val_cd {record['val_cd']:.4f} "
            f"-> {out} (grid {grid_path})",
            flush=True,
        )
        if run.out_of_time(epoch, config.epochs):
            break
    return out
