"""How each family is sampled by default: one typed config per family, stored in the checkpoint.

Training writes these into `ModelConfig.sampler`; `python -m training sample/evaluate`, the server's
request handling and its worker read them back here and nowhere else. `to_dict` stamps a schema
version; `from_dict` reads every checkpoint written so far (those have no version: version 1), takes the
dataclass default for a missing key and refuses a key it does not know.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

SAMPLER_SCHEMA = 1
VERSION_KEY = "schema_version"
INITS = ("noise", "buffer")
PRIORS = ("uniform", "gaussian")
ODE_SOLVERS = ("euler", "midpoint", "heun")  # training/ode.py steps by each


@dataclass(frozen=True)
class EBMSampler:
    """Langevin sampling of an energy-based model. Defaults from the UvA deep-EBM tutorial on MNIST (itself
    after Du & Mordatch 2019)."""

    steps: int = 60  # Langevin steps of a request that does not say
    step_size: float = 10.0  # x <- x - step_size * clip(grad E / T)
    noise: float = 0.005  # std of the Gaussian noise added before each gradient step (0: gradient descent)
    grad_clip: float | None = 0.03  # elementwise clip of the gradient; None: no clipping
    temperature: float = 1.0  # the gradient is divided by it
    init: str = "noise"  # where a request starts by default: "noise" | "buffer" (the replay buffer)
    prior: str = "uniform"  # what "noise" draws from: "uniform" over the data range | "gaussian" N(0, prior_std^2 I)
    prior_std: float = 1.0  # standard deviation of the "gaussian" prior (an EqM energy is trained against it)
    unlabelled: str = "null"  # a conditional energy asked for no label: "null" label (E(x)) | "random" class per chain
    guidance: float = 1.0  # labelled chains of a conditional energy: E(x) + w (E(x, y) - E(x)); 1: plain E(x, y)
    momentum: float = 0.0  # heavy ball: v <- momentum * v - step_size * grad; x <- x + v (0: plain steps)
    clamp: bool = True  # clamp chains into the data range at every step (False: only the returned images)
    restart_prob: float = 0.05  # fraction of buffer-started chains restarted from noise
    train_steps: int | None = None  # steps per training iteration (recorded only)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"sampler init must be one of {', '.join(INITS)}, not {self.init!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"sampler prior must be one of {', '.join(PRIORS)}, not {self.prior!r}")
        if self.unlabelled not in ("null", "random"):
            raise ValueError(f"sampler unlabelled must be 'null' or 'random', not {self.unlabelled!r}")
        if not self.guidance >= 0.0:
            raise ValueError(f"sampler guidance must be 0 or more, not {self.guidance}")
        if not self.prior_std > 0.0:
            raise ValueError(f"sampler prior_std must be positive, not {self.prior_std}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"sampler momentum must lie in [0, 1), not {self.momentum}")


@dataclass(frozen=True)
class GANSampler:
    """One generator pass G(z), z ~ N(0, temperature^2 I); with `steps` > 0 and a saved critic, z is first
    refined by Langevin dynamics on E(z) = ||z||^2 / 2 - d(G(z)) (DDLS, Che et al. 2020; training/ddls.py)."""

    latent_dim: int = 128  # size of z
    temperature: float = 1.0  # scales z (the truncation-like trick of Brock et al. 2019, without truncation)
    weights: str = "ema"  # "ema": the generator's exponential moving average (Karras et al. 2018) | "raw"
    steps: int = 0  # DDLS: Langevin steps on the latent (0: one plain generator pass)
    step_size: float = 0.01  # DDLS: z <- z - step_size * grad E(z) / temperature
    noise: float = 0.1  # DDLS: std of the Gaussian noise added to z before each gradient step

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"sampler latent_dim must be a positive integer, not {self.latent_dim}")
        if self.steps < 0 or not self.step_size > 0 or not self.noise >= 0:
            raise ValueError(
                f"sampler DDLS settings need steps >= 0, step_size > 0, noise >= 0; got steps {self.steps}, "
                f"step_size {self.step_size}, noise {self.noise}"
            )
        if self.weights not in ("ema", "raw"):
            raise ValueError(f"sampler weights must be 'ema' or 'raw', not {self.weights!r}")


@dataclass(frozen=True)
class FlowSampler:
    """One inverse pass of a normalizing flow from z ~ base scaled by the temperature (Kingma & Dhariwal 2018)."""

    temperature: float = 1.0  # scales the base sample (Glow samples at 0.7, NICE at 0.8); a CNF: the prior's std
    base: str | None = None  # recorded only: the module's own base distribution (its arch) is what samples
    # A continuous normalizing flow (arch cnf) integrates its ODE instead; exact-inverse flows leave these unset.
    steps: int | None = None  # CNF: ODE solver steps from the prior (t = 0) to the data (t = 1)
    solver: str | None = None  # CNF: euler | midpoint | heun (training/ode.py)
    guidance: float = 1.0  # conditional CNF, labelled chains: v(x, t) + w (v(x, t, y) - v(x, t)); 1: plain v(x, t, y)
    unlabelled: str = "null"  # conditional CNF asked for no label: "null" label (v(x, t)) | "random" class per chain

    def __post_init__(self) -> None:
        self._check_ode_settings()

    def _check_ode_settings(self) -> None:
        """The CNF fields (kept apart so that checks of the other fields can sit beside them in __post_init__)."""
        if (self.steps is None) != (self.solver is None):
            raise ValueError(f"sampler steps and solver are set together (a CNF) or not at all; got {self}")
        if self.steps is not None and (type(self.steps) is not int or self.steps < 1):
            raise ValueError(f"sampler steps must be a positive integer, not {self.steps!r}")
        if self.solver is not None and self.solver not in ODE_SOLVERS:
            raise ValueError(f"sampler solver must be one of {', '.join(ODE_SOLVERS)}, not {self.solver!r}")
        if not self.guidance >= 0.0:
            raise ValueError(f"sampler guidance must be 0 or more, not {self.guidance}")
        if self.unlabelled not in ("null", "random"):
            raise ValueError(f"sampler unlabelled must be 'null' or 'random', not {self.unlabelled!r}")


SamplerConfig = EBMSampler | GANSampler | FlowSampler
SAMPLERS: dict[str, type[EBMSampler] | type[GANSampler] | type[FlowSampler]] = {
    "ebm": EBMSampler,
    "gan": GANSampler,
    "flow": FlowSampler,
}
Config = TypeVar("Config", bound=SamplerConfig)


def from_dict(kind: type[Config], raw: dict[str, Any]) -> Config:
    """A sampler config from a checkpoint's `sampler` dict; ValueError naming unknown keys or a bad version."""
    values = dict(raw)
    version = values.pop(VERSION_KEY, SAMPLER_SCHEMA)
    if version != SAMPLER_SCHEMA:
        raise ValueError(f"sampler schema_version {version!r} is not supported (this version reads {SAMPLER_SCHEMA})")
    known = {item.name for item in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"sampler settings {unknown} are not known to {kind.__name__}; known: {', '.join(sorted(known))}"
        )
    try:
        return kind(**values)
    except TypeError as error:
        raise ValueError(f"sampler settings for {kind.__name__}: {error}") from error


def to_dict(config: SamplerConfig) -> dict[str, Any]:
    """The JSON-able dict stored as `ModelConfig.sampler`, with its schema version."""
    return {**dataclasses.asdict(config), VERSION_KEY: SAMPLER_SCHEMA}


def sampler_for(family: str, raw: dict[str, Any]) -> SamplerConfig:
    """The family's sampler config from a checkpoint's `sampler` dict."""
    if family not in SAMPLERS:
        raise ValueError(f"family {family!r} has no sampler; expected one of {', '.join(SAMPLERS)}")
    return from_dict(SAMPLERS[family], raw)
