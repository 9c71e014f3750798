"""What the one loader (training/runtime/load.py) says about a path that leads to no file: the CLI's
`sample`, `evaluate` and `export` and the server's models directory all read through it."""

from pathlib import Path

import pytest

from training.runtime.checkpoint import CheckpointError
from training.runtime.load import load_model


def test_a_missing_checkpoint_is_named_as_missing_not_as_a_link(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as refused:
        load_model(tmp_path / "nope.safetensors")
    assert str(refused.value).startswith("nope.safetensors does not exist")
    assert "link" not in str(refused.value)


def test_a_link_to_nothing_is_named_as_a_link(tmp_path: Path) -> None:
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match=r"dangling\.safetensors is a link that does not resolve to a file"):
        load_model(tmp_path / "dangling.safetensors")
