"""`python -m training set-sampler`: a checkpoint's sampler defaults changed in place, after a sweep, without
retraining; what later samples by default follows, its tensors stay, and stale recorded figures go."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_tiny_ebm, write_tiny_flow, write_tiny_gan

from training.commands.cli import main
from training.runtime.checkpoint import load_checkpoint, save_checkpoint

PLAIN = {"frechet_distance": 60.0, "n": 8, "steps": 0}
REFINED = {"frechet_distance": 50.0, "n": 8, "steps": 3, "step_size": 0.01, "noise": 0.1}


def with_records(path: Path, records: dict[str, dict]) -> Path:
    checkpoint = load_checkpoint(path)
    checkpoint.config.metrics.update(records)
    save_checkpoint(path, checkpoint)
    return path


def sample_png(path: Path, out: Path, *flags: str) -> bytes:
    main(["sample", str(path), "--n", "4", "--seed", "5", "--device", "cpu", "--out", str(out), *flags])
    return out.read_bytes()


def test_a_gan_samples_with_its_new_ddls_default_and_its_figures_follow_their_steps(tmp_path: Path) -> None:
    gan = with_records(write_tiny_gan(tmp_path / "gan.safetensors"), {"evaluate": PLAIN, "evaluate_steps_3": REFINED})
    asked = sample_png(gan, tmp_path / "asked.png", "--steps", "3", "--step-size", "0.01", "--noise", "0.1")
    assert sample_png(gan, tmp_path / "plain.png") != asked  # the default was the plain pass
    before = load_checkpoint(gan)

    main(["set-sampler", str(gan), "steps=3", "step_size=0.01", "noise=0.1"])

    after = load_checkpoint(gan)
    assert after.config.sampler["steps"] == 3
    assert sample_png(gan, tmp_path / "default.png") == asked
    assert after.config.metrics["evaluate"] == REFINED and after.config.metrics["evaluate_steps_0"] == PLAIN
    assert "evaluate_steps_3" not in after.config.metrics
    for name, tensor in before.weights.items():
        assert after.weights[name].dtype == tensor.dtype and after.weights[name].equal(tensor)
    assert after.extras["critic"].keys() == before.extras["critic"].keys()


def test_a_changed_default_a_record_depends_on_drops_it_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = with_records(write_tiny_flow(tmp_path / "flow.safetensors"), {"evaluate": {"frechet_distance": 9.0}})
    main(["set-sampler", str(flow), "temperature=0.6"])
    captured = capsys.readouterr()
    assert "temperature 0.8 -> 0.6" in captured.out
    assert "dropped the recorded figures evaluate" in captured.err
    assert load_checkpoint(flow).config.sampler["temperature"] == 0.6
    assert "evaluate" not in load_checkpoint(flow).config.metrics

    records = {"evaluate_noise": {"frechet_distance": 1.0}, "evaluate_buffer": {"frechet_distance": 2.0}}
    ebm = with_records(write_tiny_ebm(tmp_path / "ebm.safetensors"), records)
    main(["set-sampler", str(ebm), "init=buffer"])  # each record's key names its start: both still true
    assert load_checkpoint(ebm).config.metrics.keys() >= records.keys()
    main(["set-sampler", str(ebm), "steps=25"])
    assert not load_checkpoint(ebm).config.metrics.keys() & records.keys()


def test_a_record_measured_at_the_new_defaults_becomes_the_default_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sweep's winner, recorded with explicit --steps 50 --step-size --noise, is what the defaults now draw."""
    swept = {"frechet_distance": 25.4, "n": 8, "steps": 50, "step_size": 0.0001, "noise": 0.0141}
    other = {**swept, "step_size": 0.001, "frechet_distance": 26.0}
    gan = with_records(
        write_tiny_gan(tmp_path / "gan.safetensors"),
        {"evaluate": PLAIN, "evaluate_steps_50_noise_0.0141": swept, "evaluate_steps_50_step_size_0.001": other},
    )
    main(["set-sampler", str(gan), "steps=50", "step_size=0.0001", "noise=0.0141"])
    metrics = load_checkpoint(gan).config.metrics
    assert metrics["evaluate"] == swept and metrics["evaluate_steps_0"] == PLAIN
    assert metrics["evaluate_step_size_0.001"] == other  # its key names its own step size: still true
    assert "evaluate_noise_0.0141" not in metrics

    measured_elsewhere = {**swept, "step_size": 0.01}  # under the default key, at the old default step size
    gan = with_records(write_tiny_gan(tmp_path / "again.safetensors"), {"evaluate_steps_50": measured_elsewhere})
    capsys.readouterr()
    main(["set-sampler", str(gan), "steps=50", "step_size=0.0001", "noise=0.0141"])
    assert not any(key.startswith("evaluate") for key in load_checkpoint(gan).config.metrics)
    said = capsys.readouterr().err  # the command that measures it again, at its steps and its sample count
    assert f"again with: python -m training evaluate {gan} --record --steps 50 --n 8 --data-dir D" in said


def test_an_ebm_init_called_noise_is_not_a_noise_override(tmp_path: Path) -> None:
    records = {
        "evaluate_noise_label_all": {"frechet_distance": 1.0, "noise": 0.005},
        "evaluate_noise_noise_0.02": {"frechet_distance": 2.0, "noise": 0.02},
    }
    ebm = with_records(write_tiny_ebm(tmp_path / "ebm.safetensors"), records)
    main(["set-sampler", str(ebm), "noise=0.03"])
    assert set(load_checkpoint(ebm).config.metrics) & set(records) == {"evaluate_noise_noise_0.02"}
    ebm = with_records(write_tiny_ebm(tmp_path / "again.safetensors"), records)
    main(["set-sampler", str(ebm), "noise=0.02"])  # the long-run check is now the default sampling
    metrics = load_checkpoint(ebm).config.metrics
    assert (
        metrics["evaluate_noise"] == records["evaluate_noise_noise_0.02"] and "evaluate_noise_label_all" not in metrics
    )


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ("steps", "expected FIELD=VALUE"),
        ("colour=red", "'colour' is not a field of its sampler"),
        ("latent_dim=64", "'latent_dim' is fixed by its training"),
        ("steps=many", "steps: 'many' is not a value of type int"),
        ("steps=-1", "sampler steps must be an integer in [0, 2147483647], not -1"),
        ("weights=best", "sampler weights must be 'ema' or 'raw'"),
        ("critic_output=probability", 'a checkpoint\'s critic returns its logit, so it stays "logit"'),
    ],
)
def test_a_bad_setting_is_refused_with_why_and_the_file_is_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, said: str
) -> None:
    gan = write_tiny_gan(tmp_path / "gan.safetensors")
    payload = gan.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["set-sampler", str(gan), setting])
    assert exit_info.value.code == 2
    assert said in capsys.readouterr().err
    assert gan.read_bytes() == payload


def test_a_gan_saved_without_its_critic_keeps_the_plain_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gan = write_tiny_gan(tmp_path / "gan.safetensors")
    checkpoint = load_checkpoint(gan)
    del checkpoint.extras["critic"]
    save_checkpoint(gan, checkpoint)
    with pytest.raises(SystemExit):
        main(["set-sampler", str(gan), "steps=10"])
    assert "saved without its critic" in capsys.readouterr().err
    main(["set-sampler", str(gan), "temperature=0.9"])  # what a plain pass uses is still settable
    assert load_checkpoint(gan).config.sampler["temperature"] == 0.9
