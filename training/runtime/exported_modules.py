"""Adapters: a torch.export program as the module each family's sampler calls (an energy, a generator, a flow),
so an exported model samples through the code a checkpoint samples through (training/runtime/exported.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.models.flows import Flow, quantize
from training.runtime.checkpoint import CheckpointError


class _Program(nn.Module):
    """A program's module, frozen. `anchor` is its first parameter: samplers find the device with
    next(module.parameters()) even when the program has none. train()/eval() do not reach the program
    (torch refuses them on exported modules; it runs as it was exported)."""

    program: nn.Module
    anchor: nn.Parameter

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        _hold(self, program)

    def train(self, mode: bool = True) -> _Program:
        self.training = mode
        return self


def _hold(owner: nn.Module, program: nn.Module) -> None:
    """Attach a frozen program to the module that adapts it, with the empty `anchor` parameter."""
    owner.anchor = nn.Parameter(torch.empty(0, device=_device_of(program)), requires_grad=False)
    owner.program = program
    for parameter in program.parameters():
        parameter.requires_grad_(False)


def _as_traced(program: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """The program run in the dtype it was traced in (float32), outside any autocast: torch.export keeps dtype
    assertions in the graph that the bfloat16 outputs of chain steps under autocast would trip (every request
    to an exported energy was a 503 under --sampling-dtype bfloat16)."""
    with torch.autocast(inputs[0].device.type, enabled=False):
        return program(*(tensor.float() if tensor.is_floating_point() else tensor for tensor in inputs))


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class ExportedEnergy(_Program):
    """E(x) [B] (or E(x, y) with y [B], -1 the null label) from a program; differentiable in x."""

    def __init__(self, program: nn.Module, num_classes: int = 0) -> None:
        super().__init__(program)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if not self.num_classes:
            return _as_traced(self.program, x)
        if labels is None:
            labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        return _as_traced(self.program, x, labels)


class ExportedGenerator(_Program):
    """G(z): x [B, *shape] from z [B, latent_dim]."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _as_traced(self.program, z)


class ExportedCritic(_Program):
    """A GAN's critic d(x) [B] from a program NAME.critic.pt2, x [B, *shape]: its logit (a DCGAN's discriminator
    before the sigmoid, a WGAN's value), as DDLS and scores use it. A program that ends in the sigmoid (the
    sidecar's `critic_output: "probability"`) is served as the logit of its probability, log(p / (1 - p)) with p
    clamped to [PROBABILITY_EPS, 1 - PROBABILITY_EPS]: the logit itself wherever float32 holds the probability
    apart from 0 and 1 (|d| < 13.8), and its gradient in x the logit's (the sigmoid's derivative p (1 - p)
    cancels)."""

    PROBABILITY_EPS = 1e-6  # float32 resolves 1 - 1e-6 from 1 (its spacing there is 6e-8)

    def __init__(self, program: nn.Module, probability: bool = False) -> None:
        super().__init__(program)
        self.probability = probability

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """What the program returns, as it returns it (a probability where it declares one)."""
        return _as_traced(self.program, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.output(x)
        if not self.probability or not isinstance(value, torch.Tensor):
            return value
        return torch.logit(value, eps=self.PROBABILITY_EPS)


class ExportedFlow(Flow):
    """A flow program z [B, *shape] -> (x, log p(x)) behind the Flow API the pools and the CLI call: the
    base distribution (the sidecar's sampler.base, Gaussian by default) draws z; the program is the whole
    inverse pass, so a trajectory is its one final state. Its forward program (NAME.forward.pt2, x [B, *shape]
    -> (z [B, *shape], log|det dz/dx| [B])), when given, is the data-to-noise pass: log p of given images, so
    exported flows score data and have test bits/dim. Its dequantizer (NAME.dequantizer.pt2, (x, eps) [B, *shape]
    -> (u [B, *shape], log q(u | x) [B])), when its data are variationally dequantized, draws the offsets within
    each level's bin that the variational bound of given images scores (training/sampling/dequantization.py).
    `quantized` (data range, levels): the samples of a model whose sidecar says its data are dequantized levels
    (uniformly or variationally) go back to those levels here, not in the program (log p stays the density of the
    continuous point drawn)."""

    program: nn.Module
    anchor: nn.Parameter

    def __init__(
        self,
        program: nn.Module,
        shape: tuple[int, ...],
        base: str,
        forward_program: nn.Module | None = None,
        quantized: tuple[tuple[float, float], int] | None = None,
        dequantizer: nn.Module | None = None,
    ) -> None:
        super().__init__([], shape, base)
        _hold(self, program)
        self.forward_program, self.dequantizer = forward_program, dequantizer
        for companion in (forward_program, dequantizer):
            for parameter in companion.parameters() if companion is not None else ():
                parameter.requires_grad_(False)
        self.quantized = quantized

    def train(self, mode: bool = True) -> ExportedFlow:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, *shape] -> [B, D], [B]
        if self.forward_program is None:
            raise ValueError(
                "this exported flow maps noise to data only; the log-density of given images needs its "
                "data-to-noise program beside it (NAME.forward.pt2: x -> (z, log det))"
            )
        z, log_det = _as_traced(self.forward_program, x.reshape(x.shape[0], *self.shape))
        return z.reshape(x.shape[0], -1), log_det

    def dequantize(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u [B, *shape], log q(u | x) [B]) of images x [B, *shape] (their levels' values in the data range) and
        standard normal noise eps [B, *shape], from its dequantizer program."""
        if self.dequantizer is None:
            raise ValueError("this exported flow has no dequantizer (NAME.dequantizer.pt2: (x, eps) -> (u, log q))")
        u, log_q = _as_traced(self.dequantizer, x, eps)
        return u, log_q

    def decode(
        self, z: torch.Tensor, keep_states: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x, log_prob = _as_traced(self.program, z.reshape(z.shape[0], *self.shape))  # [B, *shape], [B]
        if self.quantized is not None:
            x = quantize(x, *self.quantized)
        return x, log_prob, [x] if keep_states else []

    def _inverse(self, z: torch.Tensor, keep_states: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x, log_prob, states = self.decode(z, keep_states)
        return x, self.base.log_prob(z) - log_prob, states  # log|det dx/dz| = log p_base(z) - log p(x)


class ExportedVelocity(_Program):
    """A velocity-field program v(x [B, *shape], t [B]) -> v [B, *shape] (with `num_classes`, v(x, t, y [B]), y = -1
    the null label) behind the signature of this project's fields (training/models/cnf.py): what the ODE samplers,
    guidance and the likelihood's trace differentiate through."""

    def __init__(self, program: nn.Module, num_classes: int = 0) -> None:
        super().__init__(program)
        self.num_classes = num_classes

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, labels: torch.Tensor | None = None
    ) -> torch.Tensor:  # [B, *shape]
        times = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        times = times.expand(x.shape[0]) if times.dim() == 0 else times
        if not self.num_classes:
            return _as_traced(self.program, x, times)
        if labels is None:
            labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        return _as_traced(self.program, x, times, labels.to(torch.long))


def expect_output(value: Any, shape: list[int], what: str, source: str) -> None:
    """CheckpointError unless a program's output `what` is a finite floating-point tensor of `shape`."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{source}: the program returns {type(value).__name__} where the {what} belongs")
    if list(value.shape) != shape:
        raise CheckpointError(f"{source}: the {what} has shape {list(value.shape)}, expected {shape}")
    if not value.dtype.is_floating_point or not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{source}: the {what} is not finite floating point ({value.dtype})")
