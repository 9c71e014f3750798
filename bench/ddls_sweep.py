"""Sweep DDLS settings for a GAN that saved its critic: FD, precision and recall per (steps, step size), and the
FD again in the features of the second, independently trained classifier (a default must help on both).

    python bench/ddls_sweep.py checkpoints/dcgan_mnist.safetensors --data-dir ../shared/data/mnist

The same samples `python -m training evaluate CHECKPOINT --steps S --step-size E --noise N` draws (seed 0,
counter-based latents) and the same reference images, so each row matches that command's figures.
By default the noise is Langevin's sqrt(2 * step size); a row's wall time is the sampling alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch

from training.commands.quality import DEFAULT_CLASSIFIER, SECOND_ARCH, classifier_path, load_classifier, quality_figures
from training.families import draw_samples
from training.runtime.load import load_model
from training.sampling.noise import chain_seeds
from training.sampling.sampler_config import GANSampler
from training.train.data import load_dataset


def numbers(text: str, kind: type) -> list:
    return [kind(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a GAN checkpoint that holds its critic")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: $SAMPLEBAY_DATA_DIR)")
    parser.add_argument("--n", type=int, default=2000, help="samples and reference images per row")
    parser.add_argument("--steps", default="0,25,50,100,200", help="comma-separated DDLS steps")
    parser.add_argument("--step-sizes", default="0.003,0.01,0.03", help="comma-separated step sizes")
    parser.add_argument("--noise", type=float, default=None, help="noise std (default: sqrt(2 * step size))")
    parser.add_argument("--batch", type=int, default=500, help="chains sampled at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    defaults = model.sampler_as(GANSampler)
    classifier = load_classifier(DEFAULT_CLASSIFIER)
    second = load_classifier(classifier_path("mnist", SECOND_ARCH))
    test = load_dataset("mnist", args.data_dir, "test")
    reference = test.images[torch.randperm(len(test.images), generator=torch.Generator().manual_seed(1))[: args.n]]
    seeds = chain_seeds(0, args.n)
    print(f"{args.checkpoint.name}: {args.n} samples per row; torch threads {torch.get_num_threads()}")
    print("| steps | step size | noise | FD | precision | recall | FD, 2nd classifier | seconds |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for steps in numbers(args.steps, int):
        for step_size in numbers(args.step_sizes, float) if steps else [defaults.step_size]:
            noise = math.sqrt(2 * step_size) if args.noise is None else args.noise
            model.sampler = dataclasses.replace(defaults, step_size=step_size, noise=round(noise, 4))
            start = time.perf_counter()
            samples = torch.cat(
                [draw_samples(model, seeds[i : i + args.batch], steps=steps) for i in range(0, args.n, args.batch)]
            )
            seconds = time.perf_counter() - start
            figures = quality_figures(classifier, reference, samples, None).report()
            cells = [steps, step_size if steps else "", round(noise, 4) if steps else "", figures["frechet_distance"]]
            confirmed = quality_figures(second, reference, samples, None).report()["frechet_distance"]
            cells += [figures["precision"], figures["recall"], confirmed, f"{seconds:.0f}"]
            print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
