"""The one ODE step of a continuous normalizing flow, and the fixed-step loop around it.

dx/dt = v(x, t) from t = 0 (the prior) to t = 1 (the data). `ode_step` advances every chain of a batch by
its own dt from its own t, so a server can batch chains at different times; `integrate` is the plain loop
with a k-diffusion style callback (Karras et al. 2022, `sample_euler`/`sample_heun`), used by the CLI,
evaluate and the trainer's grids alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


# --- An adaptive solver for what needs a tolerance, not a step count (the CNF likelihood) ---------------

# Dormand & Prince (1980) 5(4): the nodes, the stage matrix, the 5th-order weights (also the 7th stage, so the
# last evaluation of a step is the first of the next: "first same as last") and the 5th - 4th order weights.
_DOPRI_NODES = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DOPRI_STAGES = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DOPRI_ERROR = (
    35 / 384 - 5179 / 57600,
    0.0,
    500 / 1113 - 7571 / 16695,
    125 / 192 - 393 / 640,
    -2187 / 6784 + 92097 / 339200,
    11 / 84 - 187 / 2100,
    -1 / 40,
)
# (state [b, N], times [b], rows [b] of the original batch) -> d state / dt [b, N]: rows let the function
# pick each sample's own label or probe when only the samples still integrating are evaluated
RowsField = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ErrorNorm = Callable[[torch.Tensor], torch.Tensor]  # error / tolerance scale [b, N] -> [b]; <= 1 accepts


def rms_norm(scaled_error: torch.Tensor) -> torch.Tensor:
    return scaled_error.pow(2).mean(dim=1).sqrt()


@dataclass
class AdaptiveSolution:
    """Where an adaptive solve ended, and what it cost each sample."""

    state: torch.Tensor  # [B, N] at t1
    evaluations: torch.Tensor  # [B] evaluations of the field each sample took part in (NFE)
    accepted: torch.Tensor  # [B] accepted steps
    rejected: torch.Tensor  # [B] rejected steps
    batch_evaluations: int  # batched calls of the field (samples still integrating share each call)


@dataclass
class Dopri5Rows:
    """Per-sample state of adaptive solves, row by row: every row has its own time, step size and last slope,
    so rows of different solves can share a batch (`cat`) for one attempted step and leave it again (`take`,
    `put`): the server's likelihood pool steps them so, `dopri5` all at once, with the same numbers per row."""

    y: torch.Tensor  # [B, N]
    t: torch.Tensor  # [B] float64
    step: torch.Tensor  # [B] float64, > 0: the next step's size
    slopes: torch.Tensor  # [B, N] f(y, t): first same as last
    evaluations: torch.Tensor  # [B] int64 NFE
    accepted: torch.Tensor  # [B] int64
    rejected: torch.Tensor  # [B] int64

    FIELDS = ("y", "t", "step", "slopes", "evaluations", "accepted", "rejected")

    def take(self, rows: torch.Tensor) -> Dopri5Rows:
        return Dopri5Rows(*(getattr(self, name)[rows] for name in self.FIELDS))

    def put(self, rows: torch.Tensor, part: Dopri5Rows) -> None:
        for name in self.FIELDS:
            getattr(self, name)[rows] = getattr(part, name)

    @staticmethod
    def cat(parts: list[Dopri5Rows]) -> Dopri5Rows:
        return Dopri5Rows(*(torch.cat([getattr(part, name) for part in parts]) for name in Dopri5Rows.FIELDS))

    def split(self, sizes: list[int]) -> list[Dopri5Rows]:
        columns = [getattr(self, name).split(sizes) for name in self.FIELDS]
        return [Dopri5Rows(*values) for values in zip(*columns, strict=True)]

    def unfinished(self, t0: float, t1: float) -> torch.Tensor:
        """[B] bool: the rows not yet at t1."""
        direction = 1.0 if t1 >= t0 else -1.0
        return (t1 - self.t) * direction > 1e-12 * max(1.0, abs(t1 - t0))


def _check_tolerances(rtol: float, atol: float) -> None:
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"an adaptive ODE solve needs rtol > 0 and atol > 0, not rtol={rtol}, atol={atol}")


