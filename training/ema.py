"""Exponential moving average of weights: the generator that is sampled is the averaged one."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model for parameters; buffers (BN statistics) are copied."""
    for averaged, current in zip(average.parameters(), model.parameters(), strict=True):
        averaged.lerp_(current, 1.0 - decay)
    for averaged, current in zip(average.buffers(), model.buffers(), strict=True):
        averaged.copy_(current)
