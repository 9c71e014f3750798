"""Train a time-invariant scalar energy E(x) (or E(x, y)) by Equilibrium Matching: no MCMC in training.

Wang & Du 2025, "Equilibrium Matching" (explicit-energy EqM-E): the input gradient of E is regressed on
(noise - data) c(gamma) at points between noise and data, so plain gradient descent on E from Gaussian
noise draws samples. The served sampler is the project's one Langevin step with noise 0, no clipping and
no clamping, from a Gaussian prior. Called by `python -m training ebm --objective eqm`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from training.models import build_model
from training.runtime.checkpoint import Checkpoint
from training.sampling.langevin import frozen_energy, sample_langevin
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import EBMSampler
from training.train.data import ImageDataset
from training.train.ebm_config import EBMTrainConfig, ebm_model_config
from training.train.ema import ema_update, warmed_up_decay
from training.train.lifecycle import EpochHooks, EpochSave, TrainingRun
from training.train.losses import energy_gap, equilibrium_matching
from training.train.progress import progress
from training.train.run import fixed_noise_loss, scheduled_learning_rate, set_learning_rate, training_autocast


def eqm_arch(dataset: ImageDataset, config: EBMTrainConfig) -> dict[str, Any]:
    classes = len(dataset.classes) if config.conditional else 0
    if len(dataset.shape) == 1:
        return {
            "name": "mlp_field_energy",
            "kwargs": {"dim": dataset.shape[0], "energy_form": config.energy_form, "num_classes": classes},
        }
    return {
        "name": "unet_energy",
        "kwargs": {
            "channels": dataset.shape[0],
            "width": config.setting("width"),
            "energy_form": config.energy_form,
            "num_classes": classes,
        },
    }


def eqm_sampler(config: EBMTrainConfig) -> EBMSampler:
    """Gradient descent from N(0, I): what the checkpoint tells every client to run by default."""
    return EBMSampler(
        steps=config.setting("sample_steps"),
        step_size=config.setting("step_size"),
        noise=config.setting("noise"),
        grad_clip=config.setting("grad_clip"),
        temperature=1.0,
        init="noise",
        prior="gaussian",
        prior_std=config.prior_std,
        unlabelled="random" if config.conditional else "null",  # a label-less request: a random class per chain
        guidance=config.sample_guidance if config.conditional else 1.0,
        momentum=0.0,
        clamp=False,
    )


def learning_rate(config: EBMTrainConfig, update: int, total: int) -> float:
    return scheduled_learning_rate(
        config.setting("lr"), update, total, config.warmup_steps, config.lr_schedule, config.min_lr_ratio
    )


def eqm_loss(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None, config: EBMTrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    noise = torch.randn_like(x) * config.prior_std
    gamma = torch.rand(x.shape[0], device=x.device)
    return equilibrium_matching(
        lambda z: model(z, labels), x, noise, gamma, scale=config.eqm_scale, cutoff=config.eqm_cutoff
    )


# --- The bridge to contrastive divergence (Energy Matching's second phase) ------------------------


def negative_sampler(config: EBMTrainConfig) -> EBMSampler:
    """Short noisy Langevin visits of the persistent chains: the served step size, plus `cd_noise`."""
    return EBMSampler(
        steps=config.setting("steps"),
        step_size=config.setting("step_size"),
        noise=config.cd_noise,
        grad_clip=None,
        clamp=False,
    )


def perturbed(x: torch.Tensor, share: float) -> torch.Tensor:
    """Images [B, *shape] with each value replaced, with probability `share`, by one uniform in [-1, 1]: the
    training data of Ren et al. 2019's background model, which learns the images' low-level statistics but
    not their content (the likelihood-ratio OOD score compares the two models)."""
    if share == 0:
        return x
    replaced = torch.rand_like(x) < share
    return torch.where(replaced, torch.rand_like(x) * 2 - 1, x)


def fill_buffer(
    model: torch.nn.Module, config: EBMTrainConfig, shape: tuple[int, ...], classes: int, device: torch.device
) -> ReplayBuffer:
    """The bridge's persistent chains start as the served sampler's own samples (classes in turn)."""
    capacity = config.setting("buffer_capacity")
    buffer = ReplayBuffer(shape, capacity, restart_prob=0.0)
    generator = torch.Generator().manual_seed(config.seed + 1)
    firsts = range(0, capacity, config.batch_size)
    for first in progress(firsts, len(firsts), f"filling the replay buffer ({capacity} chains)"):
        count = min(config.batch_size, capacity - first)
        labels = (torch.arange(first, first + count) % classes).to(device) if classes else None
        start = (torch.randn(count, *shape, generator=generator) * config.prior_std).to(device)
        with training_autocast(config.autocast, device):
            x = sample_langevin(frozen_energy(model, labels), start, eqm_sampler(config), (-1.0, 1.0), generator)
        buffer.write_back(torch.full((count,), -1), x, labels)
    return buffer


def draw_negatives(
    model: torch.nn.Module, buffer: ReplayBuffer, config: EBMTrainConfig, classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Advance `cd_chains` persistent chains by one short visit under the current weights, and store them back."""
    start, slots = buffer.draw(config.cd_chains)
    labels = buffer.labels[slots.clamp(min=0)].to(device) if classes else None
    with training_autocast(config.autocast, device):
        fake = sample_langevin(frozen_energy(model, labels), start.to(device), negative_sampler(config), (-1.0, 1.0))
    buffer.write_back(slots, fake)
    return fake, labels