def dopri5_start(
    field: RowsField,
    state: torch.Tensor,  # [B, N] at t0
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    error_norm: ErrorNorm = rms_norm,
) -> Dopri5Rows:
    """Rows at t0 with Hairer's initial step (two evaluations of the field): h0 from the sizes of y and f, then
    a second-derivative estimate from one Euler step (Hairer, Norsett & Wanner, Solving ODEs I, II.4)."""
    _check_tolerances(rtol, atol)
    batch, device = state.shape[0], state.device
    direction = 1.0 if t1 >= t0 else -1.0
    y = state.clone()
    t = torch.full((batch,), float(t0), dtype=torch.float64, device=device)
    evaluations = torch.full((batch,), 2, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    first = field(y, t.to(y.dtype), rows)  # [B, N]
    scale = atol + rtol * y.abs()
    d0, d1 = error_norm(y / scale), error_norm(first / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).double()
    h0 = h0.clamp(max=abs(t1 - t0))
    probe = field(y + direction * h0[:, None].to(y.dtype) * first, (t + direction * h0).to(y.dtype), rows)
    d2 = error_norm((probe - first) / scale).double() / h0
    largest = torch.maximum(d1.double(), d2)
    h1 = torch.where(largest <= 1e-15, torch.maximum(h0 * 1e-3, torch.full_like(h0, 1e-6)), (0.01 / largest) ** 0.2)
    step = torch.minimum(100 * h0, h1).clamp(max=abs(t1 - t0))  # [B] sizes, > 0
    zeros = torch.zeros_like(evaluations)
    return Dopri5Rows(y, t, step, first, evaluations, zeros, zeros.clone())


def dopri5_attempt(
    field: RowsField,
    solve: Dopri5Rows,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    error_norm: ErrorNorm = rms_norm,
) -> int:
    """One attempted Dormand-Prince 5(4) step of every row not yet at t1, in place: accepted when
    error_norm(err / (atol + rtol max(|y|, |y_new|))) <= 1; the step grows or shrinks by 0.9 norm^(-1/5)
    within [0.2, 10]; the last step lands on t1. Returns the batched calls of the field (6, or 0 when every row
    is at t1)."""
    direction = 1.0 if t1 >= t0 else -1.0
    y, t, step = solve.y, solve.t, solve.step
    remaining = (t1 - t) * direction  # [B] >= 0
    rows = solve.unfinished(t0, t1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return 0
    h = torch.minimum(step[rows], remaining[rows])  # [b]: the last step lands on t1
    signed = (direction * h)[:, None].to(y.dtype)  # [b, 1]
    y0, times = y[rows], t[rows]
    stages = [solve.slopes[rows]]
    for node, weights in zip(_DOPRI_NODES[1:], _DOPRI_STAGES[1:], strict=True):
        increment = sum(w * k for w, k in zip(weights, stages, strict=False) if w != 0.0)
        stages.append(field(y0 + signed * increment, (times + direction * node * h).to(y.dtype), rows))
    solve.evaluations[rows] += 6
    y_new = y0 + signed * sum(w * k for w, k in zip(_DOPRI_STAGES[6], stages, strict=False) if w != 0.0)
    error = signed * sum(w * k for w, k in zip(_DOPRI_ERROR, stages, strict=True) if w != 0.0)
    norm = error_norm(error / (atol + rtol * torch.maximum(y0.abs(), y_new.abs()))).double()  # [b]
    ok = norm <= 1.0
    factor = (0.9 * norm.clamp(min=1e-10) ** -0.2).clamp(0.2, 10.0)
    step[rows] = h * torch.where(ok, factor, factor.clamp(max=1.0))
    taken = rows[ok]
    y[taken] = y_new[ok]
    landed = h[ok] >= remaining[taken]  # the last step: exactly t1, no rounding short of it
    t[taken] = torch.where(landed, torch.full_like(h[ok], float(t1)), t[taken] + direction * h[ok])
    solve.slopes[taken] = stages[6][ok]  # first same as last
    solve.accepted[taken] += 1
    solve.rejected[rows[~ok]] += 1
    if bool((step[rows] < 1e-12).any()):
        raise FloatingPointError("dopri5: the step size fell below 1e-12; the field is not finite or too stiff")
    return 6


def dopri5(
    field: RowsField,
    state: torch.Tensor,  # [B, N] at t0
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    error_norm: ErrorNorm = rms_norm,
    max_steps: int = 10_000,
) -> AdaptiveSolution:
    """Dormand-Prince 5(4) with per-sample error control (Hairer, Norsett & Wanner, Solving ODEs I, II.4):
    every sample has its own time and step size (`dopri5_start`, then `dopri5_attempt` until every sample is
    at t1); samples that reached t1 leave the batch. Integrates backwards when t1 < t0."""
    solve = dopri5_start(field, state, t0, t1, rtol, atol, error_norm)
    calls = 2
    for _ in range(max_steps):
        made = dopri5_attempt(field, solve, t0, t1, rtol, atol, error_norm)
        if made == 0:
            break
        calls += made
    else:
        raise RuntimeError(f"dopri5: not at t={t1} after {max_steps} steps (rtol {rtol}, atol {atol})")
    return AdaptiveSolution(solve.y, solve.evaluations, solve.accepted, solve.rejected, calls)
