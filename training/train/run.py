"""What every training run shares: seeding, progress, metrics log, grids, resume state."""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training.runtime.checkpoint import Checkpoint, ModelConfig, load_checkpoint, save_checkpoint
from training.runtime.device import device_name, pick_device
from training.runtime.images import save_grid
from training.train.data import ImageDataset, load_dataset
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
    threads: int | None = None  # torch CPU threads for this run (1: one run per core, side by side)
    resume: bool = False  # continue exactly from the run directory's resume state
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
        scheduling = ("resume", "stop_after_minutes")  # how a run was scheduled, not what it computes
        values = {item.name: getattr(self, item.name) for item in fields(self) if item.name not in scheduling}
        return shlex.join(["python", "-m", "training", family, *option_words(type(self), values)])

    def training_record(
        self, family: str, device: torch.device, wall_seconds: float, epoch: int, **extra: Any
    ) -> dict[str, Any]:
        """What every checkpoint records about the run that made it."""
        return {
            "command": self.command_line(family),
            "args": asdict(self),
            "seed": self.seed,
            "wall_seconds": wall_seconds,
            "device": device_name(device),
            "epochs_done": epoch,
            **extra,
        }


@dataclass
class RunStart:
    device: torch.device
    train: ImageDataset
    test: ImageDataset | None
    run_dir: Path
    log: RunLog
    batches_per_epoch: int  # full batches of the training set, capped by --max-batches
    deadline: EpochDeadline  # --stop-after-minutes

    def out_of_time(self, epoch: int, last_epoch: int) -> bool:
        """Called after each epoch's checkpoint and resume state are written: True ends the run here."""
        return self.deadline.stop_after(epoch, last_epoch)


class EpochDeadline:
    """--stop-after-minutes M: a run ends at an epoch end, never inside an epoch, so that the checkpoint and the
    resume state are those of a finished epoch and `--resume` continues exactly as an uninterrupted run would.

    It stops at the first epoch end from which one more epoch (as long as the longest so far) would pass M
    minutes since the run started; so a run stays within M minutes when an epoch fits in M (a lent GPU's
    command limit), and always trains at least one epoch (M = 0: exactly one).
    """

    def __init__(self, minutes: float | None) -> None:
        if minutes is not None and minutes < 0:
            raise ValueError(f"--stop-after-minutes must be 0 or more, not {minutes}")
        self.minutes = minutes
        self.start = time.monotonic()
        self.epoch_start = self.start
        self.longest_epoch = 0.0

    def stop_after(self, epoch: int, last_epoch: int) -> bool:
        now = time.monotonic()
        self.longest_epoch = max(self.longest_epoch, now - self.epoch_start)
        self.epoch_start = now
        if self.minutes is None or epoch >= last_epoch:
            return False
        if now - self.start + self.longest_epoch <= self.minutes * 60:
            return False
        print(
            f"--stop-after-minutes {self.minutes:g}: stopped after epoch {epoch} of {last_epoch} "
            f"({(now - self.start) / 60:.1f} min; an epoch takes up to {self.longest_epoch / 60:.1f}); "
            "continue with --resume",
            flush=True,
        )
        return True


def start_run(config: RunConfig, with_test: bool = True) -> RunStart:
    """Device, seed, datasets and run directory, in the same order for every family (so --seed reproduces)."""
    deadline = EpochDeadline(config.stop_after_minutes)  # the clock counts data loading too
    device = pick_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    config.output_dtype()  # a bad --save-dtype fails now, not after the first epoch
    seed_everything(config.seed)
    train = load_dataset(config.dataset, config.data_dir, "train", seed=config.seed, image_size=config.image_size)
    test = None
    if with_test:
        test = load_dataset(config.dataset, config.data_dir, "test", seed=config.seed, image_size=config.image_size)
    run_dir = config.resolved_run_dir()
    per_epoch = len(train.images) // config.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(train.images)} training examples cannot fill one batch of {config.batch_size}")
    if config.max_batches is not None:
        per_epoch = min(per_epoch, config.max_batches)
    return RunStart(device, train, test, run_dir, RunLog(run_dir), per_epoch, deadline)


def warm_start(path: str, family: str, arch: dict[str, Any]) -> Checkpoint:
    """--init-from: a checkpoint whose weights (and extras) this run starts from; refused unless it is the same
    family and architecture as the run the flags describe."""
    start = load_checkpoint(path)
    if start.config.family != family:
        raise ValueError(f"--init-from {path}: it is a {start.config.family} checkpoint, not a {family}")
    if start.config.arch != arch:
        raise ValueError(
            f"--init-from {path}: its arch {start.config.arch} differs from this run's {arch}; "
            f"pass the flags it was trained with ({start.config.training.get('command', 'not recorded')})"
        )
    return start


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


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


def load_resume(run_dir: Path, optimizers: dict[str, torch.optim.Optimizer]) -> ResumeState:
    path = ResumeState.path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {path}; start the run once without --resume")
    checkpoint = load_checkpoint(path)
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
    return ResumeState(epoch=int(checkpoint.config.training["resume_epoch"]), checkpoint=checkpoint)


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
