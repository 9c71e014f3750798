"""What every training run shares: its options, seeding, batches, metrics log, grids and the resume state's
format (training/train/lifecycle.py runs a run's life from them)."""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training.runtime.checkpoint import Checkpoint, ModelConfig, load_checkpoint, save_checkpoint
from training.runtime.device import device_name
from training.runtime.images import save_grid
from training.sampling.sampler_config import to_dict
from training.train.data import ImageDataset
from training.train.progress import PlainProgress, progress


def option_words(config_type: type, values: dict[str, Any]) -> list[str]:
    """`--flag value` for each field of a config dataclass whose value in `values` differs from its default (a
    bool as `--flag` / `--no-flag`): how a run's command is written down and how the zoo rebuilds it."""
    words: list[str] = []
    for item in fields(config_type):
        if item.name not in values or item.default is MISSING or values[item.name] == item.default:
            continue
        value, flag = values[item.name], "--" + item.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            raise ValueError(f"{flag}: the value None cannot be passed on a command line (default {item.default})")
        else:
            words += [flag, str(value)]
    return words


@dataclass
class RunConfig:
    """Options every training command shares; each family's config adds its own (and may change defaults)."""

    dataset: str = "mnist"  # mnist, fashion-mnist (IDX files: fetch-data), folder (D/train/<class>/*), toy2d:<name>
    data_dir: str | None = None  # the dataset's IDX files or image folder D; falls back to $SAMPLEBAY_DATA_DIR
    image_size: int | None = None  # folder: side images are resized to (default: 32; 28 for grey 28x28 images)
    out: str = "model.safetensors"  # the checkpoint written after every epoch
    run_dir: str | None = None  # metrics.jsonl, grids, resume state; default: <out without suffix>.run
    epochs: int = 10  # passes over the training set (with --resume: the total to reach)
    batch_size: int = 128  # training examples per update
    seed: int = 0  # seeds initialization, batch order and sampling: the same seed repeats a run
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    threads: int | str | None = None  # CPU threads: N or auto (the cores idle at start); default 1, or $OMP_NUM_THREADS
    resume: bool = False  # continue exactly from the run directory's resume state
    force: bool = False  # start afresh over an earlier run: overwrite --out, remove its metrics, grids, resume state
    max_batches: int | None = None  # at most this many batches per epoch (quick runs and tests; none: all)
    save_dtype: str = "float32"  # floating tensors of the output checkpoint: float32 or float16 (half the file)
    stop_after_minutes: float | None = None  # end at the first epoch end where one more epoch would pass M minutes
    init_from: str | None = None  # warm start (no run dir to resume): weights and extras of a checkpoint, same arch

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.out).with_suffix(".run")

    def output_dtype(self) -> torch.dtype:
        """The dtype the output checkpoint is stored in (resume state always keeps full precision)."""
        if self.save_dtype not in ("float32", "float16"):
            raise ValueError(f"--save-dtype must be float32 or float16, not {self.save_dtype!r}")
        return getattr(torch, self.save_dtype)

    def command_line(self, family: str) -> str:
        """The `python -m training ...` command that reproduces this run (flags that differ from defaults)."""
        scheduling = ("resume", "force", "stop_after_minutes")  # how a run was scheduled, not what it computes
        values = {item.name: getattr(self, item.name) for item in fields(self) if item.name not in scheduling}
        return shlex.join(["python", "-m", "training", family, *option_words(type(self), values)])

    def training_record(
        self, family: str, device: torch.device, wall_seconds: float, epoch: int, **extra: Any
    ) -> dict[str, Any]:
        """What every checkpoint records about the run that made it. `args` leaves out --force: the zoo rebuilds
        a run from them, and a continued run is never a fresh start over an earlier one."""
        return {
            "command": self.command_line(family),
            "args": {name: value for name, value in asdict(self).items() if name != "force"},
            "seed": self.seed,
            "wall_seconds": wall_seconds,
            "device": device_name(device),
            "epochs_done": epoch,
            **extra,
        }

    def model_config(
        self,
        family: str,
        dataset: ImageDataset,
        arch: dict[str, Any],
        sampler: Any,  # the family's sampler dataclass: what every client runs by default
        device: torch.device,
        wall_seconds: float,
        epoch: int,
        metrics: dict[str, float],
        recorded: dict[str, Any] | None = None,  # what the family adds to the training record (update counters)
        ensemble: str | None = None,
    ) -> ModelConfig:
        """What a checkpoint says about itself, for every family; a class-conditional model lists its classes."""
        data: dict[str, Any] = {"shape": list(dataset.shape), "range": [-1.0, 1.0], "dataset": self.dataset}
        if arch["kwargs"].get("num_classes"):
            data["classes"] = dataset.classes
        return ModelConfig(
            family=family,
            arch=arch,
            data=data,
            sampler=to_dict(sampler),
            training=self.training_record(family, device, wall_seconds, epoch, **(recorded or {})),
            metrics=metrics,
            ensemble=ensemble,
        )


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def training_autocast(setting: str, device: torch.device) -> torch.autocast:
    """A trainer's `--autocast`: bfloat16 runs the networks' forward passes (and so their backward) in bfloat16,
    about 1.8x faster on CPUs with bfloat16 arithmetic (avx512_bf16, AMX) and on GPUs; weights, optimizer state
    and the checkpoint stay float32. none: float32 throughout."""
    if setting not in ("bfloat16", "none"):
        raise ValueError(f"--autocast must be bfloat16 or none, not {setting!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting == "bfloat16")


def batches(n: int, batch_size: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Shuffled index batches over n items (the global torch RNG decides, so --seed reproduces them)."""
    order = torch.randperm(n)
    count = n // batch_size
    if limit is not None:
        count = min(count, limit)
    for start in range(0, count * batch_size, batch_size):
        yield order[start : start + batch_size]


class RunLog:
    """Writes metrics as JSON lines and one sample grid per epoch into the run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"

    def progress(self, iterable: Iterable, total: int, description: str) -> tqdm | PlainProgress:
        return progress(iterable, total, description)

    def write(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def grid(self, samples: torch.Tensor, epoch: int, data_range: tuple[float, float]) -> Path:
        path = self.run_dir / f"samples_epoch{epoch:03d}.png"
        save_grid(samples, str(path), data_range)
        return path


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's state as flat tensors plus its JSON-able param groups (no pickling)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors, state["param_groups"]


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict[str, Any]]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


@dataclass
class ResumeState:
    """Everything needed to continue a run exactly: stored in the run directory in checkpoint format."""

    epoch: int
    checkpoint: Checkpoint

    @staticmethod
    def path(run_dir: Path) -> Path:
        return run_dir / "resume.safetensors"


def save_resume(
    run_dir: Path,
    epoch: int,
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    optimizers: dict[str, torch.optim.Optimizer],
    extras: dict[str, dict[str, torch.Tensor]],
) -> None:
    groups = dict(extras)
    param_groups = {}
    for name, optimizer in optimizers.items():
        groups[f"optimizer_{name}"], param_groups[name] = optimizer_tensors(optimizer)
    groups["rng"] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        groups["rng"]["cuda"] = torch.cuda.get_rng_state()
    resume_config = ModelConfig(
        **{
            **asdict(config),
            "training": {**config.training, "resume_epoch": epoch, "optimizer_param_groups": param_groups},
        }
    )
    save_checkpoint(ResumeState.path(run_dir), Checkpoint(resume_config, weights, groups))


def read_resume(run_dir: Path) -> ResumeState:
    """The run directory's resume state, read before anything is built (the optimizers and the RNG are set from
    it later, by `restore_resume`)."""
    path = ResumeState.path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {path}; start the run once without --resume")
    checkpoint = load_checkpoint(path)
    return ResumeState(epoch=int(checkpoint.config.training["resume_epoch"]), checkpoint=checkpoint)


def restore_resume(state: ResumeState, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Put the optimizers and the RNG back where the resumed run left them (their tensors leave the extras)."""
    checkpoint = state.checkpoint
    for name, optimizer in optimizers.items():
        restore_optimizer(
            optimizer,
            checkpoint.extras.pop(f"optimizer_{name}", {}),
            checkpoint.config.training["optimizer_param_groups"][name],
        )
    rng = checkpoint.extras.pop("rng")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def fixed_noise_loss(
    loss: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],  # (images [B, *shape], labels [B]) -> mean
    test: ImageDataset,
    batch_size: int,
    batches: int,
    conditional: bool,
    device: torch.device,
) -> float:
    """The mean of a noised objective (EqM, flow matching) over the first `batches` test batches with the same
    noise every epoch (seed 1234), so its figures compare across epochs; the global RNG is left as it was, so
    --resume stays exact."""
    state = torch.get_rng_state()
    torch.manual_seed(1234)
    total, count = 0.0, 0
    for index, chunk in enumerate(torch.split(torch.arange(len(test.images)), batch_size)):
        if index >= batches:
            break
        labels = test.labels[chunk].to(device) if conditional else None
        total += loss(test.images[chunk], labels).item() * len(chunk)
        count += len(chunk)
    torch.set_rng_state(state)
    return total / max(count, 1)


def scheduled_learning_rate(
    peak: float, update: int, total: int, warmup_steps: int, schedule: str, min_ratio: float
) -> float:
    """The learning rate at optimizer step `update` of `total`: linear warm-up over `warmup_steps`, then constant
    or a cosine decay to `min_ratio` of the peak by the last step (what EqM energies and flows train with)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"--lr-schedule must be cosine or constant, not {schedule!r}")
    warm = min(1.0, (update + 1) / max(warmup_steps, 1))
    if schedule == "constant" or total <= warmup_steps:
        return peak * warm
    progress = min(1.0, max(update - warmup_steps, 0) / max(total - warmup_steps, 1))
    return peak * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Stopwatch:
    def __init__(self, already: float = 0.0) -> None:
        self.start = time.perf_counter() - already

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 1)
