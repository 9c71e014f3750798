"""Serve your own model: `export_energy`, `export_gan`, `export_flow` and `export_velocity_field` take the
`nn.Module`s you trained in your own code, wrap them into the positional signature their family's program has
(docs/exporting.md), trace them with a dynamic batch dimension, and write `NAME.pt2`, its companions
(`NAME.critic.pt2`, `NAME.forward.pt2`, `NAME.dequantizer.pt2`) and its `NAME.json` sidecar. Before anything is
written where you asked, the bundle is loaded by the loader the server uses (training/runtime/load.py) from a
scratch folder: what it will serve is printed and returned, or `ConversionError` says why it refuses, and nothing
is left behind. Your modules are put in eval mode (their dropout and batch statistics as at inference) and traced
on the CPU in float32.

    from training.convert import export_energy
    export_energy(model, "checkpoints/my_energy.pt2", shape=(1, 28, 28), sampler={"steps": 60, "noise": 0.005})

Named `convert` (not `export`) so that it is not mistaken for `python -m training export`
(training/commands/export.py), which writes this project's own checkpoints; both write through
training/runtime/program_files.py.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.convert_modules import (
    Call,
    ConditionalEnergy,
    ConditionalField,
    ConversionError,
    Critic,
    Dequantizer,
    Energy,
    Field,
    Forward,
    Generator,
    Inverse,
    Range,
    checked_dequantizer,
    dequantizer_example,
    dims,
    pair,
    per_sample,
    sized,
)
from training.families import family_of
from training.models.flows import bits_per_dim
from training.runtime.checkpoint import CheckpointError, first_line
from training.runtime.exported import companion_paths
from training.runtime.exported_modules import ExportedFlow
from training.runtime.load import load_model
from training.runtime.loaded import LoadedModel
from training.runtime.program_files import check_program_path, trace_program, write_bundle
from training.sampling.sampler_config import VERSION_KEY

EXAMPLE_BATCH = 2  # the batch traced (and checked eagerly first); the server's probe then runs 2, 1 and 3


# --- tracing, writing, loading as the server does ------------------------------------------------------------


@dataclass(frozen=True)
class Converted:
    """What was written and what the server's loader made of it; `str()` is the report printed."""

    program: Path
    files: tuple[Path, ...]
    model: LoadedModel
    notes: tuple[str, ...]

    def __str__(self) -> str:
        model, data = self.model, self.model.config.data
        shown = family_of(model).shown_sampler(model)  # what applies to it as served, as GET /models shows it
        sampler = {key: value for key, value in shown.items() if key != VERSION_KEY}
        lines = [
            f"{self.program.stem}: served as family {model.config.family}, samples [{dims(model.shape)}] in "
            f"[{data.get('range', [-1.0, 1.0])[0]}, {data.get('range', [-1.0, 1.0])[1]}]"
            + (f", {len(data['classes'])} classes" if data.get("classes") else ""),
            *(f"  {note}" for note in self.notes),
            "  sampler defaults: " + ", ".join(f"{key}={value}" for key, value in sampler.items() if value is not None),
            "  files: " + ", ".join(path.name for path in self.files) + f" (in {self.program.parent})",
        ]
        return "\n".join(lines)


def _trace(module: nn.Module, example: tuple[torch.Tensor, ...], what: str) -> bytes:
    """`module` traced with a dynamic batch dimension in every input; one-line errors naming the fix."""
    batch = torch.export.Dim("batch", min=1)
    try:
        return trace_program(module.eval(), example, tuple({0: batch} for _ in example), what)
    except ValueError as error:
        text = str(error)
        if "batch" in text and any(word in text for word in ("specializ", "Constraints violated", "constant")):
            raise ConversionError(
                f"{what} fixes the batch size (torch.export: {text.split(': ', 1)[-1].split(' For more')[0][:160]}); "
                "use x.shape[0], x.flatten(1) or reshape(x.shape[0], -1) instead of a number of samples"
            ) from error
        raise ConversionError(
            f"{text[:300]}; make its forward a plain tensor computation (no Python branches on tensor values, "
            "no .item(), no NumPy)"
        ) from error


def _eager(module: nn.Module, example: tuple[torch.Tensor, ...], what: str) -> Any:
    """Run the wrapped module once as traced, so that a wrong shape is said in its own words before torch.export."""
    try:
        with torch.no_grad():
            return module.eval()(*example)
    except ConversionError:
        raise
    except Exception as error:
        raise ConversionError(f"{what} fails on a batch of {example[0].shape[0]}: {first_line(error)}") from error


