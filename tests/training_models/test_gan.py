import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from training.commands.cli import main
from training.models import build_model
from training.runtime.checkpoint import load_checkpoint
from training.runtime.draw import sample_generator
from training.runtime.load import load_model
from training.train.data import toy2d
from training.train.ema import ema_update
from training.train.gan import GANTrainConfig, train_gan
from training.train.losses import gradient_penalty


def test_gradient_penalty_matches_its_analytic_value_for_a_linear_critic() -> None:
    critic = nn.Linear(6, 1)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[3.0, 0.0, 4.0, 0.0, 0.0, 0.0]]))  # |w| = 5 everywhere
    real, fake = torch.randn(16, 6), torch.randn(16, 6)
    penalty = gradient_penalty(lambda x: critic(x).squeeze(1), real, fake, weight=10.0)
    assert penalty.item() == pytest.approx(10.0 * (5.0 - 1.0) ** 2)
    penalty.backward()  # differentiable w.r.t. the critic (create_graph)
    assert critic.weight.grad is not None and critic.weight.grad.abs().sum() > 0


def test_ema_update_is_exact() -> None:
    model, average = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [parameter.detach().clone() for parameter in average.parameters()]
    ema_update(average, model, decay=0.9)
    for old, new, current in zip(before, average.parameters(), model.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * current)


def toy_config(tmp_path: Path, **overrides) -> GANTrainConfig:
    fields = dict(
        dataset="toy2d:checkerboard",
        out=str(tmp_path / "toy.safetensors"),
        epochs=1,
        batch_size=128,
        latent_dim=8,
        max_batches=40,
        seed=0,
        device="cpu",
        ema_decay=0.9,
    )
    fields.update(overrides)
    return GANTrainConfig(**fields)


