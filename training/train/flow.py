"""Train a normalizing flow by exact maximum likelihood on dequantized data; report test bits/dim.

Architectures: NICE (Dinh et al. 2014), a RealNVP/Glow-style multiscale flow, and the invertible ResNet
(Behrmann et al. 2019), trained by maximum likelihood; and a continuous normalizing flow (Chen et al. 2018)
whose vector field is trained by flow matching (Lipman et al. 2023) instead (--arch cnf). One loop serves all.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from training.models import build_model
from training.models.flows import Flow, bits_per_dim, dequantize
from training.models.iresnet import IResNet
from training.runtime.checkpoint import Checkpoint
from training.runtime.draw import integrate_cnf
from training.sampling.noise import chain_seeds
from training.sampling.ode import checked_solver
from training.sampling.sampler_config import FlowSampler
from training.train.data import ImageDataset
from training.train.ema import ema_update, warmed_up_decay
from training.train.lifecycle import EpochHooks, EpochSave, TrainingRun
from training.train.losses import flow_matching, optimal_transport_pairing
from training.train.run import (
    RunConfig,
    fixed_noise_loss,
    scheduled_learning_rate,
    set_learning_rate,
    training_autocast,
)

# What each architecture uses when a flag is left unset: hidden width, base distribution, and the
# sampling temperature stored in the checkpoint (NICE's paper samples at 0.8, Glow's at 0.7).
# The gradient-norm clip cuts the rare spikes of each architecture's bits/dim gradient (i-ResNet's are the
# largest relative to its typical norm), not the typical step.
ARCH_DEFAULTS: dict[str, dict] = {
    "nice": {"hidden": 1000, "base": "logistic", "temperature": 0.8, "max_grad_norm": 50.0},
    "glow": {"hidden": 128, "base": "gaussian", "temperature": 0.7, "max_grad_norm": 50.0},
    "iresnet": {"hidden": 64, "base": "gaussian", "temperature": 0.8, "max_grad_norm": 10.0},
    "cnf": {"hidden": 32, "base": "gaussian", "temperature": 1.0, "max_grad_norm": 1.0},
}
LIKELIHOOD_ARCHS = ("nice", "glow", "iresnet")  # trained on their exact log-likelihood; cnf by flow matching


@dataclass
class FlowTrainConfig(RunConfig):
    arch: str = "nice"  # nice | glow (multiscale affine-coupling flow) | iresnet | cnf (flow matching, ODE sampler)
    out: str = "checkpoints/flow.safetensors"
    epochs: int = 20
    lr: float = 1e-3  # Adam's peak learning rate
    lr_schedule: str = "cosine"  # after warm-up, cosine to min_lr_ratio at --epochs (resume may extend) | constant
    warmup_steps: int = 200  # linear learning-rate warm-up over this many steps
    min_lr_ratio: float = 0.05  # the cosine schedule's final learning rate / peak
    max_grad_norm: float | None = None  # clip the gradient norm (default per arch, ARCH_DEFAULTS; 0: no clipping)
    ema_decay: float = 0.999  # evaluation, grids and the checkpoint's weights use this moving average (0: none)
    hidden: int | None = None  # NICE: units per hidden layer; glow/iresnet/cnf: channels (see ARCH_DEFAULTS)
    couplings: int = 4  # NICE: the paper's MNIST model has 4 couplings of 5 x 1000 ReLU units
    depth: int = 5  # NICE: hidden layers per coupling
    levels: int = 2  # glow: squeeze levels (28 -> 14 -> 7 on MNIST), half the channels split off between
    steps: int = 8  # glow: actnorm + 1x1 conv + affine coupling steps per level
    blocks: int = 8  # iresnet: residual blocks
    scales: int = 1  # iresnet: squeezes (28 -> 14 -> 7 on MNIST), the blocks shared evenly among them
    lipschitz: float = 0.9  # iresnet: Lipschitz coefficient of each residual branch (< 1)
    series_terms: int = 5  # iresnet: power-series terms of the log-determinant estimate
    logit_alpha: float = 0.05  # iresnet: logit preprocessing layer (0 turns it off)
    base: str | None = None  # logistic | gaussian (see ARCH_DEFAULTS)
    temperature: float | None = None  # default sampling temperature stored in the checkpoint
    test_batches: int | None = None  # limit the test bits/dim pass (quick runs)
    conditional: bool = False  # cnf: class-conditional field v(x, t, y) with a null label (classifier-free guidance)
    label_dropout: float = 0.1  # cnf --conditional: share of training labels replaced by the null label
    ot_pairing: bool = False  # cnf: pair each batch's prior draws with its data by exact OT (Tong et al. 2023)
    autocast: str = "bfloat16"  # cnf: bfloat16 autocast for the field's network (none: float32); other flows: float32
    sample_steps: int = 20  # cnf: ODE solver steps the checkpoint's sampler declares (and the grids use)
    solver: str = "midpoint"  # cnf: euler | midpoint | heun, the checkpoint's ODE solver
    sample_guidance: float = 1.0  # cnf --conditional: guidance w the checkpoint's sampler declares (1: plain v(x,t,y))
    validate_batches: int = 8  # cnf: test batches of the epoch's validation flow-matching loss

    def setting(self, name: str):
        """A flag's value, or the architecture's default when it was left unset."""
        value = getattr(self, name)
        return ARCH_DEFAULTS[self.arch][name] if value is None else value


def _arch(dataset: ImageDataset, config: FlowTrainConfig) -> dict:
    if config.arch not in ARCH_DEFAULTS:
        raise ValueError(f"unknown flow architecture {config.arch!r}; expected one of {', '.join(ARCH_DEFAULTS)}")
    if config.arch == "cnf":
        classes = len(dataset.classes) if config.conditional else 0
        if len(dataset.shape) == 1:
            return {
                "name": "mlp_velocity",
                "kwargs": {"dim": dataset.shape[0], "hidden": config.setting("hidden"), "num_classes": classes},
            }
        return {
            "name": "unet_velocity",
            "kwargs": {"channels": dataset.shape[0], "width": config.setting("hidden"), "num_classes": classes},
        }
    common = {"shape": list(dataset.shape), "hidden": config.setting("hidden"), "base": config.setting("base")}
    kwargs: dict[str, int | float]
    if config.arch == "nice":
        kwargs = {"couplings": config.couplings, "depth": config.depth}
    elif config.arch == "glow":
        kwargs = {"levels": config.levels, "steps": config.steps}
    else:
        kwargs = {
            "blocks": config.blocks,
            "scales": config.scales,
            "coefficient": config.lipschitz,
            "series_terms": config.series_terms,
            # The logit transform maps 8-bit pixels off [-1, 1]'s edges; 2-D points are not pixels (their
            # i-ResNet trained into NaN weights behind it, which the load probe now refuses).
            "logit_alpha": config.logit_alpha if len(dataset.shape) == 3 else 0.0,
        }
    return {"name": config.arch, "kwargs": common | kwargs}


@torch.no_grad()
def dataset_bits_per_dim(
    flow: Flow,
    test: ImageDataset,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
    seed: int = 0,
    data_range: tuple[float, float] = (-1.0, 1.0),
    uniform: bool = True,
) -> float:
    """Mean bits/dim of the test set (8-bit images in [-1, 1], as datasets load) under one fixed dequantization
    draw, for a flow whose data are in `data_range` (an exported flow's sidecar: the points are mapped there and
    the bins are its 256 levels' widths); `uniform` False scores the images' level values (dequantization none)."""
    was_training = flow.training
    flow.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    dim = math.prod(test.shape)
    total, count = 0.0, 0
    for index, chunk in enumerate(torch.split(test.images, batch_size)):
        if limit is not None and index >= limit:
            break
        points = dequantize(chunk) if uniform else chunk
        if data_range != (-1.0, 1.0):
            points = (points + 1) / 2 * (data_range[1] - data_range[0]) + data_range[0]
        values = bits_per_dim(flow.log_prob(points.to(device)), dim, data_range)
        total += values.sum().item()
        count += len(values)
    torch.set_rng_state(generator_state)
    flow.train(was_training)
    return total / count


# --- The continuous normalizing flow's pieces (--arch cnf) ----------------------------------------


def flow_sampler(config: FlowTrainConfig) -> FlowSampler:
    """What the checkpoint tells every client to run by default: the inverse pass, or for a CNF the ODE from
    the Gaussian prior at std `temperature` with the run's solver, steps and guidance."""
    if config.arch != "cnf":
        return FlowSampler(temperature=config.setting("temperature"), base=config.setting("base"))
    return FlowSampler(
        temperature=config.setting("temperature"),
        base="gaussian",
        steps=config.sample_steps,
        solver=checked_solver(config.solver),
        guidance=config.sample_guidance if config.conditional else 1.0,
        unlabelled="random" if config.conditional else "null",  # a label-less request: a random class per chain
    )


def training_points(images: torch.Tensor) -> torch.Tensor:
    """What a flow is fitted to: 8-bit images uniformly dequantized; continuous 2-D toy points as they are."""
    return images if images.dim() == 2 else dequantize(images)


def cnf_loss(
    model: torch.nn.Module, data: torch.Tensor, labels: torch.Tensor | None, ot_pairing: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow matching on straight paths from N(0, I) to the batch (x0 reordered by minibatch OT if asked)."""
    noise = torch.randn_like(data)
    if ot_pairing:
        noise = optimal_transport_pairing(noise, data)
    t = torch.rand(len(data), device=data.device)
    return flow_matching(lambda x, s: model(x, s, labels), data, noise, t)


@torch.no_grad()
def validate_cnf(
    model: torch.nn.Module, test: ImageDataset, config: FlowTrainConfig, device: torch.device
) -> dict[str, float]:
    """The flow-matching loss of the averaged field on fixed test batches, prior draws and times (comparable
    across epochs)."""

    def loss(images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with training_autocast(config.autocast, device):
            return cnf_loss(model, training_points(images).to(device), labels, False)[0]

    batches = config.validate_batches
    return {"val_flow_matching": fixed_noise_loss(loss, test, config.batch_size, batches, config.conditional, device)}


def cnf_preview(model: torch.nn.Module, config: FlowTrainConfig, shape: tuple[int, ...], classes: int) -> torch.Tensor:
    """64 samples by the checkpoint's own sampler from seeds 0..63 (a row per class when conditional)."""
    seeds = chain_seeds(0, 64)
    labels = (torch.arange(64) // 8) % classes if classes else None
    return integrate_cnf(model, seeds, shape, flow_sampler(config), labels).cpu()


def train_flow(config: FlowTrainConfig) -> Path:
    """Train, writing the checkpoint (averaged weights) and the resume state after every epoch."""
    run = TrainingRun.begin(config, "flow")
    if run is None:
        return Path(config.out)
    device, train, test = run.device, run.train, run.test
    arch = _arch(train, config)
    cnf = config.arch == "cnf"
    model = build_model(arch).to(device)
    classes = int(arch["kwargs"].get("num_classes", 0))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    origin = run.restore(arch, {"flow": optimizer})
    warm_epoch = 0  # epochs of the --init-from checkpoint: the fresh optimizer's schedule counts from there
    average_weights = None
    if origin is not None:  # the online weights of the resume state, or a shipped checkpoint's (averaged) ones
        model.load_state_dict(origin.weights)
        if origin.resumed:
            average_weights = origin.extras.get("ema")  # runs from before the EMA resume without one
            warm_epoch = int(origin.training.get("warm_start_epoch", 0))
        else:
            warm_epoch = origin.epochs_done
    elif not cnf:
        subset = torch.randperm(len(train.images))[:1000]
        cast(Flow, model).initialize(dequantize(train.images[subset]).to(device))  # ActNorm, NICE's scaling
    average = copy.deepcopy(model).eval()
    if average_weights is not None:
        average.load_state_dict(average_weights)
    dim = math.prod(train.shape)
    per_epoch = run.batches_per_epoch
    updates = (run.first_epoch - 1 - warm_epoch) * per_epoch  # optimizer steps since the run (or its warm start) began
    total_updates = (config.epochs - warm_epoch) * per_epoch
    max_grad_norm = config.setting("max_grad_norm")
    loss_name = "flow_matching" if cnf else "bits_per_dim"

    def validate() -> dict[str, float]:
        if cnf:
            return validate_cnf(average, test, config, device)
        return {"test_bits_per_dim": dataset_bits_per_dim(cast(Flow, average), test, 500, device, config.test_batches)}

    def grid() -> torch.Tensor:
        if cnf:
            return cnf_preview(average, config, train.shape, classes).clamp(-1, 1)
        return cast(Flow, average).sample(64, config.setting("temperature")).clamp(-1, 1)

    def save(epoch: int, seconds: float, record: dict[str, float]) -> EpochSave:
        """The average ships; the online weights and the average go into the resume state."""
        figure = "val_flow_matching" if cnf else "test_bits_per_dim"
        metrics = {figure: round(record[figure], 6 if cnf else 4)}
        counted = {"updates": int(record["updates"])} | ({"warm_start_epoch": warm_epoch} if warm_epoch else {})
        sampler = flow_sampler(config)
        model_config = config.model_config("flow", train, arch, sampler, device, seconds, epoch, metrics, counted)
        return EpochSave(
            Checkpoint(model_config, average.state_dict()), model.state_dict(), {"ema": average.state_dict()}
        )

    def summary(record: dict[str, float]) -> str:
        if cnf:
            figure = f"val {record['val_flow_matching']:.4f} flow matching"
        else:
            figure = f"test {record['test_bits_per_dim']:.4f} bits/dim"
        return f"train {record[f'train_{loss_name}']:.4f} {figure}"

    hooks = EpochHooks(save=save, grid=grid, summary=summary, validate=validate)
    for epoch in run.epochs():
        bar = run.batches(epoch, config.arch)
        total = 0.0
        for index in bar:
            lr = scheduled_learning_rate(
                config.lr, updates, total_updates, config.warmup_steps, config.lr_schedule, config.min_lr_ratio
            )
            set_learning_rate(optimizer, lr)
            data = training_points(train.images[index]).to(device)
            if cnf:
                labels = None
                if classes:  # classifier-free training: a share of the labels is the null label
                    labels = train.labels[index].to(device)
                    labels = torch.where(torch.rand(len(index), device=device) < config.label_dropout, -1, labels)
                with training_autocast(config.autocast, device):
                    loss, _ = cnf_loss(model, data, labels, config.ot_pairing)
            else:
                loss = bits_per_dim(cast(Flow, model).log_prob(data), dim).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            updates += 1
            ema_update(average, model, warmed_up_decay(config.ema_decay, updates))
            total += loss.item()
            bar.set_postfix(**{loss_name: f"{loss.item():.4f}"}, lr=f"{lr:.1e}")
        if isinstance(average, IResNet):  # averaged weights: the power iteration catches up with them
            average.refresh_spectral_norms()
        run.end_epoch(epoch, {f"train_{loss_name}": total / max(per_epoch, 1), "updates": updates}, hooks)
    return run.out
