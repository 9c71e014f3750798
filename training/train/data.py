"""Datasets: official IDX files read from a directory the user names, image folders in the torchvision
ImageFolder layout, and 2-D toy densities.

Nothing is ever downloaded: the IDX loader reads `.gz` or uncompressed files that are already on disk
and fails with a message that names the files it expected (`fetch-data` downloads them).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from training.train.progress import progress

DATA_DIR_ENV = "SAMPLEBAY_DATA_DIR"
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TOY2D_NAMES = ("8gaussians", "checkerboard", "moons", "spirals", "gaussian")
# What torchvision's ImageFolder reads, less the rare formats; other files in a class folder are skipped.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
COLOUR_IMAGE_SIZE = 32  # --image-size when not given (a folder of 28x28 grey images keeps 28, like MNIST)
IMAGE_SIZE_RANGE = (4, 1024)  # sides --image-size accepts (the server refuses samples over 3 x 1024 x 1024)


# Zalando's label order (github.com/zalandoresearch/fashion-mnist, "Labels"): what a request's label means.
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class DatasetError(ValueError):
    """A dataset could not be found or read; the message says which file and what was expected."""


@dataclass(frozen=True)
class ImageDataset:
    """Images scaled to [-1, 1] with shape [N, C, H, W] (or 2-D points [N, 2]), and integer labels [N]."""

    images: torch.Tensor  # [N, C, H, W] float32 in [-1, 1]: [N, 1, 28, 28] for MNIST
    labels: torch.Tensor  # [N] int64
    name: str
    class_names: tuple[str, ...] | None = None  # an image folder's class subfolders, index = label

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def classes(self) -> list[str]:
        """Class names, index = label: an image folder's subfolders, digits for MNIST-format data."""
        if self.class_names is not None:
            return list(self.class_names)
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


# --- Image folders: torchvision's ImageFolder layout, D/train/<class>/*.png and D/test/<class>/* ---------------


