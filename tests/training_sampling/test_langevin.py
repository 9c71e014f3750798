import pytest
import torch

from training.models import build_model
from training.sampling import langevin
from training.sampling.langevin import draws_noise, frozen_energy, langevin_step, sample_langevin
from training.sampling.noise import chain_gaussian, chain_gaussian_start, chain_uniform
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import EBMSampler


def quadratic_energy(center: float = 0.0):
    return lambda x: 0.5 * (x - center).pow(2).flatten(1).sum(1)


def test_step_clamps_into_the_data_range() -> None:
    x = torch.zeros(8, 3)
    steep = lambda x: -1000.0 * x.sum(1)  # noqa: E731 - pushes every coordinate up hard
    moved = langevin_step(steep, x, torch.randn(8, 3), step_size=100.0, noise=1.0, grad_clip=10.0).x
    assert moved.min() >= -1 and moved.max() <= 1
    assert torch.allclose(moved, torch.ones_like(moved))


def test_gradient_is_clipped_elementwise() -> None:
    x = torch.zeros(4, 5)
    steep = lambda x: 1e6 * x.sum(1)  # noqa: E731 - gradient 1e6 everywhere
    moved = langevin_step(steep, x, torch.zeros(4, 5), step_size=1.0, noise=0.0, grad_clip=0.03).x
    assert torch.allclose(moved, torch.full_like(moved, -0.03))


def test_step_descends_the_energy_and_reports_it() -> None:
    x = torch.full((6, 2), 0.8)
    step = langevin_step(quadratic_energy(), x, torch.zeros(6, 2), 0.1, 0.0, grad_clip=10.0)
    moved, energy = step.x, step.energy
    assert torch.allclose(energy, torch.full((6,), 0.64))
    assert torch.allclose(moved, torch.full((6, 2), 0.72))


def test_per_chain_settings_share_one_batch() -> None:
    x = torch.full((3, 2), 0.5)
    step_size = torch.tensor([0.0, 0.1, 0.2])
    noise = torch.tensor([0.0, 0.0, 0.0])
    temperature = torch.tensor([1.0, 1.0, 2.0])
    moved = langevin_step(quadratic_energy(), x, torch.randn(3, 2), step_size, noise, 10.0, temperature).x
    assert torch.allclose(moved[0], x[0])  # step size 0: stays
    assert torch.allclose(moved[1], torch.full((2,), 0.45))
    assert torch.allclose(moved[2], torch.full((2,), 0.45))  # twice the step at twice the temperature


def test_sampling_is_reproducible_with_a_seed_and_leaves_parameters_alone() -> None:
    torch.manual_seed(0)
    model = build_model({"name": "conv_energy", "kwargs": {"width": 8}})
    settings = EBMSampler(steps=5)
    start = torch.rand(4, 1, 28, 28) * 2 - 1
    runs = [
        sample_langevin(frozen_energy(model), start, settings, (-1.0, 1.0), torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], start)
    assert all(parameter.grad is None for parameter in model.parameters())
    assert model.training  # frozen_energy restores the mode it found


def test_callback_sees_every_step() -> None:
    seen = []
    sample_langevin(
        quadratic_energy(),
        torch.zeros(2, 2),
        EBMSampler(steps=4),
        (-1.0, 1.0),
        callback=lambda step, x, energy: seen.append((step, energy.shape)),
    )
    assert seen == [(step, torch.Size([2])) for step in range(1, 5)]


def test_chain_noise_depends_only_on_the_chains_own_seed_and_step() -> None:
    seeds = torch.tensor([11, 22, 33])
    steps = torch.tensor([4, 4, 9])
    together = chain_gaussian(seeds, steps, (1, 8, 8))
    alone = chain_gaussian(seeds[1:2], steps[1:2], (1, 8, 8))
    assert torch.equal(together[1:2], alone)
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(chain_gaussian(seeds, steps + 1, (1, 8, 8)), together)


def test_chain_noise_is_standard_normal_and_starts_are_uniform() -> None:
    noise = chain_gaussian(torch.arange(64), torch.zeros(64, dtype=torch.int64), (784,))
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    starts = chain_uniform(torch.arange(64), (784,), -1.0, 1.0)
    assert starts.min() >= -1 and starts.max() <= 1 and abs(starts.mean().item()) < 0.01
    gaussian = chain_gaussian_start(torch.arange(64), (784,))
    assert abs(gaussian.mean().item()) < 0.01 and abs(gaussian.std().item() - 1) < 0.01
    steps_used = [chain_gaussian(torch.arange(64), torch.full((64,), step), (784,)) for step in range(3)]
    assert not any(torch.equal(gaussian, noise) for noise in steps_used)  # a counter no step uses