def bridge_term(
    model: torch.nn.Module,
    real: torch.Tensor,  # [B, *shape]
    real_labels: torch.Tensor | None,  # [B]
    negatives: tuple[torch.Tensor, torch.Tensor | None],  # [N, *shape], [N]
    eqm: torch.Tensor,  # the EqM loss of this update (its size caps the term's)
    config: EBMTrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """cd_weight * max(0, mean E(real) - mean E(negatives)), scaled down to at most the EqM loss's size.

    As Energy Matching's phase 2 does: the term only acts where the chains found energy lower than the
    data's (the long-run minima that are not digits), and it never outweighs the matching objective.
    """
    fake, fake_labels = negatives
    labels = None if real_labels is None or fake_labels is None else torch.cat([real_labels, fake_labels])
    energies = model(torch.cat([real, fake]), labels).float()  # [B + N]
    gap = energy_gap(energies[: len(real)], energies[len(real) :])
    term = config.cd_weight * gap.clamp(min=0.0)
    if term.item() > eqm.item() > 0:
        term = term * (eqm.detach() / term.detach())
    return term, {"cd": gap.item(), "cd_term": term.item(), "e_real": energies[: len(real)].mean().item()}


def eqm_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,  # [B, *shape] training images
    labels: torch.Tensor | None,  # [B], -1 = null label
    config: EBMTrainConfig,
    lr: float,
    negatives: tuple[torch.Tensor, torch.Tensor | None] | None = None,  # the bridge's [N, *shape], labels [N]
) -> dict[str, float]:
    """One Equilibrium Matching update (plus the bridge's CD term when given negatives): the loss under
    autocast, gradient-norm clipping, one Adam step."""
    set_learning_rate(optimizer, lr)
    with training_autocast(config.autocast, x.device):
        loss, parts = eqm_loss(model, x, labels, config)
        if negatives is not None:
            term, bridge_parts = bridge_term(model, x, labels, negatives, loss, config)
            loss = loss + term
            parts |= bridge_parts
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.max_grad_norm:
        parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
    optimizer.step()
    return parts


