"""The configuration of `python -m training ebm`, shared by its two objectives (contrastive divergence and
Equilibrium Matching), and the one place an EBM checkpoint's model config is assembled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from training.runtime.checkpoint import ModelConfig
from training.sampling.sampler_config import EBMSampler
from training.train.data import ImageDataset
from training.train.run import RunConfig

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
    """One config for both EBM objectives (`--objective`), so `python -m training ebm` keeps one set of flags.

    The shared fields come first and take each objective's default when left unset (OBJECTIVE_DEFAULTS); a
    comment starting `cd:` marks a field only contrastive divergence (ebm_cd.py) reads, `eqm:` one only
    Equilibrium Matching (ebm_eqm.py) reads, and `eqm bridge:` the CD term EqM may add (--cd-weight).
    """

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
    perturb: float = 0.0  # eqm: share of pixels replaced by uniform noise (a background model, Ren et al. 2019)

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
    """What an EBM checkpoint says about itself, for either objective: the ensemble it joins as well."""
    return config.model_config(
        "ebm", dataset, arch, sampler, device, wall_seconds, epoch, metrics, training_extra, config.ensemble
    )