def test_no_noise_is_plain_gradient_descent() -> None:
    x = torch.full((2, 3), 0.5)
    moved = langevin_step(quadratic_energy(), x, torch.randn(2, 3), 0.1, 0.0, grad_clip=None).x
    assert torch.equal(moved, x - 0.1 * x)


def test_a_noise_free_step_skips_the_draw_and_moves_chains_to_the_same_bits() -> None:
    torch.manual_seed(0)
    energy = frozen_energy(build_model({"name": "conv_energy", "kwargs": {"width": 4}}))
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    x[0, 0, 0, :4] = 0.0  # +0.0: x + 0 * eps keeps it whatever eps's sign
    before, eps = x.clone(), torch.randn(3, 1, 28, 28)
    for clamp, momentum in [(True, 0.0), (False, 0.0), (True, 0.5)]:
        drawn = langevin_step(energy, x, eps, 10.0, 0.0, momentum=momentum, clamp=clamp)
        skipped = langevin_step(energy, x, None, 10.0, 0.0, momentum=momentum, clamp=clamp)
        assert skipped.x.numpy().tobytes() == drawn.x.numpy().tobytes()
        assert skipped.energy.numpy().tobytes() == drawn.energy.numpy().tobytes()
        assert (skipped.velocity is None) == (momentum == 0)  # at momentum 0 a chain keeps no velocity
        if skipped.velocity is not None and drawn.velocity is not None:
            assert skipped.velocity.numpy().tobytes() == drawn.velocity.numpy().tobytes()
    assert torch.equal(x, before)  # the skipped draw's clamp is not done in place on the caller's states
    assert not draws_noise(0.0, x) and not draws_noise(torch.zeros(3), x)
    assert draws_noise(0.005, x) and draws_noise(torch.tensor([0.0, 0.0, 0.1]), x)
    # Why -0.0 draws: 0 * eps has eps's sign, and -0.0 + +0.0 is +0.0, so skipping would keep a sign the draw drops.
    signed = torch.tensor([[-0.0, 0.5]])
    assert not (signed + 0.0 * torch.ones(1, 2))[0, 0].signbit() and draws_noise(0.0, signed)


def test_a_zero_noise_chain_gives_the_same_bytes_without_its_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    energy = frozen_energy(build_model({"name": "conv_energy", "kwargs": {"width": 4}}))
    seeds = torch.arange(4)
    start = chain_uniform(seeds, (1, 28, 28), -1.0, 1.0)
    drawn_steps: list[int] = []

    def noise(step: int, x: torch.Tensor) -> torch.Tensor:  # counter-based, as the CLI's and the server's
        drawn_steps.append(step)
        return chain_gaussian(seeds, torch.full_like(seeds, step), (1, 28, 28))

    for settings in (EBMSampler(steps=6, noise=0.0), EBMSampler(steps=6, noise=0.0, momentum=0.5, clamp=False)):
        skipped = sample_langevin(energy, start, settings, (-1.0, 1.0), noise)
        assert drawn_steps == []
        with monkeypatch.context() as patch:
            patch.setattr(langevin, "draws_noise", lambda *_: True)  # as before: every step draws
            drawn = sample_langevin(energy, start, settings, (-1.0, 1.0), noise)
        assert drawn_steps == list(range(6))
        assert skipped.numpy().tobytes() == drawn.numpy().tobytes()
        drawn_steps.clear()


def test_without_clipping_or_clamping_the_full_gradient_moves_chains_out_of_range() -> None:
    x = torch.full((2, 2), 0.9)
    steep = lambda x: -10.0 * x.sum(1)  # noqa: E731 - gradient -10 everywhere
    free = langevin_step(steep, x, torch.zeros(2, 2), 0.1, 0.0, grad_clip=None, clamp=False).x
    assert torch.allclose(free, torch.full((2, 2), 1.9))
    clamped = langevin_step(steep, x, torch.zeros(2, 2), 0.1, 0.0, grad_clip=None).x
    assert torch.equal(clamped, torch.ones(2, 2))
    runs = sample_langevin(steep, x, EBMSampler(steps=3, noise=0.0, clamp=False), (-1.0, 1.0))
    assert torch.equal(runs, torch.ones(2, 2))  # only what is returned is clamped


