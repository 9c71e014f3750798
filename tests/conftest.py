"""Fixtures: tiny IDX datasets and tiny checkpoints made on the CPU, so no test needs ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import write_idx

torch.set_num_threads(2)


def make_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fake 28x28 'digits': class k is a bright bar at a class-specific place, plus faint noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.random((n, 28, 28)) * 30).astype(np.uint8)
    for index, label in enumerate(labels):
        row = 3 + 2 * int(label)
        images[index, row : row + 3, 4:24] = 255
    return images, labels


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the four MNIST IDX files (gzip) with 512 train and 256 test images."""
    directory = tmp_path_factory.mktemp("idx")
    for split, (images_name, labels_name), n in (
        ("train", ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"), 512),
        ("test", ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"), 256),
    ):
        images, labels = make_digits(n, seed=0 if split == "train" else 1)
        write_idx(directory / images_name, images)
        write_idx(directory / labels_name, labels)
    return directory
