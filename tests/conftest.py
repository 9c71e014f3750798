"""Fixtures: tiny IDX datasets and tiny checkpoints made on the CPU, so no test needs ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from training.train.data import write_idx

# Two threads on CI's two cores; SAMPLEBAY_TEST_THREADS=1 when a training run holds one of them. The same count
# through OMP_NUM_THREADS for what reads the threads setting (training/runtime/cores.py: the commands called
# in-process, the servers started as processes), so no test's speed hangs on how idle the cores looked.
TEST_THREADS = os.environ.get("SAMPLEBAY_TEST_THREADS", "2")
torch.set_num_threads(int(TEST_THREADS))
os.environ.setdefault("OMP_NUM_THREADS", TEST_THREADS)


def make_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fake 28x28 'digits': class k is a bright bar at a class-specific place, plus faint noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.random((n, 28, 28)) * 30).astype(np.uint8)
    for index, label in enumerate(labels):
        row = 3 + 2 * int(label)
        images[index, row : row + 3, 4:24] = 255
    return images, labels


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the four MNIST IDX files (gzip) with 512 train and 256 test images."""
    directory = tmp_path_factory.mktemp("idx")
    for split, (images_name, labels_name), n in (
        ("train", ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"), 512),
        ("test", ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"), 256),
    ):
        images, labels = make_digits(n, seed=0 if split == "train" else 1)
        write_idx(directory / images_name, images)
        write_idx(directory / labels_name, labels)
    return directory


ENSEMBLE_FIGURES = {"frechet_distance": 50.0, "init": "buffer", "steps": 10}  # as `evaluate --record` stores them


def write_tiny_ebm(
    path: Path, seed: int = 0, ensemble: str | None = None, buffer_samples: int = 32, steps: int = 10
) -> Path:
    """A real (untrained) conv EBM checkpoint of width 4 with a small saved replay buffer."""
    from training.models import build_model
    from training.runtime.checkpoint import Checkpoint, ModelConfig, save_checkpoint
    from training.sampling.replay_buffer import ReplayBuffer

    torch.manual_seed(seed)
    arch = {"name": "conv_energy", "kwargs": {"width": 4}}
    model = build_model(arch)
    buffer = ReplayBuffer((1, 28, 28), capacity=64)
    buffer.write_back(torch.full((buffer_samples,), -1), torch.rand(buffer_samples, 1, 28, 28) * 2 - 1)
    config = ModelConfig(
        family="ebm",
        arch=arch,
        data={"shape": [1, 28, 28], "range": [-1.0, 1.0], "dataset": "fake"},
        sampler={
            "steps": steps,
            "train_steps": steps,
            "step_size": 10.0,
            "noise": 0.005,
            "grad_clip": 0.03,
            "temperature": 1.0,
            "init": "buffer",
            "restart_prob": 0.05,
        },
        training={"seed": seed},
        ensemble=ensemble,
        metrics={"val_cd": -0.1, **({"evaluate_ensemble_buffer": ENSEMBLE_FIGURES} if ensemble else {})},
    )
    save_checkpoint(path, Checkpoint(config, model.state_dict(), {"replay_buffer": buffer.state_dict()}))
    return path


def write_tiny_eqm(path: Path, seed: int = 0, conditional: bool = True) -> Path:
    """A real (untrained) U-Net energy checkpoint of width 4 as `ebm --objective eqm` writes it: averaged
    weights, gradient descent from a Gaussian prior, no replay buffer; 10 classes when conditional."""
    from training.models import build_model
    from training.runtime.checkpoint import Checkpoint, ModelConfig, save_checkpoint
    from training.sampling.sampler_config import EBMSampler, to_dict

    torch.manual_seed(seed)
    arch = {"name": "unet_energy", "kwargs": {"width": 4, "num_classes": 10 if conditional else 0}}
    model = build_model(arch)
    data = {"shape": [1, 28, 28], "range": [-1.0, 1.0], "dataset": "fake"}
    if conditional:
        data["classes"] = [str(digit) for digit in range(10)]
    sampler = EBMSampler(
        steps=8, step_size=0.01, noise=0.0, grad_clip=None, prior="gaussian", clamp=False,
        unlabelled="random" if conditional else "null",
    )  # fmt: skip
    config = ModelConfig(
        family="ebm", arch=arch, data=data, sampler=to_dict(sampler), training={"seed": seed}, metrics={}
    )
    save_checkpoint(path, Checkpoint(config, model.state_dict(), {"online": model.state_dict()}))
    return path


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """One lone EBM ('solo') and a two-member ensemble ('pair' of 'pair_a' and 'pair_b')."""
    directory = tmp_path / "models"
    directory.mkdir()
    write_tiny_ebm(directory / "solo.safetensors", seed=0)
    write_tiny_ebm(directory / "pair_a.safetensors", seed=1, ensemble="pair")
    write_tiny_ebm(directory / "pair_b.safetensors", seed=2, ensemble="pair")
    return directory


def write_tiny_gan(path: Path, seed: int = 0) -> Path:
    """A real (untrained) DCGAN-style generator checkpoint with EMA weights and a critic."""
    from training.models import build_model
    from training.runtime.checkpoint import Checkpoint, ModelConfig, save_checkpoint

    torch.manual_seed(seed)
    generator_arch = {"name": "conv_generator", "kwargs": {"latent_dim": 16, "width": 8}}
    critic_arch = {"name": "conv_critic", "kwargs": {"width": 8}}
    generator, critic = build_model(generator_arch), build_model(critic_arch)
    config = ModelConfig(
        family="gan",
        arch={**generator_arch, "critic": critic_arch},
        data={"shape": [1, 28, 28], "range": [-1.0, 1.0], "dataset": "fake"},
        sampler={"latent_dim": 16, "temperature": 1.0, "weights": "ema"},
        training={"seed": seed, "loss": "dcgan"},
        metrics={"generator_loss": 1.0},
    )
    save_checkpoint(
        path, Checkpoint(config, generator.state_dict(), {"ema": generator.state_dict(), "critic": critic.state_dict()})
    )
    return path


TINY_FLOWS = {  # arch name -> kwargs of a small model on 28x28 images, and its base distribution
    "nice": ({"couplings": 4, "hidden": 16, "depth": 2}, "logistic"),
    "glow": ({"levels": 2, "steps": 1, "hidden": 8}, "gaussian"),
    "iresnet": ({"blocks": 2, "hidden": 8}, "gaussian"),
}


def write_tiny_flow(path: Path, seed: int = 0, arch_name: str = "nice") -> Path:
    """A real (untrained, perturbed) flow checkpoint on 28x28 images."""
    from training.models import build_model
    from training.runtime.checkpoint import Checkpoint, ModelConfig, save_checkpoint

    torch.manual_seed(seed)
    kwargs, base = TINY_FLOWS[arch_name]
    arch = {"name": arch_name, "kwargs": {"shape": [1, 28, 28], "base": base, **kwargs}}
    flow = build_model(arch)
    flow.initialize(torch.rand(64, 1, 28, 28) * 2 - 1)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = ModelConfig(
        family="flow",
        arch=arch,
        data={"shape": [1, 28, 28], "range": [-1.0, 1.0], "dataset": "fake"},
        sampler={"temperature": 0.8, "base": base},
        training={"seed": seed},
        metrics={"test_bits_per_dim": 5.0},
    )
    save_checkpoint(path, Checkpoint(config, flow.state_dict()))
    return path


def restate(path: Path, change=None, weights=None) -> Path:
    """Rewrite a checkpoint as a hand-edited (or hostile) file would be: `change(config)` edits its config dict in
    place (or returns the config's JSON text itself), `weights(name, tensor)` returns each tensor's replacement;
    the file is renamed into place."""
    import json

    import safetensors.torch

    from training.runtime.checkpoint import atomic_write_bytes, read_metadata

    payload = path.read_bytes()
    config = json.loads(read_metadata(payload, path.name)["config"])
    text = change(config) if change is not None else None
    tensors = safetensors.torch.load(payload)
    if weights is not None:
        tensors = {name: weights(name, tensor) for name, tensor in tensors.items()}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata={"config": text or json.dumps(config)}))
    return path


