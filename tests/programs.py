"""Models written as a user outside this project would: a torch.export program of their own module and its
JSON sidecar, for the exported-model tests."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
from torch import nn

SHAPE = (1, 8, 8)
DATA = {"shape": list(SHAPE), "range": [-1.0, 1.0]}


class WellEnergy(nn.Module):
    """A user's own energy, known to no module of this project: a small MLP over a quadratic well."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.SiLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 8, 8] -> [B]
        return self.net(x).squeeze(1) + 0.5 * x.flatten(1).pow(2).sum(1)


class TinyGenerator(nn.Module):
    """A user's generator: z [B, 4] -> x [B, 1, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Unflatten(1, SHAPE))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, 4] -> [B, 1, 8, 8]
        return self.net(z)


class TinyCritic(nn.Module):
    """A user's discriminator: x [B, 1, 8, 8] -> its logit [B] (or, `probability`, the sigmoid of it)."""

    def __init__(self, probability: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)  # a logit critic and a probability critic of the same weights
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.probability = probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 8, 8] -> [B]
        logit = 3.0 * self.net(x).squeeze(1)
        return torch.sigmoid(logit) if self.probability else logit


GAN_SIDECAR = {"family": "gan", "data": DATA, "sampler": {"latent_dim": 4, "steps": 5, "step_size": 0.05, "noise": 0.1}}


def save_program(module: nn.Module, example: tuple, path: Path, sidecar: dict | str | None, dynamic=True) -> Path:
    """What a user does: torch.export with a dynamic batch dimension, torch.export.save, a JSON sidecar."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    first = next(iter(inspect.signature(module.forward).parameters))  # x, or a generator's z
    shapes = {first: {0: batch}} if dynamic else None
    torch.export.save(torch.export.export(module.eval(), example, dynamic_shapes=shapes), path)
    if sidecar is not None:
        path.with_suffix(".json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    return path


def well_sidecar(**sampler) -> dict:
    return {"family": "ebm", "data": DATA, "sampler": {"steps": 6, "step_size": 0.05, "noise": 0.01, **sampler}}


class CouplingFlow(nn.Module):
    """A user's own RealNVP-style flow (Dinh et al. 2017), known to no module of this project, on 8-bit images
    dequantized into [0, 1) as (level + u) / 256: a logit, then affine couplings under alternating masks, a
    standard Gaussian base. Its log-densities are in nats over [0, 1)^D, its own units."""

    def __init__(self, dim: int = 64, hidden: int = 64, couplings: int = 4, alpha: float = 0.05) -> None:
        super().__init__()
        self.alpha = alpha
        parity = torch.arange(dim) % 2
        self.register_buffer("masks", torch.stack([(parity + index) % 2 for index in range(couplings)]).float())
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * dim)) for _ in range(couplings)
        )

    def _logit_log_det(self, p: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B]
        return (math.log(1 - 2 * self.alpha) - p.log() - (-p).log1p()).sum(1)

    def _scale_shift(self, index: int, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.masks[index]
        scale, shift = self.nets[index](y * mask).chunk(2, dim=1)
        return torch.tanh(scale) * (1 - mask), shift * (1 - mask)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, D] in [0, 1) -> z [B, D], [B]
        p = self.alpha + (1 - 2 * self.alpha) * x
        y, log_det = p.log() - (-p).log1p(), self._logit_log_det(p)
        for index in range(len(self.nets)):
            scale, shift = self._scale_shift(index, y)
            y = y * scale.exp() + shift
            log_det = log_det + scale.sum(1)
        return y, log_det

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # z [B, D] -> x [B, D], encode's log det
        y, log_det = z, z.new_zeros(z.shape[0])
        for index in reversed(range(len(self.nets))):
            scale, shift = self._scale_shift(index, y)
            y = (y - shift) * (-scale).exp()
            log_det = log_det + scale.sum(1)
        p = torch.sigmoid(y)
        return (p - self.alpha) / (1 - 2 * self.alpha), log_det + self._logit_log_det(p)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:  # [B, D] in [0, 1) -> [B] nats
        z, log_det = self.encode(x)
        return gaussian_log_prob(z) + log_det


class DecodedFlow(nn.Module):
    """A user's sampling pass as they would write it: rows z [B, D] -> (x [B, D] in [0, 1), log p(x) over [0, 1))."""

    def __init__(self, flow: CouplingFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det = self.flow.decode(z)
        return x, gaussian_log_prob(z) + log_det


def gaussian_log_prob(z: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B]
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)


