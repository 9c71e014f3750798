"""How each family is sampled by default: one typed config per family, stored in the checkpoint.

Training writes these into `ModelConfig.sampler`; `python -m training sample/evaluate`, the server's
request handling and its worker read them back here and nowhere else. `to_dict` stamps a schema
version; `from_dict` reads every checkpoint written so far (those have no version: version 1), takes the
dataclass default for a missing key and refuses a key it does not know. A config is data from a file, so
every value is checked at construction: its type, and for a setting a request may override, the same
bounds the request schema applies (service/http/schemas.py reads them from here).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

SAMPLER_SCHEMA = 1
VERSION_KEY = "schema_version"
INITS = ("noise", "buffer")
PRIORS = ("uniform", "gaussian")
UNLABELLED = ("null", "random")  # a conditional model asked for no label: its null label, or a random class
ODE_SOLVERS = ("euler", "midpoint", "heun")  # training/sampling/ode.py steps by each
CRITIC_OUTPUTS = ("logit", "probability")  # what a GAN's exported critic returns; a probability is served as its logit
INT32_MAX = 2**31 - 1  # every integer setting (and request field) fits int32


@dataclass(frozen=True)
class Bounds:
    """Where a numeric setting must lie: finite, and within the bounds given (None: no bound on that side)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def admits(self, value: float) -> bool:
        return (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
        )

    def __str__(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else "(-inf"
        return f"{low}, {self.le}]" if self.le is not None else f"{low}, inf)"


# The settings a request may also send: where float32 holds them and the sampler still makes sense, so no
# default, like no request, overflows on the device (step_size 1e39 would fail a whole shared batch).
STEPS = Bounds(ge=0, le=INT32_MAX)  # a request's; 0 is a GAN's plain pass, an EBM takes at least one
STEP_SIZE = Bounds(gt=0, le=1000)
NOISE = Bounds(ge=0, le=10)  # std of the noise per step; the data range is about [-1, 1]
MOMENTUM = Bounds(ge=0, le=0.999)  # heavy-ball Langevin; float32 < 1
STEP_DECAY = Bounds(gt=0, le=1)  # a step size that shrinks step by step (1: constant)
GUIDANCE = Bounds(ge=0, le=20)
TEMPERATURE = Bounds(ge=0.001, le=100)
TOLERANCE = Bounds(ge=0, le=10)  # RMS move per step in the data range's units; 0: no stop, every chain runs `steps`
# Settings only a file gives.
CHAIN_STEPS = Bounds(ge=1, le=INT32_MAX)  # an EBM's or a CNF's default steps
POSITIVE = Bounds(gt=0)
PROBABILITY = Bounds(ge=0, le=1)
SIZE = Bounds(ge=1, le=INT32_MAX)


@functools.cache
def field_types(kind: type) -> dict[str, tuple[tuple[type, ...], bool]]:
    """Each field's allowed types and whether None is allowed, from its annotation ("float | None", ...)."""
    found = {}
    fields = {item.name for item in dataclasses.fields(kind)}  # not the ClassVars (BOUNDS, CHOICES)
    for name, hint in typing.get_type_hints(kind).items():
        if name not in fields:
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = typing.get_args(hint) if union else (hint,)
        found[name] = (tuple(item for item in kinds if item is not type(None)), type(None) in kinds)
    return found


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def check_values(config: object, bounds: dict[str, Bounds]) -> None:
    """ValueError naming the first field of a sampler config whose value is not of its annotated type
    (an integer is no bool, a number no string) or lies outside its bounds."""
    kind: type = type(config)
    for name, (kinds, optional) in field_types(kind).items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        if bool in kinds:
            fits, what = isinstance(value, bool), "true or false"
        elif int in kinds:
            fits, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif float in kinds:
            fits, what = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        else:
            fits, what = isinstance(value, str), "a string"
        if name in bounds:
            what = f"{what} in {bounds[name]}"
            fits = fits and bounds[name].admits(value)
        if not fits:
            raise ValueError(f"sampler {name} must be {what}{' or null' if optional else ''}, not {_shown(value)}")


def check_choices(config: object, choices: dict[str, tuple[str, ...]]) -> None:
    """ValueError naming the first word-valued field of a sampler config that is none of its choices."""
    for name, options in choices.items():
        value = getattr(config, name)
        if value is not None and value not in options:
            listed = " or ".join(repr(option) for option in options)
            raise ValueError(f"sampler {name} must be {listed}, not {_shown(value)}")


@dataclass(frozen=True)
class EBMSampler:
    """Langevin sampling of an energy-based model. Defaults from the UvA deep-EBM tutorial on MNIST (itself
    after Du & Mordatch 2019)."""

    steps: int = 60  # Langevin steps of a request that does not say (with a tolerance: the most a chain runs)
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
    nesterov: bool = False  # with momentum: the gradient at the look-ahead x + momentum * v (Nesterov; EqM's sampler)
    step_decay: float = 1.0  # larger steps first: a chain's step t (from 0) moves by step_size * step_decay**t
    clamp: bool = True  # clamp chains into the data range at every step (False: only the returned images)
    restart_prob: float = 0.05  # fraction of buffer-started chains restarted from noise
    buffer_capacity: int | None = None  # replay-buffer slots a server keeps (None: the checkpoint's buffer's, 8192)
    tolerance: float = 0.0  # a chain stops once its RMS move in a step is below this (training/sampling/langevin.py)
    train_steps: int | None = None  # steps per training iteration (recorded only)

    # Where each numeric key must lie and what each word-valued key may be (docs/sampler-keys.md lists both).
    BOUNDS: ClassVar[dict[str, Bounds]] = {
        "steps": CHAIN_STEPS,
        "step_size": STEP_SIZE,
        "noise": NOISE,
        "grad_clip": POSITIVE,
        "temperature": TEMPERATURE,
        "prior_std": POSITIVE,
        "guidance": GUIDANCE,
        "momentum": MOMENTUM,
        "step_decay": STEP_DECAY,
        "restart_prob": PROBABILITY,
        "buffer_capacity": SIZE,
        "tolerance": TOLERANCE,
        "train_steps": STEPS,
    }
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"init": INITS, "prior": PRIORS, "unlabelled": UNLABELLED}

    def __post_init__(self) -> None:
        check_values(self, self.BOUNDS)
        check_choices(self, self.CHOICES)


