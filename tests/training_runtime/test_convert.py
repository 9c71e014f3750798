"""training/convert.py, the conversion helper users call from their own code: an energy in someone else's style, a
GAN whose discriminator ends in a sigmoid, a uniformly dequantized coupling flow served over [0, 255] in both
directions with its own bits/dim, and refusals (the server loader's, and a user's mistakes) in one line each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from programs import (
    SHAPE,
    CouplingFlow,
    DecodedFlow,
    TinyCritic,
    TinyGenerator,
    blocks,
    own_bits_per_dim,
    train_dequantized_flow,
)
from torch import nn

from training.convert import ConversionError, export_energy, export_flow, export_gan, export_velocity_field
from training.runtime.exported_modules import ExportedFlow
from training.runtime.load import load_model
from training.sampling.scoring import one_pass_scores, score_family


class TheirEnergy(nn.Module):
    """Someone else's energy network: `images` and a keyword argument, a [B, 1] output, and -E (a log density up
    to a constant, as JEM's) rather than E."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(64 * 4, 1))

    def forward(self, images: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:  # [B, 1, 8, 8] -> [B, 1]
        return self.body(images) / temperature


def test_an_energy_in_someone_elses_style_is_served_as_its_energy(tmp_path: Path, capsys) -> None:
    energy = TheirEnergy().eval()
    sampler = {"steps": 6, "step_size": 0.05, "noise": 0.01}
    converted = export_energy(energy, tmp_path / "theirs.pt2", SHAPE, negated=True, sampler=sampler)
    report = capsys.readouterr().out
    assert report.startswith("theirs: served as family ebm, samples [1, 8, 8] in [-1.0, 1.0]")
    assert "steps=6, step_size=0.05, noise=0.01" in report and "theirs.pt2, theirs.json" in report
    served = load_model(tmp_path / "theirs.pt2")  # what a server loads from the folder
    assert converted.model.config.sampler == served.config.sampler
    x = torch.rand(5, *SHAPE) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(served.module(x), -energy(x).squeeze(1))


def test_a_gan_whose_discriminator_ends_in_a_sigmoid_is_served_with_its_logit(tmp_path: Path, capsys) -> None:
    generator, critic = TinyGenerator(), TinyCritic(probability=True)
    sampler = {"steps": 5, "step_size": 0.05, "noise": 0.1}
    converted = export_gan(
        generator, tmp_path / "gan.pt2", SHAPE, 4, critic=critic, critic_output="probability", sampler=sampler
    )
    assert "critic gan.critic.pt2 (probability, served as its logit)" in capsys.readouterr().out
    assert [path.name for path in converted.files] == ["gan.pt2", "gan.critic.pt2", "gan.json"]
    served = load_model(tmp_path / "gan.pt2")
    assert served.critic is not None and served.config.sampler["critic_output"] == "probability"
    x = torch.rand(4, *SHAPE) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(served.critic(x), TinyCritic(probability=False)(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(served.module(torch.ones(3, 4)), generator(torch.ones(3, 4)))


def test_a_dequantized_flow_converted_over_0_255_both_ways_has_its_own_bits_per_dim(tmp_path: Path) -> None:
    flow, test = train_dequantized_flow(blocks(512, seed=0)), blocks(128, seed=1)
    converted = export_flow(
        DecodedFlow(flow), tmp_path / "flow.pt2", SHAPE, forward=flow.encode, range=(0.0, 255.0),
        trained_range=(0.0, 1.0), flat=True, quiet=True,
    )  # fmt: skip
    assert "bins 0.996094 wide" in str(converted) and "flow.forward.pt2: scores" in str(converted)
    assert "its own samples (temperature 1, 16): " in str(converted)
    served = load_model(tmp_path / "flow.pt2")
    assert isinstance(served.module, ExportedFlow) and served.module.forward_program is not None
    assert served.config.data["dequantization"] == "uniform" and served.config.data["levels"] == 256
    scored = one_pass_scores(score_family(served), [served], test.float(), None)["bits_per_dim"]  # levels k = k
    assert scored.mean().item() == pytest.approx(own_bits_per_dim(flow, test), abs=0.01)


class FixedBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(2, -1).sum(1)


class PerPixel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class Branching(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1) if x.sum() > 0 else -x.flatten(1).sum(1)


class NotFinite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1) * float("nan")


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (FixedBatch(), r"^the energy fixes the batch size \(.*\); use x.shape\[0\], x.flatten\(1\)"),
        (PerPixel(), r"^the energy returns \[2, 64\] for a batch of 2; an energy returns one value a sample"),
        (Branching(), r"^torch.export cannot trace the energy: .*; make its forward a plain tensor computation"),
        (NotFinite(), r"^the server would refuse mine.pt2: .*not finite"),
    ],
)
def test_a_module_that_cannot_be_served_is_refused_in_one_line_and_nothing_is_written(
    tmp_path: Path, module: nn.Module, reason: str
) -> None:
    with pytest.raises(ConversionError, match=reason) as refused:
        export_energy(module, tmp_path / "mine.pt2", SHAPE, quiet=True)
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_a_module_in_half_precision_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        ConversionError, match=r"^the energy holds tensors on cpu in torch.bfloat16; .*\.cpu\(\)\.float\(\)"
    ):
        export_energy(TheirEnergy().to(torch.bfloat16), tmp_path / "half.pt2", SHAPE, quiet=True)


