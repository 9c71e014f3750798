"""Train a normalizing flow by exact maximum likelihood on dequantized data; report test bits/dim.

NICE (Dinh et al. 2014) for now; the multiscale (RealNVP/Glow-style) flow and the invertible ResNet
plug in here as further `--arch` values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from training.checkpoint import Checkpoint, ModelConfig, save_checkpoint
from training.data import ImageDataset
from training.losses import bits_per_dim, dequantize
from training.models import build_model
from training.run import RunConfig, Stopwatch, batches, load_resume, save_resume, start_run

ARCHITECTURES = ("nice",)


@dataclass
class FlowTrainConfig(RunConfig):
    arch: str = "nice"
    out: str = "checkpoints/flow.safetensors"
    epochs: int = 20
    lr: float = 1e-3
    couplings: int = 4  # NICE: the paper's MNIST model has 4 couplings of 5 x 1000 ReLU units
    hidden: int = 1000
    depth: int = 5
    base: str = "logistic"
    temperature: float = 0.8  # default sampling temperature stored in the checkpoint
    test_batches: int | None = None  # limit the test bits/dim pass (quick runs)


def _arch(dataset: ImageDataset, config: FlowTrainConfig) -> dict:
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"unknown flow architecture {config.arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    return {"name": "nice", "kwargs": {"shape": list(dataset.shape), "couplings": config.couplings,
                                       "hidden": config.hidden, "depth": config.depth, "base": config.base}}


@torch.no_grad()
def dataset_bits_per_dim(flow: torch.nn.Module, test: ImageDataset, batch_size: int, device: torch.device,
                      limit: int | None = None, seed: int = 0) -> float:
    """Mean bits/dim of the test set under one fixed dequantization draw."""
    flow.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    dim = math.prod(test.shape)
    total, count = 0.0, 0
    for index, chunk in enumerate(torch.split(test.images, batch_size)):
        if limit is not None and index >= limit:
            break
        values = bits_per_dim(flow.log_prob(dequantize(chunk).to(device)), dim)
        total += values.sum().item()
        count += len(values)
    torch.set_rng_state(generator_state)
    flow.train()
    return total / count


def train_flow(config: FlowTrainConfig) -> Path:
    run = start_run(config)
    device, train, test, run_dir, log = run.device, run.train, run.test, run.run_dir, run.log
    arch = _arch(train, config)
    flow = build_model(arch).to(device)
    optimizer = torch.optim.Adam(flow.parameters(), lr=config.lr)
    first_epoch, already = 1, 0.0
    if config.resume:
        resumed = load_resume(run_dir, {"flow": optimizer})
        flow.load_state_dict(resumed.checkpoint.weights)
        first_epoch = resumed.epoch + 1
        already = float(resumed.checkpoint.config.training["wall_seconds"])
    else:
        with torch.no_grad():
            start = torch.randperm(len(train.images))[:1000]
            flow.initialize(dequantize(train.images[start]).to(device))
    clock = Stopwatch(already)
    dim = math.prod(train.shape)
    per_epoch = run.batches_per_epoch
    out = Path(config.out)
    for epoch in range(first_epoch, config.epochs + 1):
        bar = log.progress(batches(len(train.images), config.batch_size, config.max_batches), per_epoch,
                           f"{config.arch} epoch {epoch}/{config.epochs}")
        total = 0.0
        for index in bar:
            loss = bits_per_dim(flow.log_prob(dequantize(train.images[index]).to(device)), dim).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            bar.set_postfix(bits_per_dim=f"{loss.item():.3f}")
        record = {"train_bits_per_dim": total / max(per_epoch, 1), "epoch": epoch, "wall_seconds": clock.seconds(),
                  "test_bits_per_dim": dataset_bits_per_dim(flow, test, 500, device, config.test_batches)}
        grid_path = log.grid(flow.sample(64, config.temperature).clamp(-1, 1), epoch, (-1.0, 1.0))
        model_config = ModelConfig(
            family="flow", arch=arch,
            data={"shape": list(train.shape), "range": [-1.0, 1.0], "dataset": config.dataset},
            sampler={"temperature": config.temperature, "base": config.base},
            training={"args": asdict(config), "seed": config.seed, "wall_seconds": clock.seconds(),
                      "device": str(device), "epochs_done": epoch},
            metrics={"test_bits_per_dim": round(record["test_bits_per_dim"], 4)},
        )
        save_checkpoint(out, Checkpoint(model_config, flow.state_dict()))
        save_resume(run_dir, epoch, model_config, flow.state_dict(), {"flow": optimizer}, {})
        log.write(record)
        print(f"epoch {epoch}: train {record['train_bits_per_dim']:.4f} test {record['test_bits_per_dim']:.4f} "
              f"bits/dim -> {out} (grid {grid_path})", flush=True)
    return out
