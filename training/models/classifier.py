"""The small MNIST classifier whose penultimate features the sample-quality metrics use."""

from __future__ import annotations

import torch
from torch import nn


class DigitClassifier(nn.Module):
    """Two conv blocks and a 128-d feature layer; `features` feeds Frechet distance and precision/recall."""

    def __init__(self, channels: int = 1, classes: int = 10, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, feature_dim),
            nn.ReLU(),
        )
        self.logits = nn.Linear(feature_dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 28, 28] -> [B, feature_dim]
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 28, 28] -> [B, classes]
        return self.logits(self.features(x))
