"""`python -m training fetch-data`: the four official IDX files of MNIST or Fashion-MNIST, each checked
against the checksum its publisher states.

Standard library only: urllib honours the usual `http_proxy`/`https_proxy` variables, and `--mirror` points
at any other copy (an internal HTTP server, or `file:///path/` for files carried in by hand). Every file is
written under a `.part` name and renamed only once its checksum matches the one below, so a file with the
final name is always a verified one and a second run skips it.
"""

from __future__ import annotations

import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path

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

CHUNK = 1 << 16  # bytes read from the network at a time


class FetchError(Exception):
    """A file could not be fetched, or what arrived is not the published file."""


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, part: Path, name: str, algorithm: str) -> str:
    """Stream url into part with a progress display; the digest of what arrived."""
    digest = hashlib.new(algorithm)
    with urllib.request.urlopen(url, timeout=60) as response, part.open("wb") as handle:
        length = response.headers.get("Content-Length")
        with progress(None, int(length) if length else None, name, unit="B", unit_scale=True) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                handle.write(block)
                digest.update(block)
                bar.update(len(block))
    return digest.hexdigest()


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
        part = path.with_name(name + ".part")
        failures = []
        for base in bases:
            url = base.rstrip("/") + "/" + name
            try:
                got = _download(url, part, name, algorithm)
            except (urllib.error.URLError, OSError) as error:  # HTTPError is a URLError
                part.unlink(missing_ok=True)
                failures.append(f"{url}: {getattr(error, 'reason', error)}")
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
