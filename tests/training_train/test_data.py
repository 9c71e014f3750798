from pathlib import Path

import numpy as np
import pytest
import torch

from training.train.data import DATA_DIR_ENV, DatasetError, load_dataset, load_idx_images, toy2d, write_idx


def test_idx_images_load_scaled_to_minus_one_one(idx_dir: Path) -> None:
    train = load_idx_images(idx_dir, "train")
    assert train.images.shape == (512, 1, 28, 28)
    assert train.labels.shape == (512,)
    assert train.images.min() >= -1 and train.images.max() == 1
    assert set(train.labels.tolist()) <= set(range(10))


def test_uncompressed_idx_files_are_read_too(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint64).reshape(2, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 7]))
    test = load_idx_images(tmp_path, "test")
    assert test.labels.tolist() == [3, 7]
    restored = ((test.images[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(restored, images.astype(np.uint8))


def test_missing_files_name_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_idx_images(tmp_path, "train")


def test_wrong_magic_number_is_reported(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(5, dtype=np.uint8))  # 1-D: labels magic
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DatasetError, match="magic number 2049, expected 2051"):
        load_idx_images(tmp_path, "train")


def test_truncated_file_is_reported(tmp_path: Path, idx_dir: Path) -> None:
    raw = (idx_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes((idx_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    with pytest.raises(DatasetError, match="t10k-labels"):
        load_idx_images(tmp_path, "test")


def test_data_dir_falls_back_to_environment(idx_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(idx_dir))
    assert len(load_dataset("mnist", None, "test").images) == 256
    monkeypatch.delenv(DATA_DIR_ENV)
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("mnist", None, "test")


@pytest.mark.parametrize("name", ["8gaussians", "checkerboard", "moons", "spirals"])
def test_toy_densities_are_2d_and_bounded(name: str) -> None:
    points = toy2d(name, 2000, torch.Generator().manual_seed(0))
    assert points.shape == (2000, 2)
    assert points.abs().max() < 1.5
    assert points.std(0).min() > 0.1


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(DatasetError, match="mnist"):
        load_dataset("cifar", None, "train")
