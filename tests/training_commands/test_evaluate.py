import math

import pytest
import torch

from training.commands.quality import class_coverage, frechet_distance, precision_recall


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    features = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_closed_form_for_shifted_scaled_gaussians() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200000, 3, generator=generator, dtype=torch.float64)
    b = 2.0 * torch.randn(200000, 3, generator=generator, dtype=torch.float64) + 1.0
    # |mu|^2 = 3; trace term per dim: 1 + 4 - 2 * 2 = 1.
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.02)


def test_coverage_is_log2_of_classes_for_uniform_labels_and_zero_for_one_class() -> None:
    assert class_coverage(torch.arange(1000) % 10) == pytest.approx(math.log2(10))
    assert class_coverage(torch.full((50,), 3)) == 0.0


def test_precision_and_recall_separate_quality_from_coverage() -> None:
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 2, generator=generator)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    collapsed = torch.randn(1000, 2, generator=generator) * 0.05  # sharp, but only the centre of the data
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.3
    far = torch.randn(1000, 2, generator=generator) + 10.0
    assert precision_recall(real, far) == (0.0, 0.0)
