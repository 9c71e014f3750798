"""Train a GAN: DCGAN (non-saturating), WGAN with weight clipping, or WGAN-GP, with a generator EMA.

Radford et al. 2016 (DCGAN), Arjovsky et al. 2017 (WGAN), Gulrajani et al. 2017 (WGAN-GP); the
stabilizers (one-sided label smoothing, instance noise, feature matching) are options.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import torch

from training.models import build_model
from training.models.gan import CRITIC_NORMS, ConvCritic, MLPCritic
from training.runtime.checkpoint import Checkpoint
from training.sampling.sampler_config import GANSampler, from_dict
from training.train.data import ImageDataset
from training.train.ema import ema_update, warmed_up_decay
from training.train.lifecycle import EpochHooks, EpochSave, TrainingRun
from training.train.losses import (
    discriminator_loss,
    feature_matching_loss,
    gradient_penalty,
    non_saturating_generator_loss,
    r1_penalty,
    wasserstein_critic_loss,
    wasserstein_generator_loss,
)
from training.train.run import RunConfig, scheduled_learning_rate, set_learning_rate, training_autocast

LOSSES = ("dcgan", "wgan", "wgan-gp")
CLIP_RULES = ("constant", "fan-in")
NETWORKS = ("transposed", "resize")


class LossDefaults(TypedDict):
    optimizer: str  # adam | rmsprop
    lr: float
    betas: tuple[float, float]  # Adam's; unused by RMSprop
    critic_steps: int  # critic updates per generator update


# Per-loss defaults from the papers: optimizer, learning rate, betas, critic steps per generator step.
LOSS_DEFAULTS: dict[str, LossDefaults] = {
    "dcgan": {"optimizer": "adam", "lr": 2e-4, "betas": (0.5, 0.999), "critic_steps": 1},
    "wgan": {"optimizer": "rmsprop", "lr": 5e-5, "betas": (0.0, 0.0), "critic_steps": 5},
    "wgan-gp": {"optimizer": "adam", "lr": 1e-4, "betas": (0.5, 0.9), "critic_steps": 5},
}


@dataclass
class GANTrainConfig(RunConfig):
    loss: str = "dcgan"  # dcgan | wgan | wgan-gp
    out: str = "checkpoints/gan.safetensors"
    batch_size: int = 64
    latent_dim: int = 128  # size of the Gaussian latent the generator maps to an image
    width: int = 64  # channels of the generator's last and the critic's first convolution (doubled in between)
    network: str = "transposed"  # transposed (2 transposed convs, 2-conv critic) | resize (resize+3x3, 3-conv critic)
    lr: float | None = None  # learning rate (default: per loss, LOSS_DEFAULTS)
    optimizer: str | None = None  # adam (betas 0.5, 0.9 where the loss's are RMSprop's) | rmsprop; default per loss
    lr_schedule: str = "constant"  # constant | cosine: to min_lr_ratio of --lr by --epochs, from this run's start
    min_lr_ratio: float = 0.05  # cosine: the last update's learning rate over the peak
    critic_steps: int | None = None  # critic updates per generator update; default per loss
    clip: float = 0.01  # WGAN weight clipping range [-clip, clip] (with --clip-rule fan-in: see there)
    clip_rule: str = "constant"  # constant: all in [-clip, clip]; fan-in: a layer of fan-in n in clip/sqrt(n)
    critic_width: int | None = None  # the critic's first convolution's channels (default: --width)
    critic_norm: str | None = None  # batch | layer | none; default batch for wgan and a DCGAN without R1, else none
    critic_deep_norm: bool = False  # resize network, a critic with a norm: normalize its third conv too
    gp_weight: float = 10.0  # WGAN-GP lambda
    label_smoothing: float = 0.0  # DCGAN one-sided: real targets 1 - s
    r1: float = 0.0  # DCGAN: gamma of the R1 penalty on real data, gamma/2 E||grad D||^2 (0: off)
    instance_noise: float = 0.0  # std of noise on real and fake critic inputs, annealed to 0 over training
    feature_matching: float = 0.0  # weight of the feature-matching term in the generator loss
    ema_decay: float = 0.999  # the shipped generator is this exponential moving average
    autocast: str = "none"  # bfloat16: forward passes in bfloat16 (~1.8x on avx512_bf16 CPUs); none: float32


def _architectures(dataset: ImageDataset, config: GANTrainConfig) -> tuple[dict, dict]:
    if len(dataset.shape) == 1:
        return (
            {"name": "mlp_generator", "kwargs": {"latent_dim": config.latent_dim, "dim": dataset.shape[0]}},
            {"name": "mlp_critic", "kwargs": {"dim": dataset.shape[0]}},
        )
    channels, size, _ = dataset.shape
    resize = config.network == "resize"
    generator = {
        "name": "resize_generator" if resize else "conv_generator",
        "kwargs": {"latent_dim": config.latent_dim, "width": config.width, "channels": channels, "image_size": size},
    }
    critic_kwargs: dict[str, Any] = {
        "width": config.critic_width or config.width,
        "channels": channels,
        "image_size": size,
        "norm": _critic_norm(config),
    }
    if resize:
        critic_kwargs["depth"] = 3
    if config.critic_deep_norm:
        critic_kwargs["deep_norm"] = True
    critic = {"name": "conv_critic", "kwargs": critic_kwargs}
    return generator, critic


def _critic_norm(config: GANTrainConfig) -> str:
    """--critic-norm where given, else the loss's default: batch norm couples a batch's samples, which R1's and
    WGAN-GP's per-sample gradients must not see; the clipped WGAN keeps it, as in Arjovsky et al.'s critic:
    without a norm clipped layers shrink every activation."""
    if config.critic_norm is not None:
        return config.critic_norm
    return "batch" if config.loss == "wgan" or (config.loss == "dcgan" and not config.r1) else "none"


def clip_bounds(critic: torch.nn.Module, clip: float, rule: str) -> list[tuple[torch.nn.Parameter, float]]:
    """Each critic parameter with the bound weight clipping holds it to.

    constant (Arjovsky et al.): every parameter in [-clip, clip]. At clip 0.01 a layer of fan-in n shrinks its
    input by about 0.01 sqrt(n), so deep activations fall to the size of the clipped biases, which then hold
    every unit on one side of its ReLU (a trained MNIST critic's third layer was linear). fan-in: a layer's
    weight and bias in [-clip/sqrt(n), clip/sqrt(n)], so at clip ~1 a layer keeps its input's scale; a norm's
    scale and shift in [-clip, clip]. Either way every convolution and linear layer is K-Lipschitz; a norm layer,
    which divides by its input's spread, is not bounded by clipping (nor was the paper's batch norm).
    """
    if rule == "constant":
        return [(parameter, clip) for parameter in critic.parameters()]
    bounds = []
    for module in critic.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        bound = clip / weight[0].numel() ** 0.5 if weight.dim() > 1 else clip
        bounds += [(parameter, bound) for parameter in module.parameters(recurse=False)]
    return bounds


def _peak_lr(config: GANTrainConfig) -> float:
    return config.lr if config.lr is not None else LOSS_DEFAULTS[config.loss]["lr"]


def _optimizer(parameters: Iterable[torch.nn.Parameter], config: GANTrainConfig) -> torch.optim.Optimizer:
    defaults = LOSS_DEFAULTS[config.loss]
    kind = config.optimizer or defaults["optimizer"]
    if kind == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=_peak_lr(config))
    betas = defaults["betas"] if defaults["optimizer"] == "adam" else LOSS_DEFAULTS["wgan-gp"]["betas"]
    return torch.optim.Adam(parameters, lr=_peak_lr(config), betas=betas)


def train_gan(config: GANTrainConfig) -> Path:
    """Train, writing the checkpoint (EMA generator, raw generator, critic) after every epoch."""
    if config.loss not in LOSSES:
        raise ValueError(f"unknown GAN loss {config.loss!r}; expected one of {', '.join(LOSSES)}")
    if config.network not in NETWORKS:
        raise ValueError(f"unknown GAN network {config.network!r}; expected one of {', '.join(NETWORKS)}")
    training_autocast(config.autocast, torch.device("cpu"))  # a bad --autocast stops before the run begins
    if config.critic_norm not in (None, *CRITIC_NORMS):
        raise ValueError(f"--critic-norm must be one of {', '.join(CRITIC_NORMS)}, not {config.critic_norm!r}")
    if config.critic_norm == "batch" and (config.r1 or config.loss == "wgan-gp"):
        raise ValueError(
            "a gradient penalty is per image, which batch norm couples: --critic-norm layer (per image) or none"
        )
    if config.critic_deep_norm and (config.network != "resize" or _critic_norm(config) == "none"):
        raise ValueError(
            "--critic-deep-norm normalizes the resize critic's third conv: it needs --network resize and a "
            "--critic-norm"
        )
    if config.r1 < 0:
        raise ValueError(f"--r1 is a penalty weight, at least 0, not {config.r1}")
    if config.clip_rule not in CLIP_RULES:
        raise ValueError(f"--clip-rule must be one of {', '.join(CLIP_RULES)}, not {config.clip_rule!r}")
    if config.optimizer not in (None, "adam", "rmsprop"):
        raise ValueError(f"--optimizer must be adam or rmsprop, not {config.optimizer!r}")
    scheduled_learning_rate(1.0, 0, 1, 0, config.lr_schedule, config.min_lr_ratio)  # a bad --lr-schedule stops here
    run = TrainingRun.begin(config, "gan", with_test=False)
    if run is None:
        return Path(config.out)
    device, train = run.device, run.train
    generator_arch, critic_arch = _architectures(train, config)
    generator = build_model(generator_arch).to(device)
    # _architectures names a conv_critic or an mlp_critic, so the module has `features` (feature matching).
    critic = cast(ConvCritic | MLPCritic, build_model(critic_arch)).to(device)
    average = copy.deepcopy(generator).eval()
    generator_optimizer = _optimizer(generator.parameters(), config)
    critic_optimizer = _optimizer(critic.parameters(), config)
    critic_steps = config.critic_steps or LOSS_DEFAULTS[config.loss]["critic_steps"]
    clipped = clip_bounds(critic, config.clip, config.clip_rule) if config.loss == "wgan" else []
    arch = {**generator_arch, "critic": critic_arch}
    origin = run.restore(arch, {"generator": generator_optimizer, "critic": critic_optimizer})
    generator_updates, critic_updates = 0, 0
    sampler = GANSampler(latent_dim=config.latent_dim)  # a continued run keeps the DDLS settings it had
    if origin is not None:  # the generator, its EMA and the critic; the updates count on
        generator.load_state_dict(origin.weights)
        critic.load_state_dict(origin.extras["critic"])
        average.load_state_dict(origin.extras["ema"])
        generator_updates, critic_updates = origin.count("generator_updates"), origin.count("critic_updates")
        sampler = from_dict(GANSampler, origin.checkpoint.config.sampler)
    fixed_latents = torch.randn(64, config.latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
    per_epoch = run.batches_per_epoch
    if per_epoch * config.epochs < critic_steps:
        raise ValueError(
            f"{per_epoch * config.epochs} batches in all cannot make one generator update "
            f"after {critic_steps} critic steps; train longer"
        )
    noise_batches = per_epoch * config.epochs
    schedule_start = critic_updates  # the learning-rate schedule spans this run, a warm start's included
    if origin is not None and origin.resumed:
        noise_batches = origin.count("noise_batches")
        schedule_start = int(origin.training.get("schedule_start", 0))  # runs from before schedules: 0
    schedule_end = max(per_epoch * config.epochs, schedule_start + 1)

    def save(epoch: int, seconds: float, record: dict[str, float]) -> EpochSave:
        """The generator ships with its EMA (what is sampled) and the critic; the resume state holds the same."""
        metrics = {key: round(value, 5) for key, value in record.items() if key.endswith("_loss")}
        counted: dict[str, Any] = {key: int(record[key]) for key in ("generator_updates", "critic_updates")}
        counted |= {"noise_batches": noise_batches, "schedule_start": schedule_start, "loss": config.loss}
        model_config = config.model_config("gan", train, arch, sampler, device, seconds, epoch, metrics, counted)
        extras = {"ema": average.state_dict(), "critic": critic.state_dict()}
        return EpochSave(Checkpoint(model_config, generator.state_dict(), extras), generator.state_dict(), extras)

    @torch.no_grad()
    def grid() -> torch.Tensor:
        return average(fixed_latents)

    def summary(record: dict[str, float]) -> str:
        return f"critic {record['critic_loss']:.4f} generator {record['generator_loss']:.4f}"

    hooks = EpochHooks(save=save, grid=grid, summary=summary)
    for epoch in run.epochs():
        bar = run.batches(epoch, config.loss)
        totals = {"critic_loss": 0.0, "generator_loss": 0.0}
        counts = {"critic_loss": 0, "generator_loss": 0}
        for batch in bar:
            # Instance noise anneals to 0 over `noise_batches` critic steps, fixed by the run's first start.
            noise_std = config.instance_noise * max(0.0, 1.0 - critic_updates / noise_batches)

            def perturb(x: torch.Tensor, std: float = noise_std) -> torch.Tensor:
                return x + std * torch.randn_like(x) if std > 0 else x

            lr = scheduled_learning_rate(
                _peak_lr(config),
                critic_updates - schedule_start,
                schedule_end - schedule_start,
                0,
                config.lr_schedule,
                config.min_lr_ratio,
            )
            for optimizer in (critic_optimizer, generator_optimizer):
                set_learning_rate(optimizer, lr)

            real = train.images[batch].to(device)
            latents = torch.randn(len(real), config.latent_dim, device=device)
            with training_autocast(config.autocast, device):
                fake = generator(latents)
                real_scores, fake_scores = critic(perturb(real)).float(), critic(perturb(fake.detach())).float()
                if config.loss == "dcgan":
                    critic_loss = discriminator_loss(real_scores, fake_scores, config.label_smoothing)
                    if config.r1:
                        critic_loss = critic_loss + r1_penalty(critic, perturb(real), config.r1)
                else:
                    critic_loss = wasserstein_critic_loss(real_scores, fake_scores)
                    if config.loss == "wgan-gp":  # on the same (noised) inputs the critic sees
                        critic_loss = critic_loss + gradient_penalty(
                            critic, perturb(real), perturb(fake.detach()), config.gp_weight
                        )
            critic_optimizer.zero_grad(set_to_none=True)
            critic_loss.backward()
            critic_optimizer.step()
            with torch.no_grad():
                for parameter, bound in clipped:
                    parameter.clamp_(-bound, bound)
            totals["critic_loss"] += critic_loss.item()
            counts["critic_loss"] += 1
            critic_updates += 1
            if critic_updates % critic_steps:
                continue
            with training_autocast(config.autocast, device):
                fake_scores = critic(perturb(fake)).float()
                if config.loss == "dcgan":
                    generator_loss = non_saturating_generator_loss(fake_scores)
                else:
                    generator_loss = wasserstein_generator_loss(fake_scores)
                if config.feature_matching:
                    generator_loss = generator_loss + config.feature_matching * feature_matching_loss(
                        critic.features(perturb(real)).float(), critic.features(perturb(fake)).float()
                    )
            generator_optimizer.zero_grad(set_to_none=True)
            generator_loss.backward()
            generator_optimizer.step()
            ema_update(average, generator, warmed_up_decay(config.ema_decay, generator_updates))
            generator_updates += 1
            totals["generator_loss"] += generator_loss.item()
            counts["generator_loss"] += 1
            bar.set_postfix(critic=f"{critic_loss.item():.3f}", generator=f"{generator_loss.item():.3f}")
        updates = {"generator_updates": generator_updates, "critic_updates": critic_updates}
        run.end_epoch(epoch, {key: totals[key] / max(counts[key], 1) for key in totals} | updates, hooks)
    return run.out