def test_momentum_zero_reproduces_the_plain_step_and_momentum_carries_velocity() -> None:
    torch.manual_seed(0)
    model = build_model({"name": "conv_energy", "kwargs": {"width": 4}})
    energy = frozen_energy(model)
    x, eps = torch.rand(3, 1, 28, 28) * 2 - 1, torch.randn(3, 1, 28, 28)
    plain = langevin_step(energy, x, eps, 10.0, 0.005)
    # Today's update, written out: x' = clamp(x + noise * eps); x <- clamp(x' - step * clip(grad)).
    noised = (x + 0.005 * eps).clamp(-1, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(noised).sum(), noised)
    assert torch.equal(plain.x, (noised.detach() - 10.0 * grad.clamp(-0.03, 0.03)).clamp(-1, 1))
    quad = quadratic_energy()
    first = langevin_step(quad, torch.full((1, 2), 0.8), torch.zeros(1, 2), 0.1, 0.0, None, momentum=0.5)
    second = langevin_step(quad, first.x, torch.zeros(1, 2), 0.1, 0.0, None, momentum=0.5, velocity=first.velocity)
    # v1 = -0.08, x1 = 0.72; v2 = 0.5 * -0.08 - 0.1 * 0.72 = -0.112, x2 = 0.608
    assert torch.allclose(second.x, torch.full((1, 2), 0.608)) and torch.allclose(
        second.velocity, torch.full((1, 2), -0.112)
    )


@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("network", [False, True])
def test_per_chain_momentum_and_step_size_give_each_chain_what_it_gets_alone(clamp: bool, network: bool) -> None:
    """Exactly with an energy that treats samples apart; within float error through a conv net (whose
    kernels may sum in another order at another batch size)."""
    torch.manual_seed(1)
    energy = (
        frozen_energy(build_model({"name": "conv_energy", "kwargs": {"width": 4}})) if network else quadratic_energy()
    )
    seeds = torch.tensor([3, 4, 5])
    x = chain_uniform(seeds, (1, 28, 28), -1.0, 1.0)
    settings = [(10.0, 0.0), (5.0, 0.5), (2.0, 0.9)]  # (step size, momentum) of each chain
    step_size = torch.tensor([size for size, _ in settings])
    momentum = torch.tensor([m for _, m in settings])
    together, velocity = x, None
    alone = [(x[i : i + 1], None) for i in range(3)]
    for step in range(4):
        eps = chain_gaussian(seeds, torch.full((3,), step), (1, 28, 28))
        moved = langevin_step(
            energy, together, eps, step_size, 0.005, momentum=momentum, velocity=velocity, clamp=clamp
        )
        together, velocity = moved.x, moved.velocity
        for i, (size, m) in enumerate(settings):
            one = langevin_step(
                energy, alone[i][0], eps[i : i + 1], size, 0.005, momentum=m, velocity=alone[i][1], clamp=clamp
            )
            alone[i] = (one.x, one.velocity)
    for i in range(3):
        if network:
            assert torch.allclose(together[i : i + 1], alone[i][0], atol=1e-6, rtol=0)
        else:
            assert torch.equal(together[i : i + 1], alone[i][0])
    assert not torch.allclose(together[0], together[2])


def test_buffer_restarts_about_the_configured_fraction_from_noise() -> None:
    buffer = ReplayBuffer((2,), capacity=10000, restart_prob=0.05)
    buffer.write_back(torch.full((10000,), -1), torch.full((10000, 2), 0.5))
    _, slots = buffer.draw(4000, torch.Generator().manual_seed(0))
    fresh = (slots < 0).float().mean().item()
    assert 0.04 < fresh < 0.06


def test_buffer_never_hands_one_slot_to_two_chains() -> None:
    buffer = ReplayBuffer((1,), capacity=20, restart_prob=0.0)
    buffer.write_back(torch.full((20,), -1), torch.arange(20.0).unsqueeze(1) / 20)
    _, first = buffer.draw(15)
    _, second = buffer.draw(15)  # only 5 slots are free: the rest start from noise
    taken = torch.cat([first, second])
    taken = taken[taken >= 0]
    assert len(taken) == 20 and len(set(taken.tolist())) == 20
    buffer.release(first)
    _, third = buffer.draw(15)
    assert (third >= 0).all()


def test_buffer_write_back_updates_drawn_slots_and_appends_fresh_chains() -> None:
    buffer = ReplayBuffer((1,), capacity=4, restart_prob=0.0)
    x, slots = buffer.draw(3)
    assert (slots < 0).all()  # an empty buffer starts everything from noise
    buffer.write_back(slots, torch.tensor([[0.1], [0.2], [0.3]]))
    assert len(buffer) == 3
    x, slots = buffer.draw(2)
    assert (slots >= 0).all()
    buffer.write_back(slots, x + 0.5)
    assert torch.allclose(buffer.samples[slots], x + 0.5)
    buffer.write_back(torch.full((3,), -1), torch.full((3, 1), -0.9))  # 1 appended, 2 replace the oldest
    assert len(buffer) == 4
    assert (buffer.samples[:4, 0] == -0.9).sum() == 3


