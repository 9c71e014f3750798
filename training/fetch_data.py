"""`python -m training fetch-data`: the four official IDX files of MNIST or Fashion-MNIST, checked by SHA-256.

Standard library only: urllib honours the usual `http_proxy`/`https_proxy` variables, and `--mirror` points
at any other copy (an internal HTTP server, or `file:///path/` for files carried in by hand). Every file is
written under a `.part` name and renamed only once its SHA-256 matches the one below, so a file with the
final name is always a verified one and a second run skips it.
"""

from __future__ import annotations

import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path

from training.run import progress

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

# SHA-256 of each file as published. MNIST: computed from the files this project trains on. Fashion-MNIST:
# as two independent public download scripts list them (not checked against a download here).
SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
        "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
        "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
        "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
    },
}

CHUNK = 1 << 16  # bytes read from the network at a time


class FetchError(Exception):
    """A file could not be fetched, or what arrived is not the published file."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, part: Path, name: str) -> str:
    """Stream url into part with a progress display; the SHA-256 of what arrived."""
    digest = hashlib.sha256()
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
    if dataset not in SHA256:
        raise ValueError(f"unknown dataset {dataset!r}; fetch-data knows {', '.join(SHA256)}")
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    bases = (mirror,) if mirror else MIRRORS[dataset]
    for name, expected in SHA256[dataset].items():
        path = directory / name
        if path.is_file():
            if file_sha256(path) == expected:
                print(f"{path}: already there, checksum verified", file=sys.stderr)
                continue
            print(f"{path}: checksum differs from the published file's; downloading it again", file=sys.stderr)
        part = path.with_name(name + ".part")
        failures = []
        for base in bases:
            url = base.rstrip("/") + "/" + name
            try:
                got = _download(url, part, name)
            except (urllib.error.URLError, OSError) as error:  # HTTPError is a URLError
                part.unlink(missing_ok=True)
                failures.append(f"{url}: {getattr(error, 'reason', error)}")
                print(failures[-1], file=sys.stderr)
                continue
            if got != expected:
                part.unlink()
                raise FetchError(
                    f"{name} from {url} failed its checksum: SHA-256 {got}, the published file's is {expected}; "
                    f"deleted it. The mirror serves a different or damaged file: try again, or another --mirror"
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