def test_a_critic_of_the_wrong_shape_and_a_lying_forward_pass_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"^the critic returns \[2, 64\] for a batch of 2; a critic returns one"):
        export_gan(TinyGenerator(), tmp_path / "gan.pt2", SHAPE, 4, critic=PerPixel(), quiet=True)
    flow = CouplingFlow().eval()
    with pytest.raises(ConversionError, match=r"^the server would refuse flow.pt2: flow.forward.pt2: its log p\(x\)"):
        export_flow(DecodedFlow(flow), tmp_path / "flow.pt2", SHAPE, forward=Liar(flow), range=(0.0, 1.0), flat=True)
    assert list(tmp_path.iterdir()) == []


class Liar(nn.Module):
    """A forward pass whose log det is 5 nats too high: its log p(x) disagrees with the inverse pass's."""

    def __init__(self, flow: CouplingFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = self.flow.encode(x)
        return z, log_det + 5.0


class DCGANStyle(nn.Module):
    """A generator that takes z as [B, nz, 1, 1] and returns flat rows [B, 64]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(4, 64), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        assert z.dim() == 4
        return self.net(z)


def test_a_dcgan_style_generator_takes_its_latent_shape_and_returns_the_datas_shape(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"generator fails on z \[2, 4\]: .*pass latent_shape="):
        export_gan(DCGANStyle(), tmp_path / "dc.pt2", SHAPE, 4, quiet=True)
    generator = DCGANStyle().eval()
    converted = export_gan(generator, tmp_path / "dc.pt2", SHAPE, 4, latent_shape=(4, 1, 1), quiet=True)
    assert "no critic" in str(converted)
    assert "weights=" not in str(converted) and "step_size=" not in str(converted)  # only what applies, as /models
    z = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path / "dc.pt2").module(z), generator(z[..., None, None]).view(3, *SHAPE)
        )


class TimedField(nn.Module):
    """A user's flow-matching field v(x, t, y): an MLP of x and t, a label embedding (the last row: y = -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(65, 32), nn.SiLU(), nn.Linear(32, 64))
        self.labels = nn.Embedding(3, 64)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = self.net(torch.cat([x.flatten(1), t[:, None]], 1)) + self.labels(y.clamp(min=-1) % 3)
        return hidden.view(x.shape)


def test_a_conditional_velocity_field_is_served_with_its_solver(tmp_path: Path) -> None:
    field = TimedField().eval()
    converted = export_velocity_field(field, tmp_path / "fm.pt2", SHAPE, solver="euler", steps=4, classes=["a", "b"],
                                      quiet=True)  # fmt: skip
    assert "euler, 4 steps" in str(converted) and "2 classes" in str(converted)
    served = load_model(tmp_path / "fm.pt2")
    assert served.config.sampler["solver"] == "euler" and served.config.data["classes"] == ["a", "b"]
    x, t, y = torch.randn(3, *SHAPE), torch.rand(3), torch.tensor([0, 1, -1])
    with torch.no_grad():
        torch.testing.assert_close(served.module(x, t, y), field(x, t, y))
