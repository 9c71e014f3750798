"""`python -m training fetch-data`: the four official IDX files of MNIST or Fashion-MNIST, each checked
against the checksum its publisher states.

Standard library only: urllib honours the usual `http_proxy`/`https_proxy` variables, and `--mirror` points
at any other copy (an internal HTTP server, or `file:///path/` for files carried in by hand). Every file is
written under a fresh temporary name (created exclusively: a link planted in the directory is never written
through) and renamed only once its size and checksum match the ones below, so a file with the final name is
always a verified one and a second run skips it. A mirror is not trusted for more: no more bytes are read than
the published file has, and whatever goes wrong on the network (a refused connection, a garbage status line, a
cut body, a Content-Length that is not a number) is one line naming the URL, the temporary file removed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from training.train.progress import progress

# Where each dataset's files are usually published, tried in order.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's copy
        "https://storage.googleapis.com/cvdf-datasets/mnist/",  # the CVDF copy TensorFlow reads
    ),
    "fashion-mnist": (
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",  # the copy Keras reads
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # Zalando's bucket (no HTTPS endpoint)
    ),
}

# (algorithm, digest) of each file, as its publisher states it, or measured where none is stated.
CHECKSUMS: dict[str, dict[str, tuple[str, str]]] = {
    # LeCun's MNIST page states no checksum. SHA-256 measured from the official files in ../shared/data/mnist
    # (sha256sum, again for issue 25), whose MD5s are the ones torchvision's MNIST class lists
    # (f68b3c2dcbeaaa9fbdd348bbdeb94873, d53e105ee54ea40749a09fcbcd1e9432, 9fb629c4189551a2d022fa330f9573f3,
    # ec29112dd5afa0611ce80d1b7f02629c, in this order).
    "mnist": {
        "train-images-idx3-ubyte.gz": ("sha256", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz": ("sha256", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz": ("sha256", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz": ("sha256", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    # Zalando publishes MD5s: the README of github.com/zalandoresearch/fashion-mnist ("Get the Data"). The
    # label files matching them hash to SHA-256 a04f1713...90845 (train) and 67da17c7...f8dd5 (t10k), as
    # measured for issue 25; the SHA-256 table this replaced was copied from download scripts, and wrong.
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": ("md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train-labels-idx1-ubyte.gz": ("md5", "25c81989df183df01b3e8a0aad5dffbe"),
        "t10k-images-idx3-ubyte.gz": ("md5", "bef4ecab320f06d8554ea6380940ec79"),
        "t10k-labels-idx1-ubyte.gz": ("md5", "bb300cfdad3c16e7a12a480ee83cd310"),
    },
}
SHOWN = {"sha256": "SHA-256", "md5": "MD5"}
# Bytes of each published file, the most a mirror may send: MNIST's measured from the files in ../shared/data/mnist
# (ls -l, the files the SHA-256s above were measured from); Fashion-MNIST's as both mirrors serve them (the
# Content-Length Keras' and torchvision's downloads print, which match Zalando's files).
SIZES: dict[str, dict[str, int]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": 9912422,
        "train-labels-idx1-ubyte.gz": 28881,
        "t10k-images-idx3-ubyte.gz": 1648877,
        "t10k-labels-idx1-ubyte.gz": 4542,
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": 26421880,
        "train-labels-idx1-ubyte.gz": 29515,
        "t10k-images-idx3-ubyte.gz": 4422102,
        "t10k-labels-idx1-ubyte.gz": 5148,
    },
}
# What a mirror that fails can raise: no answer, not HTTP (a garbage status line, a cut chunk), or what it sent
# is not the file (MirrorError below). Each is one line naming the URL; the next mirror is tried.
NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)

CHUNK = 1 << 16  # bytes read from the network at a time


class FetchError(Exception):
    """A file could not be fetched, or what arrived is not the published file."""


class MirrorError(Exception):
    """What one mirror sent is not the file: more or fewer bytes than it has, or a length that is not a number."""


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, handle: BinaryIO, name: str, algorithm: str, size: int) -> str:
    """Stream url into handle with a progress display, `size` bytes at most; the digest of what arrived."""
    digest = hashlib.new(algorithm)
    with urllib.request.urlopen(url, timeout=60) as response:
        declared = response.headers.get("Content-Length")
        if declared is not None and not (declared.strip().isdigit() and len(declared.strip()) < 20):
            raise MirrorError(f"a Content-Length that is not a number ({declared[:40]!r})")
        if declared is not None and int(declared) != size:
            raise MirrorError(f"a Content-Length of {int(declared):,} bytes; the published file has {size:,}")
        received = 0
        with progress(None, size, name, unit="B", unit_scale=True) as bar:
            while block := response.read(CHUNK):
                received += len(block)
                if received > size:
                    raise MirrorError(f"more than the {size:,} bytes of the published file")
                handle.write(block)
                digest.update(block)
                bar.update(len(block))
        if received < size:
            raise MirrorError(f"the answer ended after {received:,} of the file's {size:,} bytes")
    return digest.hexdigest()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(getattr(error, "reason", None) or error).split()) or type(error).__name__
    return text[:300]


def _fresh_part(directory: Path, name: str) -> tuple[BinaryIO, Path]:
    """A new file for the download, under a name nobody else chose: created exclusively (mkstemp: O_EXCL, and no
    link followed), so a `.part` link planted in the directory is never written through."""
    descriptor, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
    os.fchmod(descriptor, 0o644)  # what the file would have had (mkstemp's 0600 would stay after the rename)
    return os.fdopen(descriptor, "wb"), Path(path)


def _download_to_part(url: str, directory: Path, name: str, algorithm: str, size: int) -> tuple[Path, str]:
    """The download in a fresh part file, and its digest; the part file is removed whatever stops it."""
    handle, part = _fresh_part(directory, name)
    try:
        with handle:
            return part, _download(url, handle, name, algorithm, size)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def fetch(dataset: str, directory: str | Path, mirror: str | None = None) -> Path:
    """Download the dataset's four IDX files into directory (from `mirror`, else its usual mirrors in turn)
    and verify each; files already there and verified are kept. Returns the directory."""
    if dataset not in CHECKSUMS:
        raise ValueError(f"unknown dataset {dataset!r}; fetch-data knows {', '.join(CHECKSUMS)}")
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    bases = (mirror,) if mirror else MIRRORS[dataset]
    for name, (algorithm, expected) in CHECKSUMS[dataset].items():
        path = directory / name
        if path.is_file():
            if file_digest(path, algorithm) == expected:
                print(f"{path}: already there, checksum verified", file=sys.stderr)
                continue
            print(f"{path}: checksum differs from the published file's; downloading it again", file=sys.stderr)
        size = SIZES[dataset][name]
        failures = []
        for base in bases:
            url = base.rstrip("/") + "/" + name
            try:
                part, got = _download_to_part(url, directory, name, algorithm, size)
            except (*NETWORK_ERRORS, MirrorError) as error:
                failures.append(f"{url}: {_one_line(error)}")
                print(failures[-1], file=sys.stderr)
                continue
            if got != expected:
                part.unlink()
                raise FetchError(
                    f"{name} from {url} failed its checksum: {SHOWN[algorithm]} {got}, the published file's is "
                    f"{expected}; deleted it. The mirror serves a different or damaged file: try again, or another "
                    "--mirror"
                )
            part.replace(path)
            print(f"{path}: downloaded from {url}, checksum verified", file=sys.stderr)
            break
        else:
            raise FetchError(
                f"could not download {name}: " + "; ".join(failures) + ". Behind a proxy, set https_proxy; "
                "or pass --mirror URL (a directory holding the four .gz files; file:///path/ works too)"
            )
    return directory