@dataclass(frozen=True)
class GANSampler:
    """One generator pass G(z), z ~ N(0, temperature^2 I); with `steps` > 0 and a saved critic, z is first
    refined by Langevin dynamics on E(z) = ||z||^2 / 2 - d(G(z)) (DDLS, Che et al. 2020; training/sampling/ddls.py)."""

    latent_dim: int = 128  # size of z
    temperature: float = 1.0  # scales z (the truncation-like trick of Brock et al. 2019, without truncation)
    weights: str = "ema"  # "ema": the generator's exponential moving average (Karras et al. 2018) | "raw"
    steps: int = 0  # DDLS: Langevin steps on the latent (0: one plain generator pass)
    step_size: float = 0.01  # DDLS: z <- z - step_size * grad E(z) / temperature
    noise: float = 0.1  # DDLS: std of the Gaussian noise added to z before each gradient step
    critic_output: str = "logit"  # exported critic NAME.critic.pt2: "logit" d(x) | "probability" sigmoid(d(x))

    BOUNDS: ClassVar[dict[str, Bounds]] = {
        "latent_dim": SIZE,
        "temperature": TEMPERATURE,
        "steps": STEPS,
        "step_size": STEP_SIZE,
        "noise": NOISE,
    }
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"weights": ("ema", "raw"), "critic_output": CRITIC_OUTPUTS}

    def __post_init__(self) -> None:
        check_values(self, self.BOUNDS)
        check_choices(self, self.CHOICES)


@dataclass(frozen=True)
class FlowSampler:
    """One inverse pass of a normalizing flow from z ~ base scaled by the temperature (Kingma & Dhariwal 2018)."""

    temperature: float = 1.0  # scales the base sample (Glow samples at 0.7, NICE at 0.8); a CNF: the prior's std
    base: str | None = None  # recorded only: the module's own base distribution (its arch) is what samples
    # A continuous normalizing flow (arch cnf) integrates its ODE instead; exact-inverse flows leave these unset.
    steps: int | None = None  # CNF: ODE solver steps from the prior (t = 0) to the data (t = 1)
    solver: str | None = None  # CNF: euler | midpoint | heun (training/sampling/ode.py)
    guidance: float = 1.0  # conditional CNF, labelled chains: v(x, t) + w (v(x, t, y) - v(x, t)); 1: plain v(x, t, y)
    unlabelled: str = "null"  # conditional CNF asked for no label: "null" label (v(x, t)) | "random" class per chain

    BOUNDS: ClassVar[dict[str, Bounds]] = {"temperature": TEMPERATURE, "steps": CHAIN_STEPS, "guidance": GUIDANCE}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"solver": ODE_SOLVERS, "unlabelled": UNLABELLED}

    def __post_init__(self) -> None:
        check_values(self, self.BOUNDS)
        if (self.steps is None) != (self.solver is None):
            raise ValueError(f"sampler steps and solver are set together (a CNF) or not at all; got {self}")
        check_choices(self, self.CHOICES)


SamplerConfig = EBMSampler | GANSampler | FlowSampler
SAMPLERS: dict[str, type[EBMSampler] | type[GANSampler] | type[FlowSampler]] = {
    "ebm": EBMSampler,
    "gan": GANSampler,
    "flow": FlowSampler,
}
Config = TypeVar("Config", bound=SamplerConfig)


def from_dict(kind: type[Config], raw: dict[str, Any]) -> Config:
    """A sampler config from a checkpoint's `sampler` dict; ValueError naming unknown keys, a bad version or
    a bad value."""
    if not isinstance(raw, dict):
        raise ValueError(f"sampler settings must be an object of names and values, not a {type(raw).__name__}")
    values = dict(raw)
    version = values.pop(VERSION_KEY, SAMPLER_SCHEMA)
    if version != SAMPLER_SCHEMA:
        raise ValueError(f"sampler schema_version {version!r} is not supported (this version reads {SAMPLER_SCHEMA})")
    known = {item.name for item in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        shown = unknown[:5] + (["..."] if len(unknown) > 5 else [])
        raise ValueError(
            f"sampler settings {shown} are not known to {kind.__name__}; known: {', '.join(sorted(known))}"
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