def validate_eqm(
    model: torch.nn.Module, test: ImageDataset, config: EBMTrainConfig, device: torch.device
) -> dict[str, float]:
    """The EqM loss of the averaged model on fixed test batches and fixed noise (comparable across epochs)."""

    def loss(images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return eqm_loss(model, images.to(device), labels, config)[0]

    batches = config.validate_batches
    return {"val_eqm": fixed_noise_loss(loss, test, config.batch_size, batches, config.conditional, device)}


def preview(model: torch.nn.Module, config: EBMTrainConfig, shape: tuple[int, ...], classes: int) -> torch.Tensor:
    """64 samples by the checkpoint's own sampler (a row per class for a conditional model) for the grid."""
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    start = (torch.randn(64, *shape, generator=generator) * config.prior_std).to(device)
    labels = (torch.arange(64, device=device) // 8) % classes if classes else None
    return sample_langevin(lambda x: model(x, labels), start, eqm_sampler(config), (-1.0, 1.0), generator).cpu()


def train_eqm(config: EBMTrainConfig) -> Path:
    """Train, writing the checkpoint (averaged weights) and the resume state after every epoch."""
    if not 0 <= config.perturb < 1:
        raise ValueError(f"--perturb is a share of pixels, in [0, 1), not {config.perturb}")
    run = TrainingRun.begin(config, "ebm")
    if run is None:
        return Path(config.out)
    device, train, test = run.device, run.train, run.test
    arch = eqm_arch(train, config)
    model = build_model(arch).to(device)
    classes = int(arch["kwargs"]["num_classes"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.setting("lr"), betas=(0.9, 0.999))
    average = copy.deepcopy(model).requires_grad_(False)
    origin = run.restore(arch, {"model": optimizer})
    updates = 0
    extras: dict[str, dict[str, torch.Tensor]] = {}  # what the run starts from: a warm start's or the resume state's
    if origin is not None:  # the online weights and their average; the updates count on
        if origin.resumed:
            model.load_state_dict(origin.weights)
            average.load_state_dict(origin.extras["ema"])
        else:  # a shipped checkpoint's weights are the average
            model.load_state_dict(origin.extras.get("online", origin.weights))
            average.load_state_dict(origin.weights)
        updates = origin.count("updates")
        extras = origin.extras
    buffer = None  # the bridge's persistent negatives: saved with the run or its warm start, else filled afresh
    if config.cd_weight > 0:
        if "replay_buffer" in extras:
            buffer = ReplayBuffer.from_state_dict(extras["replay_buffer"])
        else:
            buffer = fill_buffer(average, config, train.shape, classes, device)
    total_updates = config.epochs * run.batches_per_epoch

    def save(epoch: int, seconds: float, record: dict[str, float]) -> EpochSave:
        """The average ships with the online weights; a bridge's buffer goes whole (each chain's class with it,
        so the server can start from it), in float16 there and in full in the resume state."""
        metrics = {"val_eqm": round(record["val_eqm"], 6)}
        model_config = ebm_model_config(
            config, train, arch, eqm_sampler(config), device, seconds, epoch, metrics, updates=int(record["updates"])
        )
        kept: dict[str, dict[str, torch.Tensor]] = {}
        resume_extras = {"ema": dict(average.state_dict())}
        if buffer is not None:
            buffer_state = buffer.state_dict()
            kept["replay_buffer"] = buffer_state | {"samples": buffer_state["samples"].half()}
            resume_extras["replay_buffer"] = buffer_state
        shipped = Checkpoint(model_config, dict(average.state_dict()), {"online": dict(model.state_dict())} | kept)
        return EpochSave(shipped, dict(model.state_dict()), resume_extras)

    hooks = EpochHooks(
        save=save,
        grid=lambda: preview(average, config, train.shape, classes),
        summary=lambda record: f"eqm loss {record['loss']:.5f} val {record['val_eqm']:.5f}",
        validate=lambda: validate_eqm(average, test, config, device),
    )
    for epoch in run.epochs():
        bar = run.batches(epoch, "ebm eqm")
        totals: dict[str, float] = {}
        for index in bar:
            x = perturbed(train.images[index].to(device), config.perturb)
            labels = None
            if classes:
                labels = train.labels[index].to(device)
                labels = torch.where(torch.rand(len(index), device=device) < config.label_dropout, -1, labels)
            negatives = draw_negatives(model, buffer, config, classes, device) if buffer is not None else None
            lr = learning_rate(config, updates, total_updates)
            parts = eqm_update(model, optimizer, x, labels, config, lr, negatives)
            updates += 1
            ema_update(average, model, warmed_up_decay(config.ema_decay, updates))
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix(
                loss=f"{parts['loss']:.4f}", lr=f"{lr:.2e}", **({"cd": f"{parts['cd']:.1f}"} if buffer else {})
            )
        figures = {key: value / max(run.batches_per_epoch, 1) for key, value in totals.items()}
        run.end_epoch(epoch, figures | {"updates": updates}, hooks)
    return run.out
