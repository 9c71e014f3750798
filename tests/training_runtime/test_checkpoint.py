import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training.models import build_model
from training.runtime.checkpoint import (
    SCHEMA_VERSION,
    Checkpoint,
    CheckpointError,
    ModelConfig,
    load_checkpoint,
    save_checkpoint,
)
from training.sampling.replay_buffer import ReplayBuffer


def ebm_config(**overrides) -> ModelConfig:
    fields = dict(
        family="ebm",
        arch={"name": "conv_energy", "kwargs": {"width": 8}},
        data={"shape": [1, 28, 28], "range": [-1, 1], "dataset": "mnist"},
        sampler={"steps": 60, "step_size": 10.0},
        training={"seed": 3},
        metrics={"fd": 1.5},
        ensemble="group",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def test_weights_buffer_and_metadata_survive_a_round_trip(tmp_path: Path) -> None:
    config = ebm_config()
    model = build_model(config.arch)
    buffer = ReplayBuffer((1, 28, 28), capacity=16)
    buffer.write_back(torch.full((5,), -1), torch.rand(5, 1, 28, 28))
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, Checkpoint(config, model.state_dict(), {"replay_buffer": buffer.state_dict()}))

    loaded = load_checkpoint(path)
    assert loaded.config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.weights[name], tensor)
    restored = ReplayBuffer.from_state_dict(loaded.extras["replay_buffer"])
    assert len(restored) == 5 and restored.capacity == 16
    assert torch.equal(restored.samples[:5], buffer.samples[:5])
    rebuilt = build_model(loaded.config.arch)
    rebuilt.load_state_dict(loaded.weights)


def test_float16_shipping_keeps_values_close(tmp_path: Path) -> None:
    weights = {"w": torch.randn(10, 10)}
    save_checkpoint(tmp_path / "half.safetensors", Checkpoint(ebm_config(), weights), dtype=torch.float16)
    loaded = load_checkpoint(tmp_path / "half.safetensors")
    assert loaded.weights["w"].dtype == torch.float16
    assert torch.allclose(loaded.weights["w"].float(), weights["w"], atol=1e-2)


def _write_raw(path: Path, config: dict | None) -> None:
    metadata = {"config": json.dumps(config)} if config is not None else None
    save_file({"weights/w": torch.zeros(2)}, str(path), metadata=metadata)


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    raw = json.loads(ebm_config().to_json()) | {"schema_version": SCHEMA_VERSION + 1}
    _write_raw(tmp_path / "future.safetensors", raw)
    with pytest.raises(CheckpointError, match="schema_version 2 is not supported"):
        load_checkpoint(tmp_path / "future.safetensors")


@pytest.mark.parametrize("field", ["family", "arch", "data", "sampler", "training", "metrics"])
def test_missing_field_is_refused_by_name(tmp_path: Path, field: str) -> None:
    raw = json.loads(ebm_config().to_json())
    del raw[field]
    _write_raw(tmp_path / "partial.safetensors", raw)
    with pytest.raises(CheckpointError, match=f"lacks the required field '{field}'"):
        load_checkpoint(tmp_path / "partial.safetensors")


def test_plain_safetensors_without_config_is_refused(tmp_path: Path) -> None:
    _write_raw(tmp_path / "plain.safetensors", None)
    with pytest.raises(CheckpointError, match="no 'config' key"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_garbage_and_truncated_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="too short"):
        load_checkpoint(tmp_path / "garbage.safetensors")
    save_checkpoint(tmp_path / "whole.safetensors", Checkpoint(ebm_config(), {"w": torch.randn(1000)}))
    payload = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(payload[:-100])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_saving_leaves_no_temporary_files(tmp_path: Path) -> None:
    for _ in range(3):
        save_checkpoint(tmp_path / "m.safetensors", Checkpoint(ebm_config(), {"w": torch.randn(3)}))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_extras_may_share_memory_with_the_weights(tmp_path: Path) -> None:
    weights = {"w": torch.randn(4, 4)}
    save_checkpoint(tmp_path / "shared.safetensors", Checkpoint(ebm_config(), weights, {"ema": dict(weights)}))
    loaded = load_checkpoint(tmp_path / "shared.safetensors")
    assert torch.equal(loaded.extras["ema"]["w"], weights["w"])
