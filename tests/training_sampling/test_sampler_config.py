"""The typed sampler configs: what training writes, what old checkpoints hold, what is refused."""

import subprocess
import sys
from pathlib import Path

import pytest

from training.runtime.checkpoint import CheckpointError, load_checkpoint
from training.runtime.load import load_model
from training.sampling.sampler_config import EBMSampler, FlowSampler, GANSampler, from_dict, sampler_for, to_dict

CHECKPOINTS = Path(__file__).parents[2] / "checkpoints"


def test_defaults_are_the_tutorials_contrastive_divergence_settings() -> None:
    sampler = EBMSampler()
    assert (sampler.steps, sampler.step_size, sampler.noise, sampler.grad_clip, sampler.temperature) == (
        60,
        10.0,
        0.005,
        0.03,
        1.0,
    )
    assert (sampler.init, sampler.prior, sampler.momentum, sampler.clamp) == ("noise", "uniform", 0.0, True)
    assert (sampler.restart_prob, sampler.train_steps) == (0.05, None)


@pytest.mark.parametrize("path", sorted(CHECKPOINTS.glob("*.safetensors")), ids=lambda path: path.stem)
def test_every_shipped_checkpoint_reads_into_its_familys_config(path: Path) -> None:
    config = load_checkpoint(path).config
    sampler = sampler_for(config.family, config.sampler)
    assert {key: value for key, value in to_dict(sampler).items() if key in config.sampler} == config.sampler
    assert sampler_for(config.family, to_dict(sampler)) == sampler  # round trip through the stored form


def test_shipped_ebm_reads_its_recorded_settings_and_defaults_the_rest() -> None:
    sampler = load_model(CHECKPOINTS / "ebm_mnist_seed0.safetensors").sampler_as(EBMSampler)
    assert (sampler.steps, sampler.train_steps, sampler.init) == (256, 60, "buffer")
    assert (sampler.prior, sampler.momentum, sampler.clamp) == ("uniform", 0.0, True)


def test_unknown_keys_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"\['betas', 'stepsize'\]"):
        from_dict(EBMSampler, {"stepsize": 1.0, "betas": 0.5})
    with pytest.raises(ValueError, match="schema_version 7"):
        from_dict(GANSampler, {"schema_version": 7})
    with pytest.raises(ValueError, match="prior"):
        from_dict(EBMSampler, {"prior": "laplace"})


def test_a_checkpoint_with_a_bad_sampler_is_refused_at_load(tmp_path: Path) -> None:
    from training.runtime.checkpoint import save_checkpoint

    checkpoint = load_checkpoint(CHECKPOINTS / "nice_mnist.safetensors")
    checkpoint.config.sampler = {"temperature": 0.8, "tempreature": 0.9}
    save_checkpoint(tmp_path / "bad.safetensors", checkpoint)
    with pytest.raises(CheckpointError, match="tempreature"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_flows_record_their_base_but_sample_from_the_modules() -> None:
    model = load_model(CHECKPOINTS / "glow_mnist.safetensors")
    assert model.sampler_as(FlowSampler).base == "gaussian" == model.module.base_name
    with pytest.raises(ValueError, match="no EBMSampler"):
        model.sampler_as(EBMSampler)


def test_the_sampler_keys_page_lists_every_key_with_its_default_and_range_as_the_code_defines_them() -> None:
    """docs/sampler-keys.md is the output of scripts/sampler_keys.py, which reads each sampler dataclass: a key
    added, removed or re-bounded without regenerating the page fails here."""
    root = Path(__file__).resolve().parents[2]
    printed = subprocess.run(
        [sys.executable, "scripts/sampler_keys.py"], capture_output=True, text=True, check=True, cwd=root
    ).stdout
    assert printed == (root / "docs" / "sampler-keys.md").read_text()
    assert "| `step_size` | `10.0` | number in (0, 1000] |" in printed  # an energy's, with its bounds
    assert '| `weights` | `"ema"` | `"ema"` \\| `"raw"` |' in printed  # a GAN's word-valued key
