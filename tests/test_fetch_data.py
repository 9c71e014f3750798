"""`python -m training fetch-data` against a local HTTP mirror, as a user behind a proxy would point it at one:
verified files land and load, a second run downloads nothing, a corrupted file is deleted with a checksum error;
MNIST is checked by SHA-256, Fashion-MNIST by the MD5s Zalando publishes."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from training.commands import fetch_data
from training.commands.cli import main
from training.train.data import load_dataset

FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class CountingHandler(SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []  # paths asked for, across the server's threads

    def do_GET(self) -> None:
        CountingHandler.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass


@contextlib.contextmanager
def serve_mirror(
    idx_dir: Path, served: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, algorithm: str
) -> Iterator[str]:
    """A threaded HTTP server over a copy of the tiny IDX files, whose digests (by the dataset's publisher's
    algorithm) stand in for the published ones."""
    shutil.copytree(idx_dir, served)
    table = {name: (algorithm, hashlib.new(algorithm, (served / name).read_bytes()).hexdigest()) for name in FILES}
    monkeypatch.setitem(fetch_data.CHECKSUMS, dataset, table)
    CountingHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mirror(idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "mirror"
    with serve_mirror(idx_dir, served, monkeypatch, "mnist", "sha256") as url:
        yield url, served


def test_fetch_data_downloads_verified_files_that_train_and_skips_them_the_second_time(
    mirror: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = mirror
    data = tmp_path / "data"
    main(["fetch-data", "mnist", "--dir", str(data), "--mirror", url])
    assert sorted(path.name for path in data.iterdir()) == sorted(FILES)  # no .part left behind
    assert len(load_dataset("mnist", str(data), "train").images) == 512
    assert len(CountingHandler.requests) == 4
    assert "checksum verified" in capsys.readouterr().err

    main(["fetch-data", "mnist", "--dir", str(data), "--mirror", url])
    assert len(CountingHandler.requests) == 4  # nothing downloaded again
    assert capsys.readouterr().err.count("already there, checksum verified") == 4


def test_a_corrupted_file_is_deleted_and_the_command_fails_naming_it(
    mirror: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, served = mirror
    labels = served / "t10k-labels-idx1-ubyte.gz"
    damaged = bytearray(labels.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    labels.write_bytes(bytes(damaged))
    data = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_info:
        main(["fetch-data", "mnist", "--dir", str(data), "--mirror", url])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.splitlines()[-1]
    assert "t10k-labels-idx1-ubyte.gz" in error and "checksum" in error
    assert sorted(path.name for path in data.iterdir()) == sorted(FILES[:3])  # the bad one (and its .part) is gone


def test_a_copy_already_on_disk_that_does_not_match_is_downloaded_again(
    mirror: tuple[str, Path], tmp_path: Path
) -> None:
    url, served = mirror
    data = tmp_path / "data"
    data.mkdir()
    (data / FILES[0]).write_bytes(b"an interrupted download from somewhere else")
    main(["fetch-data", "mnist", "--dir", str(data), "--mirror", url])
    assert (data / FILES[0]).read_bytes() == (served / FILES[0]).read_bytes()


def test_a_mirror_without_the_files_fails_with_the_url_and_what_to_do(
    mirror: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = mirror
    with pytest.raises(SystemExit) as exit_info:
        main(["fetch-data", "mnist", "--dir", str(tmp_path / "data"), "--mirror", url + "elsewhere/"])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert f"{url}elsewhere/train-images-idx3-ubyte.gz" in error and "--mirror" in error


def test_fashion_mnist_is_checked_by_md5_and_a_corrupted_copy_is_still_refused(
    idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zalando publishes MD5s, so the files whose MD5 matches are accepted (the SHA-256 table this replaced
    refused the real ones), and a damaged one is still deleted."""
    assert {algorithm for algorithm, _ in fetch_data.CHECKSUMS["fashion-mnist"].values()} == {"md5"}
    served = tmp_path / "mirror"
    with serve_mirror(idx_dir, served, monkeypatch, "fashion-mnist", "md5") as url:
        main(["fetch-data", "fashion-mnist", "--dir", str(tmp_path / "good"), "--mirror", url])
        assert sorted(path.name for path in (tmp_path / "good").iterdir()) == sorted(FILES)
        images = served / FILES[0]
        images.write_bytes(images.read_bytes() + b"\0")
        with pytest.raises(SystemExit) as exit_info:
            main(["fetch-data", "fashion-mnist", "--dir", str(tmp_path / "bad"), "--mirror", url])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.splitlines()[-1]
    assert FILES[0] in error and "failed its checksum: MD5" in error
    assert not (tmp_path / "bad" / FILES[0]).exists() and not (tmp_path / "bad" / f"{FILES[0]}.part").exists()


def test_every_dataset_lists_a_checksum_for_each_of_its_four_files() -> None:
    lengths = {"sha256": 64, "md5": 32}
    for dataset, table in fetch_data.CHECKSUMS.items():
        assert sorted(table) == sorted(FILES), dataset
        for algorithm, digest in table.values():
            assert len(digest) == lengths[algorithm] and int(digest, 16) >= 0, (dataset, digest)
        assert fetch_data.MIRRORS[dataset], dataset
