"""Train a normalizing flow by exact maximum likelihood on dequantized data; report test bits/dim.

Architectures: NICE (Dinh et al. 2014), a RealNVP/Glow-style multiscale flow, and the invertible ResNet
(Behrmann et al. 2019). One loop serves all three.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from training.checkpoint import Checkpoint, ModelConfig, save_checkpoint
from training.data import ImageDataset
from training.ema import ema_update, warmed_up_decay
from training.losses import bits_per_dim, dequantize
from training.models import build_model
from training.models.flows import Flow
from training.models.iresnet import IResNet
from training.run import (
    RunConfig,
    Stopwatch,
    batches,
    load_resume,
    save_resume,
    scheduled_learning_rate,
    set_learning_rate,
    start_run,
    warm_start,
)
from training.sampler_config import FlowSampler, to_dict

# What each architecture uses when a flag is left unset: hidden width, base distribution, and the
# sampling temperature stored in the checkpoint (NICE's paper samples at 0.8, Glow's at 0.7).
# The gradient-norm clip cuts the rare spikes of each architecture's bits/dim gradient (i-ResNet's are the
# largest relative to its typical norm), not the typical step.
ARCH_DEFAULTS: dict[str, dict] = {
    "nice": {"hidden": 1000, "base": "logistic", "temperature": 0.8, "max_grad_norm": 50.0},
    "glow": {"hidden": 128, "base": "gaussian", "temperature": 0.7, "max_grad_norm": 50.0},
    "iresnet": {"hidden": 64, "base": "gaussian", "temperature": 0.8, "max_grad_norm": 10.0},
}


@dataclass
class FlowTrainConfig(RunConfig):
    arch: str = "nice"  # nice | glow (multiscale affine-coupling flow) | iresnet
    out: str = "checkpoints/flow.safetensors"
    epochs: int = 20
    lr: float = 1e-3  # Adam's peak learning rate
    lr_schedule: str = "cosine"  # after warm-up, cosine to min_lr_ratio at --epochs (resume may extend) | constant
    warmup_steps: int = 200  # linear learning-rate warm-up over this many steps
    min_lr_ratio: float = 0.05  # the cosine schedule's final learning rate / peak
    max_grad_norm: float | None = None  # clip the gradient norm (default per arch, ARCH_DEFAULTS; 0: no clipping)
    ema_decay: float = 0.999  # evaluation, grids and the checkpoint's weights use this moving average (0: none)
    hidden: int | None = None  # NICE: units per hidden layer; glow/iresnet: channels (see ARCH_DEFAULTS)
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

    def setting(self, name: str):
        """A flag's value, or the architecture's default when it was left unset."""
        value = getattr(self, name)
        return ARCH_DEFAULTS[self.arch][name] if value is None else value


def _arch(dataset: ImageDataset, config: FlowTrainConfig) -> dict:
    if config.arch not in ARCH_DEFAULTS:
        raise ValueError(f"unknown flow architecture {config.arch!r}; expected one of {', '.join(ARCH_DEFAULTS)}")
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
            "logit_alpha": config.logit_alpha,
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
) -> float:
    """Mean bits/dim of the test set under one fixed dequantization draw."""
    was_training = flow.training
    flow.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    dim = math.prod(test.shape)
    total, count = 0.0, 0
    for index, chunk in enumerate(torch.split(test.images, batch_size)):
        if limit is not None and index >= limit:
            break
        values = bits_per_dim(flow.log_prob(dequantize(chunk).to(device)), dim)
        total += values.sum().item()
        count += len(values)
    torch.set_rng_state(generator_state)
    flow.train(was_training)
    return total / count


def train_flow(config: FlowTrainConfig) -> Path:
    run = start_run(config)
    device, train, test, run_dir, log = run.device, run.train, run.test, run.run_dir, run.log
    assert test is not None  # start_run loads the test split unless asked not to
    arch = _arch(train, config)
    flow = cast(Flow, build_model(arch)).to(device)  # nice, glow and iresnet (ARCH_DEFAULTS) are all Flows
    optimizer = torch.optim.Adam(flow.parameters(), lr=config.lr)
    first_epoch, already = 1, 0.0
    warm_epoch = 0  # epochs of the --init-from checkpoint: the fresh optimizer's schedule counts from there
    average_weights = None
    if config.resume:
        resumed = load_resume(run_dir, {"flow": optimizer})
        flow.load_state_dict(resumed.checkpoint.weights)
        average_weights = resumed.checkpoint.extras.get("ema")  # runs from before the EMA resume without one
        first_epoch = resumed.epoch + 1
        already = float(resumed.checkpoint.config.training["wall_seconds"])
        warm_epoch = int(resumed.checkpoint.config.training.get("warm_start_epoch", 0))
    elif config.init_from:  # a shipped checkpoint's (averaged) weights; its epochs and time count on
        start = warm_start(config.init_from, "flow", arch)
        flow.load_state_dict(start.weights)
        warm_epoch = int(start.config.training.get("epochs_done", 0))
        first_epoch = warm_epoch + 1
        already = float(start.config.training.get("wall_seconds", 0.0))
    else:
        subset = torch.randperm(len(train.images))[:1000]
        flow.initialize(dequantize(train.images[subset]).to(device))  # data-dependent start (ActNorm, NICE's scaling)
    average = copy.deepcopy(flow).eval()
    if average_weights is not None:
        average.load_state_dict(average_weights)
    clock = Stopwatch(already)
    dim = math.prod(train.shape)
    per_epoch = run.batches_per_epoch
    updates = (first_epoch - 1 - warm_epoch) * per_epoch  # optimizer steps since the run (or its warm start) began
    total_updates = (config.epochs - warm_epoch) * per_epoch
    max_grad_norm = config.setting("max_grad_norm")
    out = Path(config.out)
    for epoch in range(first_epoch, config.epochs + 1):
        bar = log.progress(
            batches(len(train.images), config.batch_size, config.max_batches),
            per_epoch,
            f"{config.arch} epoch {epoch}/{config.epochs}",
        )
        total = 0.0
        for index in bar:
            lr = scheduled_learning_rate(
                config.lr, updates, total_updates, config.warmup_steps, config.lr_schedule, config.min_lr_ratio
            )
            set_learning_rate(optimizer, lr)
            loss = bits_per_dim(flow.log_prob(dequantize(train.images[index]).to(device)), dim).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(flow.parameters(), max_grad_norm)
            optimizer.step()
            updates += 1
            ema_update(average, flow, warmed_up_decay(config.ema_decay, updates))
            total += loss.item()
            bar.set_postfix(bits_per_dim=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        if isinstance(average, IResNet):  # averaged weights: the power iteration catches up with them
            average.refresh_spectral_norms()
        record = {
            "train_bits_per_dim": total / max(per_epoch, 1),
            "epoch": epoch,
            "updates": updates,
            "wall_seconds": clock.seconds(),
            "test_bits_per_dim": dataset_bits_per_dim(average, test, 500, device, config.test_batches),
        }
        grid_path = log.grid(average.sample(64, config.setting("temperature")).clamp(-1, 1), epoch, (-1.0, 1.0))
        model_config = ModelConfig(
            family="flow",
            arch=arch,
            data={"shape": list(train.shape), "range": [-1.0, 1.0], "dataset": config.dataset},
            sampler=to_dict(FlowSampler(temperature=config.setting("temperature"), base=config.setting("base"))),
            training=config.training_record(
                "flow",
                device,
                clock.seconds(),
                epoch,
                updates=updates,
                **({"warm_start_epoch": warm_epoch} if warm_epoch else {}),
            ),
            metrics={"test_bits_per_dim": round(record["test_bits_per_dim"], 4)},
        )
        save_checkpoint(out, Checkpoint(model_config, average.state_dict()), config.output_dtype())
        save_resume(run_dir, epoch, model_config, flow.state_dict(), {"flow": optimizer}, {"ema": average.state_dict()})
        log.write(record)
        print(
            f"epoch {epoch}: train {record['train_bits_per_dim']:.4f} test {record['test_bits_per_dim']:.4f} "
            f"bits/dim -> {out} (grid {grid_path})",
            flush=True,
        )
        if run.out_of_time(epoch, config.epochs):
            break
    return out