def test_buffer_state_round_trips() -> None:
    buffer = ReplayBuffer((3,), capacity=8, restart_prob=0.2, data_range=(0.0, 1.0))
    buffer.write_back(torch.full((5,), -1), torch.rand(5, 3))
    restored = ReplayBuffer.from_state_dict(buffer.state_dict())
    assert (restored.capacity, restored.restart_prob, restored.data_range, len(restored)) == (8, 0.2, (0.0, 1.0), 5)
    assert torch.equal(restored.samples[:5], buffer.samples[:5])


def test_buffer_slots_keep_the_class_of_their_chain_and_draw_by_class() -> None:
    buffer = ReplayBuffer((1,), capacity=6, restart_prob=0.0)
    buffer.write_back(torch.full((6,), -1), torch.arange(6.0).unsqueeze(1), torch.tensor([0, 1, 2, 0, 1, 2]))
    x, slots = buffer.draw(3, torch.Generator().manual_seed(0), label=1)
    assert sorted(slots[slots >= 0].tolist()) == [1, 4] and slots.tolist().count(-1) == 1
    drawn = slots >= 0
    buffer.write_back(slots[drawn], x[drawn])  # no labels given: the drawn slots keep theirs
    restored = ReplayBuffer.from_state_dict(buffer.state_dict())
    assert restored.labels.tolist() == [0, 1, 2, 0, 1, 2]
    buffer.write_back(torch.full((1,), -1), torch.zeros(1, 1), torch.tensor([2]))  # a fresh chain replaces slot 0
    assert buffer.labels.tolist() == [2, 1, 2, 0, 1, 2]
    older = ReplayBuffer((1,), capacity=2)
    older.write_back(torch.full((2,), -1), torch.zeros(2, 1))
    saved_before_classes = {key: value for key, value in older.state_dict().items() if key != "labels"}
    pooled = ReplayBuffer.pooled([buffer.state_dict(), saved_before_classes], (1,), 0.0, (-1.0, 1.0))
    assert pooled.labels.tolist() == [2, 1, 2, 0, 1, 2, -1, -1]


def test_buffer_chains_of_a_request_keep_the_class_of_their_slots_or_the_one_asked_for() -> None:
    buffer = ReplayBuffer((1,), capacity=4, restart_prob=0.0)
    buffer.write_back(torch.full((4,), -1), torch.zeros(4, 1), torch.tensor([3, 5, 3, 5]))
    _, slots, classes = buffer.start_chains(2, torch.Generator().manual_seed(0), torch.tensor([5, 5]), None)
    assert sorted(slots.tolist()) == [1, 3] and classes is not None and classes.tolist() == [5, 5]
    buffer.release(slots)
    _, slots, classes = buffer.start_chains(4, torch.Generator().manual_seed(0), None, torch.tensor([0, 0, 0, 0]))
    assert classes is not None and classes.tolist() == [3 if slot % 2 == 0 else 5 for slot in slots.tolist()]


def test_nesterov_takes_the_gradient_at_the_look_ahead_point() -> None:
    quad, x0, rest = quadratic_energy(), torch.full((1, 2), 0.8), torch.zeros(1, 2)
    kwargs = {"grad_clip": None, "clamp": False, "momentum": 0.5}
    first = langevin_step(quad, x0, rest, 0.1, 0.0, **kwargs, nesterov=True)
    assert torch.allclose(first.x, x0 - 0.1 * x0)  # at rest the look-ahead is the point itself
    second = langevin_step(quad, first.x, rest, 0.1, 0.0, **kwargs, velocity=first.velocity, nesterov=True)
    look_ahead = first.x + 0.5 * first.velocity  # grad of |x|^2 / 2 is x
    assert torch.allclose(second.velocity, 0.5 * first.velocity - 0.1 * look_ahead)
    heavy_ball = langevin_step(quad, first.x, rest, 0.1, 0.0, **kwargs, velocity=first.velocity)
    assert not torch.allclose(second.x, heavy_ball.x)
    runs = sample_langevin(
        quad, x0, EBMSampler(steps=2, step_size=0.1, noise=0.0, grad_clip=None, momentum=0.5, nesterov=True), (-1, 1)
    )
    assert torch.allclose(runs, second.x)  # the loop passes the setting on