CNF_SHAPE = (1, 16, 16)  # a tiny CNF's images
CNF_STEPS = 4  # the checkpoint's midpoint steps
CNF_GUIDANCE = 1.5  # the checkpoint's guidance


def write_tiny_cnf(path: Path, unlabelled: str = "null", steps: int = CNF_STEPS) -> Path:
    """A real (untrained, perturbed) class-conditional CNF checkpoint on 16x16 images, midpoint steps."""
    from training.models import build_model
    from training.runtime.checkpoint import Checkpoint, ModelConfig, save_checkpoint

    torch.manual_seed(0)
    arch = {"name": "unet_velocity", "kwargs": {"channels": 1, "width": 8, "num_classes": 10, "embedding_dim": 16}}
    field = build_model(arch)
    with torch.no_grad():
        for parameter in field.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = ModelConfig(
        family="flow",
        arch=arch,
        data={
            "shape": list(CNF_SHAPE),
            "range": [-1.0, 1.0],
            "dataset": "fake",
            "classes": [str(k) for k in range(10)],
        },
        sampler={
            "temperature": 1.0,
            "steps": steps,
            "solver": "midpoint",
            "guidance": CNF_GUIDANCE,
            "unlabelled": unlabelled,
        },
        training={"seed": 0},
    )
    save_checkpoint(path, Checkpoint(config, field.state_dict()))
    return path


def write_gan_without_its_critic(path: Path) -> Path:
    """A GAN checkpoint as saved before critics were kept: one plain generator pass, no DDLS."""
    from training.runtime.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(write_tiny_gan(path))
    del checkpoint.extras["critic"]
    save_checkpoint(path, checkpoint)
    return path


def write_gan_whose_critic_likes_bright_images(path: Path) -> Path:
    """A tiny GAN whose critic is increasing in every pixel: all its weights are positive and LeakyReLU is
    monotone, so d(x) prefers bright images; the head is scaled so the preference outweighs the prior."""
    from training.runtime.checkpoint import load_checkpoint, save_checkpoint

    write_tiny_gan(path)
    checkpoint = load_checkpoint(path)
    critic = {name: tensor.abs() for name, tensor in checkpoint.extras["critic"].items()}
    critic["head.weight"] = critic["head.weight"] * 50
    checkpoint.extras["critic"] = critic
    save_checkpoint(path, checkpoint)
    return path


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for a module of page tests (skips them where Playwright or Chromium is missing)."""
    from page_driver import launched_browser

    with launched_browser() as launched:
        yield launched