def blocks(n: int, seed: int, side: int = 8) -> torch.Tensor:
    """8-bit images [n, 1, side, side] (int64 levels): a bright rectangle on a dark, noisy background."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 40, (n, 1, side, side), generator=generator)
    for image in images:
        top, left = torch.randint(0, side // 2, (2,), generator=generator).tolist()
        height, width = torch.randint(2, side // 2 + 1, (2,), generator=generator).tolist()
        image[0, top : top + height, left : left + width] = torch.randint(180, 256, (1,), generator=generator)
    return images


def train_dequantized_flow(levels: torch.Tensor, steps: int = 400, seed: int = 0) -> CouplingFlow:
    """The user's training: maximum likelihood on (level + u) / 256, u ~ U[0, 1) drawn afresh each step."""
    torch.manual_seed(seed)
    flow = CouplingFlow(dim=levels[0].numel())
    optimizer = torch.optim.Adam(flow.parameters(), lr=2e-3)
    data = levels.flatten(1).float()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (64,))]
        loss = -flow.log_prob((batch + torch.rand_like(batch)) / 256).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return flow.eval()


class TinyDequantizer(nn.Module):
    """A user's variational dequantizer q(u | x) (Ho et al. 2019) for rows x [B, D] of level values k / 255 in [0, 1]:
    u = sigmoid(a(x) + e^b(x) l), l = logit(Phi(eps)) a standard logistic variable of eps ~ N(0, I), so that it starts
    (a = b = 0, the last layer zero) as uniform dequantization, log q = 0; log q(u | x) = log N(eps) - log|du/deps|."""

    def __init__(self, dim: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, D] each
        shift, log_scale = self.net(x).chunk(2, dim=1)
        log_scale = log_scale.clamp(-6, 2)
        below, above = torch.special.log_ndtr(eps), torch.special.log_ndtr(-eps)  # log Phi(eps), log(1 - Phi(eps))
        s = shift + log_scale.exp() * (below - above)
        log_q = below + above - log_scale - nn.functional.logsigmoid(s) - nn.functional.logsigmoid(-s)
        return torch.sigmoid(s), log_q.sum(1)


def train_variational_flow(
    levels: torch.Tensor, steps: int = 400, seed: int = 0
) -> tuple[CouplingFlow, TinyDequantizer]:
    """The user's training of a flow with variational dequantization: the flow and q(u | x) together, maximizing the
    bound E_q[log p((k + u) / 256) - log q(u | x)] with eps drawn afresh each step."""
    torch.manual_seed(seed)
    flow, dequantizer = CouplingFlow(dim=levels[0].numel()), TinyDequantizer(dim=levels[0].numel())
    optimizer = torch.optim.Adam([*flow.parameters(), *dequantizer.parameters()], lr=2e-3)
    data = levels.flatten(1).float()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (64,))]
        u, log_q = dequantizer(batch / 255, torch.randn_like(batch))
        loss = -(flow.log_prob((batch + u) / 256) - log_q).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return flow.eval(), dequantizer.eval()


