"""Print the models table of docs/results.md from what the checkpoints themselves record.

    python bench/models_table.py checkpoints

Every figure comes from a checkpoint's metadata: its arch, the training record (epochs, wall time,
device) and the `evaluate --record` figures. Nothing is re-measured here.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from training.runtime.checkpoint import Checkpoint, load_checkpoint

GAN_NAMES = {"dcgan": "DCGAN", "wgan": "WGAN (clipping)", "wgan-gp": "WGAN-GP"}


def describe(checkpoint: Checkpoint) -> str:
    config = checkpoint.config
    kwargs = config.arch.get("kwargs", {})
    name = config.arch["name"]
    if name == "unet_energy":
        classes = kwargs.get("num_classes", 0)
        conditional = f", class-conditional ({classes} classes)" if classes else ""
        form = kwargs.get("energy_form", "dot")
        args = config.training.get("args", {})
        bridge = f" + CD fine-tune (weight {args['cd_weight']})" if args.get("cd_weight") else ""
        return f"EBM, U-Net energy ({form} form, EqM{bridge}), width {kwargs.get('width')}{conditional}"
    if config.family == "ebm":
        return f"EBM, conv energy width {kwargs.get('width')}"
    if config.family == "gan":
        loss = GAN_NAMES.get(config.training.get("loss"), config.training.get("loss"))
        return f"GAN, {loss} (EMA generator), width {kwargs.get('width')}"
    if name == "unet_velocity":
        classes = kwargs.get("num_classes", 0)
        conditional = f", class-conditional ({classes} classes)" if classes else ""
        return f"flow, CNF: U-Net velocity field (flow matching), width {kwargs.get('width')}{conditional}"
    if name == "nice":
        return f"flow, NICE ({kwargs['couplings']} couplings of {kwargs['depth']} x {kwargs['hidden']} ReLU)"
    if name == "glow":
        return f"flow, multiscale ({kwargs['levels']} levels x {kwargs['steps']} steps, {kwargs['hidden']} channels)"
    if name == "iresnet":
        return (
            f"flow, i-ResNet ({kwargs['blocks']} blocks"
            + (f" over {kwargs['scales']} scales" if kwargs.get("scales", 1) > 1 else "")
            + f", {kwargs['hidden']} channels, "
            f"Lip {kwargs.get('coefficient', 0.9)}, {kwargs.get('series_terms', 5)}-term series)"
        )
    return f"{config.family}, {name}"


def parameters(checkpoint: Checkpoint) -> str:
    count = sum(
        math.prod(tensor.shape)
        for name, tensor in checkpoint.weights.items()
        if tensor.is_floating_point() and not name.endswith(("running_mean", "running_var", ".u"))
    )
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count / 1e3:.0f} k"


def training(checkpoint: Checkpoint) -> str:
    record = checkpoint.config.training
    args = record.get("args", {})
    minutes = float(record.get("wall_seconds", 0)) / 60
    epochs = f"{record.get('epochs_done', '?')} epochs"
    if args.get("max_batches"):  # shortened epochs: say how much data they saw
        epochs = f"{record.get('epochs_done', '?')} x {args['max_batches']} batches of {args.get('batch_size')}"
    return f"{epochs}, {minutes:.0f} min, {record.get('device', '?')}"


def labels_text(figures: dict) -> str:
    """Which classes a class-conditional model's chains were drawn with, and how often the classifier agreed."""
    if "label_accuracy" not in figures:
        return ""
    label = figures.get("label")
    which = {None: "a random class per chain", "all": "each class in turn"}.get(label, f"class {label}")
    if figures.get("guidance", 1.0) != 1.0:
        which += f", guidance {figures['guidance']}"
    return f", {which} (classifier agrees: {100 * figures['label_accuracy']:.1f} %)"


