"""The one ODE step of a continuous normalizing flow, and the fixed-step loop around it.

dx/dt = v(x, t) from t = 0 (the prior) to t = 1 (the data). `ode_step` advances every chain of a batch by
its own dt from its own t, so a server can batch chains at different times; `integrate` is the plain loop
with a k-diffusion style callback (Karras et al. 2022, `sample_euler`/`sample_heun`), used by the CLI,
evaluate and the trainer's grids alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.models.cnf import VelocityField
from training.sampling.sampler_config import ODE_SOLVERS as SOLVERS

FIELD_EVALUATIONS = {"euler": 1, "midpoint": 2, "heun": 2}  # evaluations of v per step
OdeCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, x [B, *shape], t [B] after the step)


def checked_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"ODE solver must be one of {', '.join(SOLVERS)}, not {solver!r}")
    return solver


def _per_chain(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ...] broadcastable against x [B, *shape]."""
    return value.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def ode_step(field: VelocityField, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, solver: str) -> torch.Tensor:
    """x(t + dt) [B, *shape] from x(t) for times t [B] and steps dt [B]:
    euler x + dt v(x, t); midpoint x + dt v(x + dt/2 v(x, t), t + dt/2) (explicit RK2);
    heun x + dt/2 (v(x, t) + v(x + dt v(x, t), t + dt)) (the trapezoidal RK2)."""
    checked_solver(solver)
    step = _per_chain(dt, x)
    velocity = field(x, t)
    if solver == "euler":
        return x + step * velocity
    if solver == "midpoint":
        return x + step * field(x + 0.5 * step * velocity, t + 0.5 * dt)
    predicted = x + step * velocity
    return x + 0.5 * step * (velocity + field(predicted, t + dt))


def integrate(
    field: VelocityField,
    x: torch.Tensor,  # [B, *shape] at t = 0
    steps: int,
    solver: str = "midpoint",
    callback: OdeCallback | None = None,
) -> torch.Tensor:
    """x(1) [B, *shape]: `steps` equal steps of `ode_step` from t = 0; the callback sees every step's x."""
    if steps < 1:
        raise ValueError(f"an ODE needs at least 1 solver step, not {steps}")
    checked_solver(solver)
    batch = x.shape[0]
    dt = torch.full((batch,), 1.0 / steps, device=x.device)
    for step in range(steps):
        t = torch.full((batch,), step / steps, device=x.device)
        x = ode_step(field, x, t, dt, solver)
        if callback is not None:
            callback(step, x, t + dt)
    return x
