"""The wrappers training/convert.py traces: a user's module (or one method of it) called positionally, its outputs
reshaped into its family's program signature (docs/exporting.md), a flow's units converted to the served range;
and the eager checks that say a wrong output shape in one line, with the fix, before torch.export runs."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Range = tuple[float, float]


class ConversionError(ValueError):
    """A module that cannot be served as given, with the fix; or the server's loader refusing the result."""


# --- the user's module called positionally -------------------------------------------------------------------


class Call(nn.Module):
    """A user's module, or one method of it (`flow.encode`), called with positional tensors; its parameters and
    buffers are this module's, so torch.export lifts them as weights."""

    def __init__(self, call: nn.Module | Callable[..., Any], what: str) -> None:
        super().__init__()
        if isinstance(call, nn.Module):
            self.user, self.method = call.eval(), "__call__"
        elif inspect.ismethod(call) and isinstance(call.__self__, nn.Module):
            self.user, self.method = call.__self__.eval(), call.__name__
        else:
            raise ConversionError(f"{what} must be an nn.Module or a method of one (torch.export traces modules)")
        for tensor in [*self.user.parameters(), *self.user.buffers()]:
            if tensor.device.type != "cpu" or (tensor.is_floating_point() and tensor.dtype != torch.float32):
                raise ConversionError(
                    f"{what} holds tensors on {tensor.device} in {tensor.dtype}; programs are traced on the CPU in "
                    "float32 (the server moves them to its device): call .cpu().float() on it first"
                )

    def forward(self, *inputs: torch.Tensor) -> Any:
        return getattr(self.user, self.method)(*inputs)


def per_sample(value: Any, batch: int, what: str, fix: str) -> torch.Tensor:
    """`value` as [batch]: a tensor of one value a sample ([B] or [B, 1]); ConversionError otherwise."""
    if not isinstance(value, torch.Tensor) or value.numel() != batch or (value.dim() and value.shape[0] != batch):
        shown = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConversionError(f"{what} returns {shown} for a batch of {batch}; {fix}")
    return value


def sized(value: Any, batch: int, shape: Sequence[int], what: str) -> torch.Tensor:
    """`value` when it holds [batch, *shape] values (any layout of them, e.g. flat rows); ConversionError otherwise."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
        shown = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConversionError(f"{what} returns {shown} for a batch of {batch}; it must return [B, {dims(shape)}]")
    if value[0].numel() != math.prod(shape):
        raise ConversionError(
            f"{what} returns {list(value.shape)} for a batch of {batch}: {value[0].numel()} values a sample where "
            f"the stated shape {list(shape)} has {math.prod(shape)}; state the shape its output has"
        )
    return value


def pair(value: Any, what: str, names: str) -> tuple[Any, Any]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ConversionError(f"{what} must return a pair ({names}), not {type(value).__name__}")
    return value[0], value[1]


def dims(shape: Sequence[int]) -> str:
    return ", ".join(map(str, shape))


class Energy(nn.Module):
    """x [B, *shape] (and y [B] when conditional) -> E [B]; `negated`: the user's module returns -E (a log density
    up to a constant)."""

    def __init__(self, call: Call, negated: bool) -> None:
        super().__init__()
        self.call, self.sign = call, -1.0 if negated else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sign * self.call(x).reshape(x.shape[0])


class ConditionalEnergy(Energy):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.sign * self.call(x, y).reshape(x.shape[0])


class Generator(nn.Module):
    """z [B, latent_dim] -> x [B, *shape]: z reshaped to what the user's generator takes ([B, nz, 1, 1] for a DCGAN)
    and its output to the data's shape."""

    def __init__(self, call: Call, latent_shape: Sequence[int], shape: Sequence[int]) -> None:
        super().__init__()
        self.call, self.latent_shape, self.shape = call, tuple(latent_shape), tuple(shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.call(z.reshape(z.shape[0], *self.latent_shape)).reshape(z.shape[0], *self.shape)


class Critic(nn.Module):
    """x [B, *shape] -> d(x) [B]."""

    def __init__(self, call: Call) -> None:
        super().__init__()
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x).reshape(x.shape[0])


class Units(nn.Module):
    """The affine map between the served range and the range the user's flow works in (`trained`), applied to its
    data and to its log-densities: x_served = low + ratio (x - trained_low), log p_served = log p - D log ratio."""

    def __init__(self, call: Call, shape: Sequence[int], flat: bool, served: Range, trained: Range) -> None:
        super().__init__()
        self.call, self.shape, self.flat = call, tuple(shape), flat
        self.low, self.trained_low = float(served[0]), float(trained[0])
        self.ratio = (served[1] - served[0]) / (trained[1] - trained[0])
        self.log_det = math.prod(shape) * math.log(self.ratio)  # nats a sample

    def taken(self, value: torch.Tensor) -> torch.Tensor:
        return value.flatten(1) if self.flat else value


class Inverse(Units):
    """z [B, *shape] -> (x [B, *shape], log p(x) [B]) in the served units."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_prob = self.call(self.taken(z))
        x = self.low + self.ratio * (x.reshape(z.shape[0], *self.shape) - self.trained_low)
        return x, log_prob.reshape(z.shape[0]) - self.log_det


class Forward(Units):
    """x [B, *shape] in the served units -> (z [B, *shape], log|det dz/dx| [B])."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trained = self.trained_low + (x - self.low) / self.ratio
        z, log_det = self.call(self.taken(trained))
        return z.reshape(x.shape[0], *self.shape), log_det.reshape(x.shape[0]) - self.log_det


class Dequantizer(Units):
    """(x [B, *shape] the levels' values in the served units, eps [B, *shape]) -> (u [B, *shape], log q(u | x) [B]):
    your module sees x in its own units; u (the offset within each level's bin) and log q are the same in any range."""

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, log_q = self.call(self.taken(self.trained_low + (x - self.low) / self.ratio), self.taken(eps))
        return u.reshape(x.shape), log_q.reshape(x.shape[0])


def dequantizer_example(shape: Sequence[int], data_range: Range, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, eps) [2, *shape] each: seeded levels' values in the served range, and standard normal noise."""
    generator = torch.Generator().manual_seed(0)
    level = torch.randint(0, levels, (2, *shape), generator=generator).float()
    x = data_range[0] + level / (levels - 1) * (data_range[1] - data_range[0])
    return x, torch.randn(2, *shape, generator=generator)


def checked_dequantizer(value: Any, batch: int, shape: Sequence[int]) -> None:
    """ConversionError unless the wrapped dequantizer returned (u [batch, *shape] within [0, 1], log q [batch])."""
    u, log_q = pair(value, "the dequantizer", "u, log q(u | x)")
    sized(u, batch, shape, "the dequantizer's u")
    per_sample(log_q, batch, "the dequantizer's log q(u | x)", "log q(u | x) is one value a sample, in nats")
    if bool(torch.isfinite(u).all()) and (u.min().item() < 0 or u.max().item() > 1):
        raise ConversionError(
            f"the dequantizer's u spans [{u.min().item():.4g}, {u.max().item():.4g}]; u is the offset within each "
            "level's bin, in [0, 1]: end it in a sigmoid"
        )


class Field(nn.Module):
    """v(x [B, *shape], t [B] (, y [B])) -> v [B, *shape]."""

    def __init__(self, call: Call) -> None:
        super().__init__()
        self.call = call

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.call(x, t).reshape(x.shape)


class ConditionalField(Field):
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.call(x, t, y).reshape(x.shape)