def _publish(
    out: Path,
    sidecar: dict[str, Any],
    program: bytes,
    companions: dict[str, bytes],
    notes: list[str],
    quiet: bool,
    served: Callable[[LoadedModel], list[str]] | None = None,
) -> Converted:
    """Load the bundle from a scratch folder with the server's loader, then write it at `out`; the report (`served`:
    notes drawn from the loaded model)."""
    if out.with_suffix(".safetensors").exists():
        raise ConversionError(f"{out.stem}.safetensors is served under the same name; choose another name for {out}")
    with tempfile.TemporaryDirectory(prefix="samplebay-convert-") as folder:
        trial = Path(folder) / out.name
        write_bundle(trial, sidecar, program, companions)
        try:
            model = load_model(trial)
        except CheckpointError as error:
            raise ConversionError(f"the server would refuse {out.name}: {error}") from error
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path = write_bundle(out, sidecar, program, companions)
    files = (out, *(companion_paths(out)[role] for role in sorted(companions)), sidecar_path)
    converted = Converted(out, files, model, tuple(notes + (served(model) if served else [])))
    if not quiet:
        print(converted)
    return converted


def _data(shape: Sequence[int], data_range: Range, **more: Any) -> dict[str, Any]:
    stated = {"shape": [int(size) for size in shape], "range": [float(data_range[0]), float(data_range[1])]}
    return {**stated, **{key: value for key, value in more.items() if value is not None}}


def _in_range(shape: Sequence[int], data_range: Range) -> torch.Tensor:
    """An example batch of data inside the stated range (seeded: the trace is reproducible)."""
    generator = torch.Generator().manual_seed(0)
    unit = torch.rand(EXAMPLE_BATCH, *shape, generator=generator)
    return data_range[0] + (data_range[1] - data_range[0]) * unit


# --- the public helpers -----------------------------------------------------------------------------------------


def export_energy(
    energy: nn.Module | Callable[..., Any],
    out: str | Path,
    shape: Sequence[int],
    range: Range = (-1.0, 1.0),
    classes: Sequence[str] | None = None,
    sampler: dict[str, Any] | None = None,
    negated: bool = False,
    quiet: bool = False,
) -> Converted:
    """An energy E(x) (lower is likelier), called as `energy(x)` ([B] or [B, 1]), or `energy(x, y)` when `classes`
    names its classes (y = -1 asks for the unconditional energy: your module must take it). `negated`: it returns
    -E(x), a log density up to a constant (JEM's logsumexp of logits). `sampler`: Langevin defaults (docs/
    sampler-keys.md), e.g. {"steps": 60, "step_size": 10.0, "noise": 0.005}."""
    out = check_program_path(out)
    call = Call(energy, "the energy")
    example: tuple[torch.Tensor, ...] = (_in_range(shape, range),)
    if classes is not None:
        example = (*example, torch.tensor([0, -1]))
    fix = "an energy returns one value a sample, [B] or [B, 1] (sum or select the others in your module)"
    per_sample(_eager(call, example, "the energy"), EXAMPLE_BATCH, "the energy", fix)
    wrapper = Energy(call, negated) if classes is None else ConditionalEnergy(call, negated)
    program = _trace(wrapper, example, "the energy")
    sidecar = {
        "family": "ebm",
        "data": _data(shape, range, classes=None if classes is None else list(classes)),
        "sampler": dict(sampler or {}),
    }
    notes = ["E(x)" + (" = -(your module's output)" if negated else "") + ": Langevin chains differentiate it in x"]
    if classes is not None:
        notes.append(f"conditional: y in 0..{len(classes) - 1}, y = -1 the unconditional energy")
    return _publish(out, sidecar, program, {}, notes, quiet)