def moments(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return points.mean(0), torch.cov(points.T)


def test_toy_gan_moves_its_samples_moments_towards_the_data(tmp_path: Path) -> None:
    data_mean, data_cov = moments(toy2d("gaussian", 20000, torch.Generator().manual_seed(1)))
    untrained = build_model({"name": "mlp_generator", "kwargs": {"latent_dim": 8}})
    with torch.no_grad():
        start_mean, start_cov = moments(untrained(torch.randn(5000, 8)))
    path = train_gan(
        toy_config(tmp_path, dataset="toy2d:gaussian", loss="dcgan", batch_size=64, max_batches=600, ema_decay=0.99)
    )
    trained_mean, trained_cov = moments(sample_generator(load_model(path), torch.arange(5000)))
    assert (trained_mean - data_mean).norm() < 0.3 * (start_mean - data_mean).norm()
    assert (trained_cov - data_cov).norm() < 0.6 * (start_cov - data_cov).norm()


def test_weight_clipping_holds_after_every_critic_step(tmp_path: Path, monkeypatch) -> None:
    seen: list[float] = []
    real_step = torch.optim.RMSprop.step

    def step_then_look(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        seen.append(max(parameter.abs().max().item() for group in self.param_groups for parameter in group["params"]))
        return result

    monkeypatch.setattr(torch.optim.RMSprop, "step", step_then_look)
    path = train_gan(toy_config(tmp_path, loss="wgan", lr=0.05, max_batches=10, critic_steps=5))
    critic = load_checkpoint(path).extras["critic"]
    assert all(tensor.abs().max() <= 0.01 + 1e-7 for tensor in critic.values())
    assert max(seen) > 0.01  # without clipping the weights do leave the box


def test_fan_in_clipping_bounds_each_layer_by_its_fan_in_and_the_command_records_it(
    tmp_path: Path, idx_dir: Path
) -> None:
    """--clip-rule fan-in holds a layer of fan-in n to clip/sqrt(n) (weight and bias) and batch norm's scale and
    shift to clip: a large learning rate drives each to its own bound, and no further."""
    out = tmp_path / "fan.safetensors"
    flags = ["--loss", "wgan", "--network", "resize", "--width", "4", "--latent-dim", "8", "--max-batches", "6"]
    rule = ["--clip-rule", "fan-in", "--clip", "2", "--lr", "0.05", "--critic-steps", "2"]
    main(["gan", "--data-dir", str(idx_dir), "--epochs", "1", "--out", str(out), "--device", "cpu", *flags, *rule])
    checkpoint = load_checkpoint(out)
    assert "--clip-rule" in checkpoint.config.training["command"]
    critic = checkpoint.extras["critic"]
    fan_in = {"body.0": 1 * 4 * 4, "body.2": 4 * 4 * 4, "body.5": 8 * 3 * 3, "head": 16 * 7 * 7}
    for layer, n in fan_in.items():
        largest = max(critic[f"{layer}.weight"].abs().max(), critic[f"{layer}.bias"].abs().max())
        assert 0.9 * 2 / n**0.5 < largest <= 2 / n**0.5 + 1e-6, layer  # at its own bound: not 2, not 2/sqrt(16)
    assert critic["body.3.weight"].abs().max() <= 2 + 1e-6  # batch norm's scale: clip itself
    with pytest.raises(ValueError, match="--clip-rule must be one of constant, fan-in"):
        train_gan(GANTrainConfig(loss="wgan", clip_rule="layer", dataset="toy2d:checkerboard"))


def test_a_deep_norm_critic_normalizes_its_third_conv_and_loads_back(tmp_path: Path, idx_dir: Path) -> None:
    """--critic-deep-norm normalizes the resize critic's third conv too (batch norm: its own running statistics in
    the checkpoint); the served model keeps its critic; it is refused where there is no third conv or no norm,
    before the run begins."""
    out = tmp_path / "deep.safetensors"
    flags = ["--loss", "wgan", "--network", "resize", "--width", "4", "--latent-dim", "8", "--max-batches", "2"]
    command = ["gan", "--data-dir", str(idx_dir), "--epochs", "1", "--out", str(out), "--critic-steps", "1"]
    main([*command, "--critic-deep-norm", *flags])
    checkpoint = load_checkpoint(out)
    assert checkpoint.config.arch["critic"]["kwargs"]["deep_norm"] is True
    assert checkpoint.extras["critic"]["body.6.running_var"].shape == (16,)  # 4 x width channels
    assert load_model(out).critic is not None
    for refused in (dict(network="transposed"), dict(network="resize", critic_norm="none")):
        config = toy_config(tmp_path / "no", loss="wgan", critic_deep_norm=True, **refused)
        with pytest.raises(ValueError, match="needs --network resize and a --critic-norm"):
            train_gan(config)
        assert not (tmp_path / "no").exists()


def test_gan_checkpoint_round_trips_with_ema_and_critic(tmp_path: Path, idx_dir: Path) -> None:
    out = tmp_path / "dcgan.safetensors"
    main(
        [
            "gan",
            "--loss",
            "dcgan",
            "--data-dir",
            str(idx_dir),
            "--epochs",
            "1",
            "--max-batches",
            "3",
            "--width",
            "8",
            "--latent-dim",
            "16",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--label-smoothing",
            "0.1",
            "--instance-noise",
            "0.1",
            "--feature-matching",
            "1.0",
        ]
    )
    checkpoint = load_checkpoint(out)
    config = checkpoint.config
    assert config.family == "gan"
    assert config.sampler == {
        "latent_dim": 16,
        "temperature": 1.0,
        "weights": "ema",
        "steps": 0,  # DDLS off until a sweep chooses its steps for a trained GAN
        "step_size": 0.01,
        "noise": 0.1,
        "critic_output": "logit",  # its critic's scores are logits (an exported critic may return probabilities)
        "schema_version": 1,
    }
    assert config.training["loss"] == "dcgan" and config.training["generator_updates"] == 3
    critic = build_model(config.arch["critic"])
    critic.load_state_dict(checkpoint.extras["critic"])
    model = load_model(out)
    ema = build_model(config.arch)
    ema.load_state_dict(checkpoint.extras["ema"])
    for name, tensor in ema.state_dict().items():
        assert torch.equal(model.module.state_dict()[name], tensor)  # sampling uses the EMA weights
    raw = copy.deepcopy(ema)
    raw.load_state_dict(checkpoint.weights)
    assert any(not torch.equal(a, b) for a, b in zip(raw.state_dict().values(), ema.state_dict().values(), strict=True))
    assert sample_generator(model, torch.arange(5)).shape == (5, 1, 28, 28)
    main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    assert (tmp_path / "g.png").is_file()


def test_resume_continues_a_gan_run(tmp_path: Path) -> None:
    straight = load_checkpoint(train_gan(toy_config(tmp_path / "a", loss="wgan-gp", epochs=2, max_batches=10)))
    train_gan(toy_config(tmp_path / "b", loss="wgan-gp", epochs=1, max_batches=10))
    resumed = load_checkpoint(
        train_gan(toy_config(tmp_path / "b", loss="wgan-gp", epochs=2, max_batches=10, resume=True))
    )
    assert resumed.config.training["generator_updates"] == straight.config.training["generator_updates"] == 4
    for name, tensor in straight.weights.items():
        assert torch.allclose(tensor, resumed.weights[name], atol=1e-5), name


def test_a_clipped_wgan_on_adam_with_a_cosine_schedule_ends_at_its_floor(tmp_path: Path) -> None:
    """--optimizer adam on the clipped WGAN takes WGAN-GP's betas; --lr-schedule cosine decays from --lr to
    --min-lr-ratio of it by the run's last update; bad values stop the run before it starts."""
    flags = dict(loss="wgan", optimizer="adam", lr=1e-3, lr_schedule="cosine", min_lr_ratio=0.1, max_batches=10)
    train_gan(toy_config(tmp_path / "a", epochs=2, **flags))
    training = load_checkpoint(tmp_path / "a" / "toy.run" / "resume.safetensors").config.training
    critic = training["optimizer_param_groups"]["critic"][0]
    assert tuple(critic["betas"]) == (0.5, 0.9)
    assert 1e-4 < critic["lr"] < 1.1e-4  # the 20th of 20 critic steps: just above the floor
    assert training["schedule_start"] == 0
    with pytest.raises(ValueError, match="adam or rmsprop"):
        train_gan(toy_config(tmp_path / "c", loss="wgan", optimizer="sgd"))
    with pytest.raises(ValueError, match="cosine or constant"):
        train_gan(toy_config(tmp_path / "c", loss="wgan", lr_schedule="linear"))


def test_ema_warm_up_follows_the_model_early_and_the_decay_later() -> None:
    from training.train.ema import warmed_up_decay

    assert warmed_up_decay(0.999, 0) == pytest.approx(0.1)
    assert warmed_up_decay(0.999, 100_000) == 0.999


def test_batch_norm_statistics_are_averaged_like_the_weights() -> None:
    model, average = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    model.running_mean.fill_(1.0)
    ema_update(average, model, decay=0.75)
    assert torch.allclose(average.running_mean, torch.full((3,), 0.25))


def test_a_continued_run_keeps_the_ddls_settings_its_checkpoint_chose(tmp_path: Path) -> None:
    from training.runtime.checkpoint import save_checkpoint

    shipped = train_gan(toy_config(tmp_path / "a", loss="wgan-gp", epochs=1, max_batches=10))
    checkpoint = load_checkpoint(shipped)
    checkpoint.config.sampler.update(steps=50, step_size=0.03, noise=0.25)  # what a sweep chose
    save_checkpoint(shipped, checkpoint)
    warm = load_checkpoint(
        train_gan(toy_config(tmp_path / "b", loss="wgan-gp", epochs=2, max_batches=10, init_from=str(shipped)))
    )
    assert {key: warm.config.sampler[key] for key in ("steps", "step_size", "noise")} == {
        "steps": 50,
        "step_size": 0.03,
        "noise": 0.25,
    }


def test_r1_penalty_is_half_gamma_times_the_squared_gradient_norm_on_real_data() -> None:
    """For a linear critic d(x) = w . x the gradient is w everywhere: the penalty is gamma / 2 * ||w||^2."""
    from training.train.losses import r1_penalty

    critic = nn.Linear(6, 1, bias=False)
    real = torch.randn(4, 6)
    expected = 0.5 * 2.0 * critic.weight.pow(2).sum()
    assert torch.allclose(r1_penalty(lambda x: critic(x).squeeze(1), real, 2.0), expected)


def test_the_resize_network_with_r1_trains_saves_and_serves_its_critic(tmp_path: Path, idx_dir: Path) -> None:
    """--network resize (nearest resize + 3x3 convs, a 3-conv critic) with --r1: the critic has no batch norm,
    the checkpoint names the architectures, and the generator and critic load back for sampling and DDLS."""
    out = tmp_path / "resize.safetensors"
    flags = ["--network", "resize", "--r1", "0.2", "--width", "8", "--latent-dim", "16", "--max-batches", "3"]
    main(["gan", "--data-dir", str(idx_dir), "--epochs", "1", "--out", str(out), "--device", "cpu", *flags])
    config = load_checkpoint(out).config
    assert config.arch["name"] == "resize_generator" and config.training["args"]["r1"] == 0.2
    assert config.arch["critic"]["kwargs"] == {
        "width": 8, "channels": 1, "image_size": 28, "norm": "none", "depth": 3
    }  # fmt: skip
    model = load_model(out)
    assert model.critic is not None
    assert sample_generator(model, torch.arange(3), steps=2).shape == (3, 1, 28, 28)  # DDLS under its critic


def test_unknown_networks_and_negative_r1_are_refused(tmp_path: Path) -> None:
    refusals = (
        ("network", "unet", "unknown GAN network"),
        ("r1", -1.0, "at least 0"),
        ("autocast", "float16", "or none"),
        ("critic_norm", "batch", "--critic-norm layer \\(per image\\) or none"),
        ("critic_norm", "group", "--critic-norm must be one of none, batch, layer"),
    )
    for field, value, words in refusals:
        config = GANTrainConfig(
            out=str(tmp_path / "x.safetensors"), dataset="toy2d:moons", loss="wgan-gp", **{field: value}
        )
        with pytest.raises(ValueError, match=words):
            train_gan(config)


def test_a_clipped_wgan_trains_its_batch_norm_critic_in_bfloat16_and_saves_float32(
    tmp_path: Path, idx_dir: Path
) -> None:
    """--autocast bfloat16 runs the forward passes in bfloat16 (the weights move differently than in float32)
    while the checkpoint keeps float32 weights; the clipped critic has batch norm (Arjovsky et al.'s critic),
    and clipping holds for every parameter, batch norm's included."""
    weights = {}
    for autocast in ("none", "bfloat16"):
        out = tmp_path / f"{autocast}.safetensors"
        flags = ["--loss", "wgan", "--network", "resize", "--width", "8", "--latent-dim", "16", "--max-batches", "4"]
        command = ["gan", "--data-dir", str(idx_dir), "--epochs", "1", "--out", str(out), "--device", "cpu"]
        main([*command, *flags, "--critic-steps", "2", "--autocast", autocast])
        checkpoint = load_checkpoint(out)
        assert checkpoint.config.arch["critic"]["kwargs"]["norm"] == "batch"
        assert any("running_mean" in key for key in checkpoint.extras["critic"])
        parameters = [tensor for key, tensor in checkpoint.extras["critic"].items() if "running" not in key]
        assert all(tensor.abs().max() <= 0.01 + 1e-7 for tensor in parameters if tensor.is_floating_point())
        weights[autocast] = checkpoint.weights
        assert all(
            tensor.dtype == torch.float32 for tensor in checkpoint.weights.values() if tensor.is_floating_point()
        )
        assert sample_generator(load_model(out), torch.arange(3), steps=2).isfinite().all()
    moved = [not torch.equal(weights["none"][key], weights["bfloat16"][key]) for key in weights["none"]]
    assert any(moved)


def test_the_clipped_wgan_critic_can_drop_its_norm_widen_and_the_command_records_it(
    tmp_path: Path, idx_dir: Path
) -> None:
    out = tmp_path / "plain.safetensors"
    flags = ["--loss", "wgan", "--critic-norm", "none", "--width", "8", "--critic-width", "12", "--max-batches", "2"]
    main(["gan", "--data-dir", str(idx_dir), "--epochs", "1", "--out", str(out), "--critic-steps", "2", *flags])
    config = load_checkpoint(out).config
    assert config.arch["critic"]["kwargs"]["norm"] == "none"
    assert config.arch["critic"]["kwargs"]["width"] == 12 and config.arch["kwargs"]["width"] == 8
    assert "--critic-norm" in config.training["command"]
    assert load_model(out).critic is not None


def test_a_layer_norm_critic_scores_each_image_on_its_own(tmp_path: Path, idx_dir: Path) -> None:
    """--critic-norm layer normalizes each image alone: its score is the same alone, in a batch, in training and
    in eval mode (so DDLS refines under the very function trained), and a gradient penalty may use it."""
    out = tmp_path / "layer.safetensors"
    flags = ["--loss", "wgan-gp", "--network", "resize", "--critic-norm", "layer", "--critic-deep-norm"]
    small = ["--width", "4", "--latent-dim", "8", "--max-batches", "2", "--critic-steps", "1"]
    main(["gan", "--data-dir", str(idx_dir), "--epochs", "1", "--out", str(out), *flags, *small])
    checkpoint = load_checkpoint(out)
    assert checkpoint.config.arch["critic"]["kwargs"]["norm"] == "layer"
    assert not any("running" in key for key in checkpoint.extras["critic"])
    critic = load_model(out).critic
    assert critic is not None
    images = torch.rand(5, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        batched = critic(images)
        alone = torch.cat([critic(image[None]) for image in images])
        critic.train()
        training = critic(images)
    assert torch.allclose(batched, alone, atol=1e-5) and torch.allclose(batched, training, atol=1e-5)


def test_a_critic_from_a_file_written_before_norm_was_named_builds_the_same_layers() -> None:
    """Files from before `norm` say batch_norm: True; they build the batch-norm critic with the same keys."""
    old = build_model({"name": "conv_critic", "kwargs": {"width": 4, "batch_norm": True, "depth": 3}})
    new = build_model({"name": "conv_critic", "kwargs": {"width": 4, "norm": "batch", "depth": 3}})
    assert list(old.state_dict()) == list(new.state_dict())
    assert isinstance(old.body[3], nn.BatchNorm2d)