def sampler_text(checkpoint: Checkpoint, key: str, figures: dict) -> str:
    config = checkpoint.config
    if config.family == "ebm":
        figures = figures or {"init": config.sampler.get("init"), "steps": config.sampler.get("steps")}
        source = (
            "its replay buffer"
            if figures.get("init") == "buffer"
            else f"{config.sampler.get('prior', 'uniform')} noise"
        )
        noise = figures.get("noise", config.sampler.get("noise"))
        step_size = figures.get("step_size", config.sampler.get("step_size"))
        if noise == 0 and "mean_steps" in figures:  # gradient descent, each chain stopped at its tolerance
            text = (
                f"at most {figures.get('steps')} gradient steps of {step_size} (mean {figures['mean_steps']}: "
                f"stopped at an RMS move of {figures['tolerance']}) from {source}"
            )
        elif noise == 0:  # an EqM energy: plain gradient descent
            text = f"{figures.get('steps')} gradient steps of {step_size} from {source}"
        elif config.sampler.get("noise") == 0:  # an EqM energy run as a noisy, long chain
            text = f"{figures.get('steps')} Langevin steps of {step_size}, noise {noise}, from {source}"
        else:
            who = "the ensemble's members in turn" if key.startswith("evaluate_ensemble") else "Langevin"
            text = f"{figures.get('steps')} steps ({who}) from {source}"
        text += labels_text(figures)
        return text
    if config.family == "gan":
        steps = figures.get("steps", config.sampler.get("steps", 0))
        if not steps:
            return "one generator pass"
        step_size = figures.get("step_size", config.sampler.get("step_size"))
        noise = figures.get("noise", config.sampler.get("noise"))
        return f"DDLS: {steps} latent Langevin steps of {step_size}, noise {noise}, under the critic"
    temperature = figures.get("temperature", config.sampler.get("temperature"))
    if config.sampler.get("solver"):  # a CNF: its ODE from the prior
        steps = figures.get("steps", config.sampler.get("steps"))
        solver = figures.get("solver", config.sampler.get("solver"))
        text = f"{steps} {solver} ODE steps from Gaussian noise at temperature {temperature}"
        text += labels_text(figures)
        return text
    return f"inverse at temperature {temperature}"


def row(name: str, checkpoint: Checkpoint, key: str | None, params: str, trained: str) -> str:
    metrics = checkpoint.config.metrics
    figures = metrics.get(key, {}) if key else {}
    bits = figures.get("test_bits_per_dim", metrics.get("test_bits_per_dim"))
    cells = [name, describe(checkpoint), params, trained, sampler_text(checkpoint, key or "", figures)]
    formats = {"frechet_distance": ".1f", "coverage_bits": ".2f", "precision": ".3f", "recall": ".3f"}
    cells += [format(figures[field], spec) if field in figures else "" for field, spec in formats.items()]
    cells.append(f"{bits:.2f}" if bits is not None else "")
    return "| " + " | ".join(cells) + " |"


def table(models_dir: Path) -> list[str]:
    """A row per checkpoint and recorded evaluation, then a row per ensemble's own recorded figures."""
    lines = []
    ensembles: dict[str, list[Checkpoint]] = {}
    for path in sorted(models_dir.glob("*.safetensors")):
        checkpoint = load_checkpoint(path)
        metrics = checkpoint.config.metrics
        own = [key for key in sorted(metrics) if key.startswith("evaluate") and not key.startswith("evaluate_ensemble")]
        for key in own or [None]:
            lines.append(row(f"`{path.stem}`", checkpoint, key, parameters(checkpoint), training(checkpoint)))
        if checkpoint.config.ensemble:
            ensembles.setdefault(checkpoint.config.ensemble, []).append(checkpoint)
    for name, members in ensembles.items():
        first = members[0]
        minutes = sum(float(member.config.training.get("wall_seconds", 0)) for member in members) / 60
        trained = f"{len(members)} seeds, {minutes:.0f} min in all, {first.config.training.get('device', '?')}"
        params = f"{len(members)} x {parameters(first)}"
        for key in sorted(key for key in first.config.metrics if key.startswith("evaluate_ensemble")):
            lines.append(row(f"ensemble `{name}`", first, key, params, trained))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models_dir", type=Path, nargs="?", default=Path("checkpoints"))
    args = parser.parse_args()
    print("| model | family, arch | params | training | sampler | FD | coverage | precision | recall | test bits/dim |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|")
    for line in table(args.models_dir):
        print(line)


if __name__ == "__main__":
    main()
