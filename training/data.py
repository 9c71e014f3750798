"""Datasets: official IDX files read from a directory the user names, and 2-D toy densities.

Nothing is ever downloaded: the IDX loader reads `.gz` or uncompressed files that are already on disk
and fails with a message that names the files it expected.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_DIR_ENV = "SAMPLEBAY_DATA_DIR"
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TOY2D_NAMES = ("8gaussians", "checkerboard", "moons", "spirals", "gaussian")


class DatasetError(ValueError):
    """A dataset could not be found or read; the message says which file and what was expected."""


@dataclass(frozen=True)
class ImageDataset:
    """Images scaled to [-1, 1] with shape [N, 1, H, W], and integer labels [N]."""

    images: torch.Tensor  # [N, 1, 28, 28] float32 in [-1, 1]
    labels: torch.Tensor  # [N] int64
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def classes(self) -> list[str]:
        """Class names, index = label (digits for MNIST-format data)."""
        return [str(label) for label in range(int(self.labels.max()) + 1 if len(self.labels) else 0)]


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The directory named on the command line, else $SAMPLEBAY_DATA_DIR."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise DatasetError(f"no data directory given: pass --data-dir DIR or set ${DATA_DIR_ENV}")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DatasetError(f"data directory {path} does not exist")
    return path


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem, directory / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{directory} has no {stem}.gz (or uncompressed {stem}); official MNIST IDX files expected")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path} could not be read: {error}") from error
    if len(raw) < 8:
        raise DatasetError(f"{path} is too short to be an IDX file")
    found_magic = struct.unpack(">I", raw[:4])[0]
    if found_magic != magic:
        raise DatasetError(f"{path} has IDX magic number {found_magic}, expected {magic}")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    expected = math.prod(dims)
    if len(body) != expected:
        raise DatasetError(f"{path} header says {dims} ({expected} bytes) but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_idx_images(data_dir: str | os.PathLike | None, split: str = "train") -> ImageDataset:
    """Read MNIST-format IDX images and labels for `split` ('train' or 'test') from a directory."""
    if split not in IDX_FILES:
        raise DatasetError(f"unknown split {split!r}; expected one of {sorted(IDX_FILES)}")
    directory = resolve_data_dir(data_dir)
    images_stem, labels_stem = IDX_FILES[split]
    pixels = _read_idx(_find_idx(directory, images_stem), IDX_IMAGES_MAGIC)  # [N, H, W] uint8
    labels = _read_idx(_find_idx(directory, labels_stem), IDX_LABELS_MAGIC)  # [N] uint8
    if pixels.shape[0] != labels.shape[0]:
        raise DatasetError(f"{directory}: {pixels.shape[0]} {split} images but {labels.shape[0]} labels")
    images = torch.from_numpy(pixels.copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    return ImageDataset(images=images, labels=torch.from_numpy(labels.astype(np.int64)), name=f"idx:{split}")


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz); tests make tiny data with it."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    # Magic: two zero bytes, type 0x08 (unsigned byte), then the number of dimensions.
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(payload)


def toy2d(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample `n` points [n, 2] of a classic 2-D density, scaled to roughly [-1, 1]."""
    return toy2d_labelled(name, n, generator)[0]


def toy2d_labelled(name: str, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Points [n, 2] and labels [n]: the mode index for '8gaussians' (a class-conditional toy), else 0."""
    g = generator
    if name == "8gaussians":
        modes = torch.randint(0, 8, (n,), generator=g)
        angles = modes.float() * (math.pi / 4)
        centers = torch.stack([angles.cos(), angles.sin()], dim=1) * 0.75
        return centers + 0.05 * torch.randn(n, 2, generator=g), modes
    return _toy2d_points(name, n, g), torch.zeros(n, dtype=torch.int64)


def _toy2d_points(name: str, n: int, g: torch.Generator | None) -> torch.Tensor:
    if name == "gaussian":  # one elongated, off-centre Gaussian: its moments are the whole story
        return torch.randn(n, 2, generator=g) * torch.tensor([0.3, 0.1]) + torch.tensor([0.4, -0.3])
    if name == "checkerboard":
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
        x2 = x2 + (x1.floor() % 2)
        return torch.stack([x1, x2], dim=1) / 2.2
    if name == "moons":
        t = torch.rand(n, generator=g) * math.pi
        upper = torch.rand(n, generator=g) < 0.5
        x = torch.where(upper, t.cos(), 1 - t.cos())
        y = torch.where(upper, t.sin(), 0.5 - t.sin())
        points = torch.stack([x - 0.5, y - 0.25], dim=1) * 0.75
        return points + 0.03 * torch.randn(n, 2, generator=g)
    if name == "spirals":
        t = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        points = sign.unsqueeze(1) * torch.stack([t * t.cos(), t * t.sin()], dim=1) / (3 * math.pi)
        return points * 0.9 + 0.02 * torch.randn(n, 2, generator=g)
    raise DatasetError(f"unknown toy2d density {name!r}; expected one of {', '.join(TOY2D_NAMES)}")


def load_dataset(
    name: str, data_dir: str | os.PathLike | None, split: str, toy_size: int = 20000, seed: int = 0
) -> ImageDataset:
    """One entry point for the CLI: 'mnist' (or any MNIST-format IDX set) and 'toy2d:<density>'."""
    if name in ("mnist", "fashion-mnist", "idx"):
        dataset = load_idx_images(data_dir, split)
        return ImageDataset(dataset.images, dataset.labels, name=name)
    if name.startswith("toy2d"):
        density = name.partition(":")[2] or "8gaussians"
        generator = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
        points, labels = toy2d_labelled(density, toy_size, generator)
        return ImageDataset(points, labels, name=f"toy2d:{density}")
    raise DatasetError(f"unknown dataset {name!r}; expected 'mnist' or 'toy2d:<{'|'.join(TOY2D_NAMES)}>'")