class FileNotes:
    """One warning line on stderr per skipped or converted file, at most `limit` of each kind; `close` sums up
    the rest in a line per kind, so that a folder of 50,000 palette PNGs does not bury the training log."""

    def __init__(self, limit: int = 10, emit: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self.emit = emit or _write_warning
        self.counts: dict[str, int] = {}

    def __call__(self, path: Path, kind: str, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= self.limit:
            self.emit(f"warning: {path}: {kind}{detail}")

    def close(self) -> None:
        for kind, count in self.counts.items():
            if count > self.limit:
                self.emit(f"warning: {count - self.limit} more files: {kind} (the first {self.limit} are named above)")
        self.counts = {}


def _write_warning(line: str) -> None:
    tqdm.write(line, file=sys.stderr)  # above a progress bar on a terminal, a plain line elsewhere


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _scan_split(split_dir: Path) -> tuple[list[str], list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Class subfolder names (sorted), (image file, class name) pairs in a fixed order, and (skipped file, why).
    Class folders may nest subfolders (as ImageFolder allows); hidden files and folders are ignored."""
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    files: list[tuple[Path, str]] = []
    skipped = [
        (entry, "skipped, not inside a class folder")
        for entry in sorted(split_dir.iterdir())
        if entry.is_file() and not entry.name.startswith(".")
    ]
    for name in classes:
        for path in sorted((split_dir / name).rglob("*")):
            if not path.is_file() or _hidden(path, split_dir):
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((path, name))
            else:
                skipped.append((path, f"skipped, not an image file (reads {' '.join(IMAGE_EXTENSIONS)})"))
    return classes, files, skipped


def _in_colour(image: Image.Image) -> bool:
    """Whether an opened image is stored in colour: RGB-like modes, or a palette with a colour entry. Grey,
    bilevel, 16-bit and 32-bit images and grey palettes are not."""
    if image.mode in ("P", "PA"):
        palette = np.array(image.getpalette() or [0, 0, 0]).reshape(-1, 3)  # [entries, 3] RGB
        return bool((palette != palette[:, :1]).any())
    return not (image.mode in ("1", "L", "LA", "La", "I", "F") or image.mode.startswith("I;16"))


def folder_shape(files: list[tuple[Path, str]], image_size: int | None) -> tuple[int, int]:
    """(channels, side) of an image folder's samples, from its training images' headers: 3 channels when any
    image is stored in colour, else 1; the side is `image_size`, else 28 when every image is a grey 28x28 one
    (MNIST exported to PNGs trains like MNIST), else 32. Unreadable files are left to the decoding pass."""
    all_28 = True
    for path, _ in files:
        try:
            with Image.open(path) as image:
                if _in_colour(image):
                    return 3, image_size or COLOUR_IMAGE_SIZE
                all_28 = all_28 and image.size == (28, 28)
        except Exception:  # Pillow raises many types for broken files; decoding names them
            continue
    return 1, image_size or (28 if all_28 else COLOUR_IMAGE_SIZE)


def _eight_bit(image: Image.Image, path: Path, notes: FileNotes) -> Image.Image:
    """Any image Pillow reads -> L or RGB with 8 bits a channel, transparency flattened onto black; each
    conversion that changes what the file holds is noted."""
    mode = image.mode
    if mode == "CMYK":
        notes(path, "CMYK converted to RGB (no colour profile applied)")
        image = image.convert("RGB")
    elif mode in ("P", "PA"):
        notes(path, f"palette image converted to {'RGB' if _in_colour(image) else 'grey'}")
        image = image.convert("RGBA")
    elif mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)  # [H, W]
        sixteen_bit = mode.startswith("I;16") or (mode == "I" and values.size > 0 and values.max() > 255)
        notes(path, "16-bit image scaled to 8 bits" if sixteen_bit else f"{mode}-mode image clipped to 8 bits")
        image = Image.fromarray(np.clip(values / (257.0 if sixteen_bit else 1.0), 0, 255).round().astype(np.uint8))
    elif mode == "1":
        image = image.convert("L")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        notes(path, f"{mode} converted to RGB")
        image = image.convert("RGBA" if "A" in mode else "RGB")
    if image.mode in ("LA", "RGBA"):
        alpha = image.getchannel("A")
        opaque = image.convert(image.mode[:-1])
        if np.asarray(alpha).min() < 255:
            notes(path, "transparency flattened onto black")
            opaque = Image.composite(opaque, Image.new(opaque.mode, opaque.size, 0), alpha)
        image = opaque
    return image


def _decode_file(path: Path, channels: int, side: int, notes: FileNotes) -> np.ndarray | None:
    """One image file -> [side, side, channels] uint8 (the centre square, resized), or None when unreadable."""
    try:
        with Image.open(path) as image:
            image.draft(None, (side, side))  # JPEG: decode at a reduced scale that still covers the side
            image.load()
            pixels = ImageOps.fit(_eight_bit(image, path, notes), (side, side), Image.Resampling.LANCZOS)
    except Exception as error:  # Pillow raises many types for broken files
        reason = str(error).replace(f" '{path}'", "")  # Pillow's messages may repeat the path
        notes(path, "skipped, not a readable image", f" ({type(error).__name__}: {reason})")
        return None
    if channels == 3:
        pixels = pixels.convert("RGB")
    elif pixels.mode == "RGB":
        rgb = np.asarray(pixels)
        if (rgb != rgb[:, :, :1]).any():
            notes(path, "colour image made grey (this folder's training images are all grey)")
        pixels = pixels.convert("L")
    return np.asarray(pixels).reshape(side, side, channels)


def load_image_folder(
    data_dir: str | os.PathLike | None, split: str = "train", image_size: int | None = None
) -> ImageDataset:
    """Images of D/<split>/<class>/* (the torchvision ImageFolder layout), class names from D/train's subfolders
    in sorted order. Colour or grey: 3 channels when any training image is in colour, else 1 (folder_shape);
    each image's centre square is resized to the side. Files that cannot be read are skipped and converted
    ones (CMYK, palette, 16-bit, transparent) converted, each with a warning line, never an exception."""
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; expected train or test")
    low, high = IMAGE_SIZE_RANGE
    if image_size is not None and not low <= image_size <= high:
        raise DatasetError(f"--image-size must be between {low} and {high}, not {image_size}")
    root = resolve_data_dir(data_dir)
    layout = f"an image folder holds {root}/train/<class>/*.png (or .jpg) and {root}/test/<class>/*"
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"{root} has no train/ folder; {layout}")
    classes, files, skipped = _scan_split(train_dir)
    if not classes:
        raise DatasetError(f"{train_dir} has no class subfolders; {layout}")
    channels, side = folder_shape(files, image_size)
    split_dir = root / split
    if split == "test":
        if not split_dir.is_dir():
            raise DatasetError(f"{root} has no test/ folder; {layout}")
        test_classes, files, skipped = _scan_split(split_dir)
        unknown = [name for name in test_classes if name not in classes]
        if unknown:
            raise DatasetError(
                f"{split_dir / unknown[0]} is not a class of {train_dir} (its classes: {', '.join(classes)})"
            )

    notes = FileNotes()
    for path, why in skipped:
        notes(path, why)
    index = {name: label for label, name in enumerate(classes)}
    pixels, labels = [], []
    for path, name in progress(files, len(files), f"reading {split_dir}"):
        decoded = _decode_file(path, channels, side, notes)
        if decoded is not None:
            pixels.append(decoded)
            labels.append(index[name])
    skipped_count = sum(count for kind, count in notes.counts.items() if kind.startswith("skipped"))
    notes.close()
    if not pixels:
        raise DatasetError(f"{split_dir} holds no readable images; {layout}")
    found = np.bincount(np.array(labels), minlength=len(classes))
    for name, count in zip(classes, found, strict=True):
        if count == 0:
            _write_warning(f"warning: {split_dir / name}: no readable images; class {name!r} has no {split} examples")
    print(
        f"image folder {split_dir}: {len(pixels)} images of {channels}x{side}x{side} in {len(classes)} classes "
        f"({', '.join(classes)}){f'; files skipped: {skipped_count}' if skipped_count else ''}",
        file=sys.stderr,
        flush=True,
    )
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # [N, C, H, W]
    return ImageDataset(
        images=images.contiguous(),
        labels=torch.tensor(labels, dtype=torch.int64),
        name="folder",
        class_names=tuple(classes),
    )


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
    name: str,
    data_dir: str | os.PathLike | None,
    split: str,
    toy_size: int = 20000,
    seed: int = 0,
    image_size: int | None = None,
) -> ImageDataset:
    """One entry point for the CLI: 'mnist' (or any MNIST-format IDX set), 'folder' (an ImageFolder tree, resized
    to `image_size`) and 'toy2d:<density>'."""
    if name == "folder":
        return load_image_folder(data_dir, split, image_size)
    if image_size is not None:
        raise DatasetError(f"--image-size resizes image folders (--dataset folder); {name} has a fixed size")
    if name in ("mnist", "fashion-mnist", "idx"):
        dataset = load_idx_images(data_dir, split)
        names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else None
        return ImageDataset(dataset.images, dataset.labels, name=name, class_names=names)
    if name.startswith("toy2d"):
        density = name.partition(":")[2] or "8gaussians"
        generator = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
        points, labels = toy2d_labelled(density, toy_size, generator)
        return ImageDataset(points, labels, name=f"toy2d:{density}")
    raise DatasetError(
        f"unknown dataset {name!r}; expected 'mnist', 'fashion-mnist', 'folder' or 'toy2d:<{'|'.join(TOY2D_NAMES)}>'"
    )