def export_gan(
    generator: nn.Module | Callable[..., Any],
    out: str | Path,
    shape: Sequence[int],
    latent_dim: int,
    critic: nn.Module | Callable[..., Any] | None = None,
    critic_output: str = "logit",
    latent_shape: Sequence[int] | None = None,
    range: Range = (-1.0, 1.0),
    sampler: dict[str, Any] | None = None,
    quiet: bool = False,
) -> Converted:
    """A generator z ~ N(0, I) -> x (any layout of the shape's values: flat rows are reshaped), called with z as
    `latent_shape` ([latent_dim] by default; (latent_dim, 1, 1) for a DCGAN's); and its critic (discriminator)
    x -> d(x), [B] or [B, 1], for DDLS and scores: its logit, or `critic_output="probability"` for one that ends
    in a sigmoid. `sampler`: DDLS defaults, e.g. {"steps": 50, "step_size": 0.01, "noise": 0.1}."""
    out = check_program_path(out)
    if critic_output not in ("logit", "probability"):
        raise ConversionError(f"critic_output must be 'logit' or 'probability', not {critic_output!r}")
    latent = tuple(latent_shape or (latent_dim,))
    if math.prod(latent) != latent_dim:
        raise ConversionError(f"latent_shape {list(latent)} does not hold latent_dim = {latent_dim} values")
    call = Call(generator, "the generator")
    z = torch.randn(EXAMPLE_BATCH, latent_dim, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            images = sized(call(z.reshape(EXAMPLE_BATCH, *latent)), EXAMPLE_BATCH, shape, "the generator")
    except ConversionError:
        raise
    except Exception as error:
        raise ConversionError(
            f"the generator fails on z [{EXAMPLE_BATCH}, {dims(latent)}]: {first_line(error)}; pass latent_shape= "
            f"the shape it takes z in, e.g. ({latent_dim}, 1, 1) for a DCGAN's"
        ) from error
    program = _trace(Generator(call, latent, shape), (z,), "the generator")
    companions: dict[str, bytes] = {}
    stated: dict[str, Any] = {"latent_dim": latent_dim}
    notes = [f"generator z [B, {latent_dim}] -> x"]
    if critic is not None:
        judge = Call(critic, "the critic")
        example = (images.reshape(EXAMPLE_BATCH, *shape).contiguous(),)
        fix = "a critic returns one value a sample, [B] or [B, 1]: its logit, or a probability (critic_output)"
        per_sample(_eager(judge, example, "the critic"), EXAMPLE_BATCH, "the critic", fix)
        companions["critic"] = _trace(Critic(judge), example, "the critic")
        if critic_output != "logit":
            stated["critic_output"] = critic_output
        notes.append(
            f"critic {out.stem}.critic.pt2 ({critic_output}" + (", served as its logit" if stated.get("critic_output")
            else "") + "): DDLS refinement (sampler steps) and /score's critic value"
        )  # fmt: skip
    else:
        notes.append("no critic: the plain generator pass; DDLS and /score need critic=")
    sidecar = {"family": "gan", "data": _data(shape, range), "sampler": {**stated, **(sampler or {})}}
    return _publish(out, sidecar, program, companions, notes, quiet)


def export_flow(
    inverse: nn.Module | Callable[..., Any],
    out: str | Path,
    shape: Sequence[int],
    forward: nn.Module | Callable[..., Any] | None = None,
    range: Range = (-1.0, 1.0),
    trained_range: Range | None = None,
    flat: bool = False,
    levels: int = 256,
    dequantization: str | None = None,
    base: str = "gaussian",
    sampler: dict[str, Any] | None = None,
    quiet: bool = False,
    dequantizer: nn.Module | Callable[..., Any] | None = None,
    dequantization_samples: int | None = None,
) -> Converted:
    """A normalizing flow: `inverse` z -> (x, log p(x)) (log p in nats, a density over the data as your module
    sees them), and optionally `forward` x -> (z, log|det dz/dx|), the data-to-noise pass that scores given images.
    `range` is what the server serves; `trained_range` the range your module works in (default: the same): the
    two are converted, x and log p and log det alike. `flat`: the module takes and returns rows [B, D].
    `levels`/`dequantization`: the data's discretization (docs/exporting.md, "Units of log p and bits/dim"):
    "uniform" by default, "variational" with `dequantizer` (x, eps) -> (u in [0, 1], log q(u | x)), x the levels'
    values in your module's units, eps ~ N(0, I) of x's shape; scores are then the variational bound, averaged over
    `dequantization_samples` draws (default 1)."""
    out = check_program_path(out)
    trained = tuple(trained_range or range)
    dequantization = dequantization or ("variational" if dequantizer is not None else "uniform")
    if dequantizer is not None and dequantization != "variational":
        raise ConversionError(f'a dequantizer serves dequantization="variational" (implied), not {dequantization!r}')
    if dequantization == "variational" and (dequantizer is None or forward is None):
        raise ConversionError(
            'dequantization="variational" scores images by the bound E_q[log p(x + u) - log q(u | x)]: pass '
            "dequantizer= ((x, eps) -> (u, log q(u | x))) and forward= (x -> (z, log det))"
        )
    inverse_wrapper = Inverse(Call(inverse, "the inverse flow"), shape, flat, range, trained)  # type: ignore[arg-type]
    z = torch.randn(EXAMPLE_BATCH, *shape, generator=torch.Generator().manual_seed(0))
    x, log_prob = pair(_eager(inverse_wrapper.call, (inverse_wrapper.taken(z),), "the inverse flow"),
                        "the inverse flow", "x, log p(x)")  # fmt: skip
    sized(x, EXAMPLE_BATCH, shape, "the inverse flow's x")
    per_sample(log_prob, EXAMPLE_BATCH, "the inverse flow's log p(x)", "log p(x) is one value a sample, in nats")
    program = _trace(inverse_wrapper, (z,), "the inverse flow")
    companions, dim = {}, math.prod(shape)
    width = (range[1] - range[0]) / levels
    notes = [
        f"log p in nats over [{range[0]}, {range[1]}]^{dim}; {levels} levels, bins {width:.6g} wide, "
        f"dequantization {dequantization}: bits/dim = -(log p + {dim} log {width:.6g}) / ({dim} log 2)"
    ]
    if trained != tuple(range):
        notes.append(
            f"your module's [{trained[0]}, {trained[1]}] scaled to [{range[0]}, {range[1]}]: log p and log det "
            f"less {inverse_wrapper.log_det:.4g} nats ({dim} log {inverse_wrapper.ratio:.6g})"
        )
    if forward is not None:
        forward_wrapper = Forward(Call(forward, "the forward flow"), shape, flat, range, trained)  # type: ignore[arg-type]
        with torch.no_grad():
            served = inverse_wrapper(z)[0].contiguous()
        taken = (forward_wrapper.taken(trained[0] + (served - range[0]) / forward_wrapper.ratio),)
        back, log_det = pair(_eager(forward_wrapper.call, taken, "the forward flow"), "the forward flow",
                              "z, log|det dz/dx|")  # fmt: skip
        sized(back, EXAMPLE_BATCH, shape, "the forward flow's z")
        per_sample(log_det, EXAMPLE_BATCH, "the forward flow's log det", "log|det dz/dx| is one value a sample")
        companions["forward"] = _trace(forward_wrapper, (served,), "the forward flow")
        notes.append(f"{out.stem}.forward.pt2: scores and test bits/dim of given images (/score, score, evaluate)")
    else:
        notes.append("no forward program: samples and their bits/dim only; scores of given images need forward=")
    if dequantizer is not None:
        wrapper = Dequantizer(Call(dequantizer, "the dequantizer"), shape, flat, range, trained)  # type: ignore[arg-type]
        example = dequantizer_example(shape, range, levels)
        checked_dequantizer(_eager(wrapper, example, "the dequantizer"), EXAMPLE_BATCH, shape)
        companions["dequantizer"] = _trace(wrapper, example, "the dequantizer")
        notes.append(
            f"{out.stem}.dequantizer.pt2: scores and test bits/dim of given images are the variational bound "
            f"E_q[log p(x + u) - log q(u | x)], {dequantization_samples or 1} draw(s) of u an image: an upper bound "
            "on bits/dim"
        )
    sidecar = {
        "family": "flow",
        "data": _data(
            shape, range, levels=levels, dequantization=dequantization, dequantization_samples=dequantization_samples
        ),
        "sampler": {"base": base, **(sampler or {})},
    }
    return _publish(out, sidecar, program, companions, notes, quiet, _sample_bits)


def _sample_bits(model: LoadedModel, n: int = 16) -> list[str]:
    """The bits/dim of a served flow's own samples by the server's formula: a figure a whole number of bits off what
    training reported, or below 0, says that log p is not in the units of the stated range."""
    flow = model.module
    assert isinstance(flow, ExportedFlow)
    dim = math.prod(model.shape)
    z = flow.base.sample((n, dim), 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_prob = flow.decode(z)[1]
    figure = bits_per_dim(log_prob, dim, model.data_range, model.levels).mean().item()
    return [
        f"its own samples (temperature 1, {n}): {figure:.3f} bits/dim; compare with your training's figure "
        "(a whole number of bits off, or below 0: log p is not in the stated range's units)"
    ]


def export_velocity_field(
    field: nn.Module | Callable[..., Any],
    out: str | Path,
    shape: Sequence[int],
    solver: str = "heun",
    steps: int = 50,
    classes: Sequence[str] | None = None,
    range: Range = (-1.0, 1.0),
    sampler: dict[str, Any] | None = None,
    quiet: bool = False,
) -> Converted:
    """A velocity field v(x, t) (flow matching, a CNF; noise at t = 0, data at t = 1), called as `field(x, t)` with
    t [B], or `field(x, t, y)` when `classes` names its classes (y = -1: the null label); integrated by `solver` in
    `steps` steps. `sampler`: e.g. {"guidance": 2.0, "temperature": 1.0}."""
    out = check_program_path(out)
    call = Call(field, "the velocity field")
    example: tuple[torch.Tensor, ...] = (_in_range(shape, range), torch.tensor([0.25, 0.75]))
    if classes is not None:
        example = (*example, torch.tensor([0, -1]))
    sized(_eager(call, example, "the velocity field"), EXAMPLE_BATCH, shape, "the velocity field")
    wrapper = Field(call) if classes is None else ConditionalField(call)
    program = _trace(wrapper, example, "the velocity field")
    sidecar = {
        "family": "flow",
        "data": _data(shape, range, classes=None if classes is None else list(classes)),
        "sampler": {"solver": solver, "steps": steps, **(sampler or {})},
    }
    notes = [f"velocity field v(x, t): {solver}, {steps} steps from t = 0; likelihoods by the adaptive solve"]
    return _publish(out, sidecar, program, {}, notes, quiet)
