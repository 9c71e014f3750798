"""The small classifiers whose penultimate features the sample-quality metrics use.

Two architectures, trained independently, so a figure that holds in one's features and not the other's is seen
to depend on the network rather than on the samples (a GAN can fit one feature space).
"""

from __future__ import annotations

import torch
from torch import nn


class DigitClassifier(nn.Module):
    """Two conv blocks with max pooling and a 128-d feature layer; `features` feeds Frechet distance and
    precision/recall."""

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


class StridedClassifier(nn.Module):
    """The second evaluation network, unlike the first in each choice: strided 5x5 and 3x3 convolutions with
    group normalisation and SiLU, no max pooling, no fully connected hidden layer, global average pooling
    to a 96-d feature."""

    def __init__(self, channels: int = 1, classes: int = 10, feature_dim: int = 96) -> None:
        super().__init__()

        def block(inputs: int, outputs: int, kernel: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2), nn.GroupNorm(8, outputs), nn.SiLU()]

        self.body = nn.Sequential(
            *block(channels, 24, 5, 1),  # 28
            *block(24, 48, 3, 2),  # 28 -> 14
            *block(48, 72, 3, 2),  # 14 -> 7
            *block(72, feature_dim, 3, 1),  # 7
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.logits = nn.Linear(feature_dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, 28, 28] -> [B, feature_dim]
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, 28, 28] -> [B, classes]
        return self.logits(self.features(x))


FeatureClassifier = DigitClassifier | StridedClassifier
CLASSIFIER_ARCHITECTURES: dict[str, type[FeatureClassifier]] = {
    "digit_classifier": DigitClassifier,
    "strided_classifier": StridedClassifier,
}