def own_bits_per_dim(flow: CouplingFlow, levels: torch.Tensor, draws: int = 8) -> float:
    """The user's own test bits/dim: -log2 P(levels) / D from its density over [0, 1), whose bins are 1 / 256 wide,
    averaged over images and `draws` uniform dequantizations."""
    data, dim = levels.flatten(1).float(), levels[0].numel()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        total = sum(
            flow.log_prob((data + torch.rand(data.shape, generator=generator)) / 256).mean().item()
            for _ in range(draws)
        )
    return -(total / draws + dim * math.log(1 / 256)) / (dim * math.log(2))


class RangedInverse(nn.Module):
    """The user's flow exported over the data range [low, high]: z [B, *shape] -> (x in [low, high), log p(x)), its
    log p in nats over that range (the density over [0, 1) less D log(high - low))."""

    def __init__(self, flow: CouplingFlow, data_range: tuple[float, float]) -> None:
        super().__init__()
        self.flow, self.low, self.width = flow, data_range[0], data_range[1] - data_range[0]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit, log_det = self.flow.decode(z.flatten(1))
        log_prob = gaussian_log_prob(z.flatten(1)) + log_det - unit.shape[1] * math.log(self.width)
        return (self.low + self.width * unit).reshape(z.shape), log_prob


class RangedForward(RangedInverse):
    """Its data-to-noise program: x in [low, high) -> (z [B, *shape], log|det dz/dx| [B]); `lie` adds to the log
    det (a forward program that disagrees with its inverse)."""

    def __init__(self, flow: CouplingFlow, data_range: tuple[float, float], lie: float = 0.0) -> None:
        super().__init__(flow, data_range)
        self.lie = lie

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        z, log_det = self.flow.encode((x.flatten(1) - self.low) / self.width)
        return z.reshape(x.shape), log_det - z.shape[1] * math.log(self.width) + self.lie


class RangedDequantizer(nn.Module):
    """The user's dequantizer exported over [low, high]: (x the level values in [low, high], eps) -> (u, log q)."""

    def __init__(self, dequantizer: nn.Module, data_range: tuple[float, float]) -> None:
        super().__init__()
        self.dequantizer, self.low, self.width = dequantizer, data_range[0], data_range[1] - data_range[0]

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, log_q = self.dequantizer((x.flatten(1) - self.low) / self.width, eps.flatten(1))
        return u.reshape(x.shape), log_q


def save_flow_programs(
    flow: CouplingFlow,
    path: Path,
    data_range: tuple[float, float],
    lie: float = 0.0,
    dequantizer: nn.Module | None = None,
    **data,
) -> Path:
    """A user's export of the flow both ways, NAME.pt2 (noise -> data) and NAME.forward.pt2 (data -> noise), with
    its sidecar: levels 256, uniformly dequantized, over `data_range`; with `dequantizer` (rows in [0, 1]), its
    NAME.dequantizer.pt2 too and dequantization "variational"."""
    shape = (1, 8, 8)
    batch = torch.export.Dim("batch")
    if dequantizer is not None:
        example = (torch.rand(2, *shape), torch.randn(2, *shape))
        program = torch.export.export(
            RangedDequantizer(dequantizer, data_range), example, dynamic_shapes={"x": {0: batch}, "eps": {0: batch}}
        )
        torch.export.save(program, path.with_name(f"{path.stem}.dequantizer.pt2"))
        data = {"dequantization": "variational", **data}
    inverse = torch.export.export(
        RangedInverse(flow, data_range), (torch.zeros(2, *shape),), dynamic_shapes={"z": {0: batch}}
    )
    forward = torch.export.export(
        RangedForward(flow, data_range, lie), (torch.rand(2, *shape),), dynamic_shapes={"x": {0: batch}}
    )
    torch.export.save(forward, path.with_name(f"{path.stem}.forward.pt2"))
    torch.export.save(inverse, path)
    stated = {"shape": list(shape), "range": list(data_range), "levels": 256, "dequantization": "uniform", **data}
    path.with_suffix(".json").write_text(json.dumps({"family": "flow", "data": stated, "sampler": {}}))
    return path
