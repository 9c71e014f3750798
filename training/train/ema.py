"""Exponential moving average of weights: the generator that is sampled is the averaged one."""

from __future__ import annotations

import torch
from torch import nn


def warmed_up_decay(decay: float, updates: int) -> float:
    """min(decay, (1 + t) / (10 + t)): early on the average follows the model closely, so a short run
    never serves a generator that still carries much of its random initialization."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model, for parameters and floating buffers (BN statistics,
    so the averaged weights run with statistics averaged the same way); integer buffers are copied."""
    for averaged, current in zip(average.parameters(), model.parameters(), strict=True):
        averaged.lerp_(current, 1.0 - decay)
    for averaged_buffer, current_buffer in zip(average.buffers(), model.buffers(), strict=True):
        if averaged_buffer.is_floating_point():
            averaged_buffer.lerp_(current_buffer, 1.0 - decay)
        else:
            averaged_buffer.copy_(current_buffer)
