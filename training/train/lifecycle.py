"""One training run's life, the same for every family: how it starts (afresh, `--resume` exactly, `--init-from` a
checkpoint), what an epoch end writes and in which order, and when `--stop-after-minutes` ends it.

A trainer keeps only what is its own: it builds its modules and optimizers from `run.train` on `run.device`,
loads the weights `run.restore` hands back, trains each epoch `run.epochs()` yields, and passes its validation,
grid and checkpoint contents to `run.end_epoch` as hooks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training.runtime.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.runtime.device import pick_device, use_threads
from training.train.data import ImageDataset, load_dataset
from training.train.progress import PlainProgress
from training.train.run import (
    ResumeState,
    RunConfig,
    RunLog,
    Stopwatch,
    batches,
    read_resume,
    restore_resume,
    save_resume,
    seed_everything,
)


class EarlierRun(ValueError):
    """A fresh start would overwrite an earlier run's checkpoint or mix with its run directory."""


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


def earlier_run(out: Path, run_dir: Path) -> tuple[list[Path], list[Path]]:
    """What a fresh start would overwrite (the checkpoint) and what it would mix with (the run directory's
    metrics, resume state and grids)."""
    overwritten = [out] if out.exists() else []
    files = [run_dir / "metrics.jsonl", ResumeState.path(run_dir)]
    mixed = [path for path in files if path.exists()]
    if run_dir.is_dir():
        mixed += sorted(run_dir.glob("samples_epoch*.png"))
    return overwritten, mixed


def refuse_earlier_run(out: Path, run_dir: Path) -> None:
    """Without --force a fresh start leaves an earlier run alone: EarlierRun names its files and the two ways on."""
    overwritten, mixed = earlier_run(out, run_dir)
    if not overwritten and not mixed:
        return
    grids = [path for path in mixed if path.suffix == ".png"]
    names = [str(path) for path in overwritten + mixed if path not in grids]
    if grids:
        names.append(f"{len(grids)} sample grid{'s' if len(grids) > 1 else ''} in {run_dir}")
    ways = "start afresh over it with --force, or choose another --out"
    if ResumeState.path(run_dir).is_file():
        ways = "continue it with --resume, " + ways
    raise EarlierRun(f"a fresh start would overwrite an earlier run: {', '.join(names)}; {ways}")


@dataclass
class Origin:
    """Where a run that does not start afresh begins: its resume state (`resumed`: the weights are the online
    ones the optimizers stepped) or an --init-from checkpoint (the weights are the shipped ones)."""

    checkpoint: Checkpoint
    resumed: bool
    epochs_done: int

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return self.checkpoint.weights

    @property
    def extras(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.checkpoint.extras

    @property
    def training(self) -> dict[str, Any]:
        return self.checkpoint.config.training

    def count(self, name: str) -> int:
        """A counter the run carries on (updates, critic steps): a resume state always has it; a shipped
        checkpoint from before the counter existed starts it at 0."""
        return int(self.training[name] if self.resumed else self.training.get(name, 0))

    def wall_seconds(self) -> float:
        return float(self.training["wall_seconds"] if self.resumed else self.training.get("wall_seconds", 0.0))


@dataclass
class EpochSave:
    """The files of an epoch end: the checkpoint --out ships, and what the resume state holds to continue
    exactly (the weights the optimizers step where the shipped ones are an average; extras in full)."""

    checkpoint: Checkpoint  # its config is the resume state's too
    resume_weights: dict[str, torch.Tensor]
    resume_extras: dict[str, dict[str, torch.Tensor]]


def no_validation() -> dict[str, float]:
    return {}


@dataclass
class EpochHooks:
    """What a family gives an epoch end; `TrainingRun.end_epoch` decides the order and writes the files."""

    save: Callable[[int, float, dict[str, float]], EpochSave]  # (epoch, wall seconds, metrics line) -> files
    grid: Callable[[], torch.Tensor]  # [64, *shape] samples in [-1, 1] for samples_epochNNN.png
    summary: Callable[[dict[str, float]], str]  # the figures of the epoch's printed line
    validate: Callable[[], dict[str, float]] = no_validation  # held-out figures for the metrics line


class TrainingRun:
    """A run from its first batch to its last epoch end; `begin` makes one."""

    def __init__(self, config: RunConfig, family: str, saved: ResumeState | None, with_test: bool) -> None:
        """Device, seed, datasets and run directory, in the same order for every family (so --seed reproduces)."""
        self.config, self.family, self.saved = config, family, saved
        self.out, self.run_dir = Path(config.out), config.resolved_run_dir()
        self.deadline = EpochDeadline(config.stop_after_minutes)  # the clock counts data loading too
        self.device = pick_device(config.device)
        print(use_threads(config.threads), flush=True)
        config.output_dtype()  # a bad --save-dtype fails now, not after the first epoch
        seed_everything(config.seed)
        self.train: ImageDataset = self.dataset("train")
        self.test_split = self.dataset("test") if with_test else None
        per_epoch = len(self.train.images) // config.batch_size
        if per_epoch == 0:
            raise ValueError(f"{len(self.train.images)} training examples cannot fill one batch of {config.batch_size}")
        if config.max_batches is not None:
            per_epoch = min(per_epoch, config.max_batches)
        self.batches_per_epoch = per_epoch  # full batches of the training set, capped by --max-batches
        self.log = RunLog(self.run_dir)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.first_epoch, self.already = 1, 0.0
        self.clock = Stopwatch()

    @property
    def test(self) -> ImageDataset:
        """The test split, for the families that validate on it (`begin(..., with_test=False)` loads none)."""
        if self.test_split is None:
            raise RuntimeError(f"this {self.family} run was begun without its test split")
        return self.test_split

    def dataset(self, split: str) -> ImageDataset:
        config = self.config
        return load_dataset(config.dataset, config.data_dir, split, seed=config.seed, image_size=config.image_size)

    @classmethod
    def begin(cls, config: RunConfig, family: str, with_test: bool = True) -> TrainingRun | None:
        """Check what the flags ask of the files before any data is read: --resume needs a resume state (None
        when the run already reached --epochs; it says so), a fresh start needs no earlier run or --force."""
        run_dir = config.resolved_run_dir()
        saved = None
        if config.resume:
            if config.force:
                raise ValueError(f"--resume continues the run in {run_dir}, --force starts it afresh: pass one")
            saved = read_resume(run_dir)
            if saved.epoch >= config.epochs:
                at = f"{saved.epoch}/{config.epochs}"
                if saved.epoch > config.epochs:
                    at = f"{saved.epoch}, past --epochs {config.epochs}"
                print(
                    f"{run_dir}: the run already finished at epoch {at}; its checkpoint is {config.out}. "
                    f"Raise --epochs above {saved.epoch} to continue it.",
                    flush=True,
                )
                return None
        elif not config.force:
            refuse_earlier_run(Path(config.out), run_dir)
        return cls(config, family, saved, with_test)

    def restore(self, arch: dict[str, Any], optimizers: dict[str, torch.optim.Optimizer]) -> Origin | None:
        """Where the weights start: the resume state (the optimizers and the RNG are set from it here, after the
        modules are built, so the run continues bit for bit), an --init-from checkpoint of the same `arch`, or
        None for a fresh start. --force clears the earlier run's files once the start is vetted."""
        self.optimizers = optimizers
        origin = None
        if self.saved is not None:
            restore_resume(self.saved, optimizers)
            origin = Origin(self.saved.checkpoint, resumed=True, epochs_done=self.saved.epoch)
        elif self.config.init_from:
            start = warm_start(self.config.init_from, self.family, arch)
            origin = Origin(start, resumed=False, epochs_done=int(start.config.training.get("epochs_done", 0)))
            if origin.epochs_done >= self.config.epochs:  # else the run would end at once, saying nothing
                raise ValueError(
                    f"--init-from {self.config.init_from} has trained {origin.epochs_done} epochs, and --epochs counts "
                    f"them too: give --epochs above {origin.epochs_done} (e.g. {origin.epochs_done + 5} for five more)"
                )
        if self.saved is None and self.config.force:
            self.clear_earlier_run()
        if origin is not None:
            self.first_epoch, self.already = origin.epochs_done + 1, origin.wall_seconds()
        return origin

    def clear_earlier_run(self) -> None:
        """--force: the run directory keeps none of the earlier run's files (its metrics would be appended to,
        its resume state would continue it); --out is replaced at the first epoch end."""
        _, mixed = earlier_run(self.out, self.run_dir)
        for path in mixed:
            path.unlink()
        if mixed:
            print(f"--force: removed the earlier run's {len(mixed)} file(s) from {self.run_dir}", flush=True)

    def epochs(self) -> Iterator[int]:
        """The epochs still to train; after each one's end, --stop-after-minutes may end the run there. The
        clock starts here, continuing a resumed or warm-started run's time."""
        self.clock = Stopwatch(self.already)
        for epoch in range(self.first_epoch, self.config.epochs + 1):
            yield epoch
            if self.deadline.stop_after(epoch, self.config.epochs):
                return

    def batches(self, epoch: int, name: str) -> tqdm | PlainProgress:
        """The epoch's shuffled index batches behind a progress bar `name epoch E/N`."""
        config = self.config
        order = batches(len(self.train.images), config.batch_size, config.max_batches)
        return self.log.progress(order, self.batches_per_epoch, f"{name} epoch {epoch}/{config.epochs}")

    def end_epoch(self, epoch: int, figures: dict[str, float], hooks: EpochHooks) -> None:
        """Validate, draw the grid, write the checkpoint and then the resume state, log the metrics line last (a
        crash in between never logs an epoch twice), print the epoch's line. The grid comes before the resume
        state because a flow's grid draws from the global RNG, which the resume state records."""
        record = dict(figures)
        record.update(hooks.validate())
        record.update(epoch=epoch, wall_seconds=self.clock.seconds())
        grid_path = self.log.grid(hooks.grid(), epoch, (-1.0, 1.0))
        save = hooks.save(epoch, self.clock.seconds(), record)
        save_checkpoint(self.out, save.checkpoint, self.config.output_dtype())
        config = save.checkpoint.config
        save_resume(self.run_dir, epoch, config, save.resume_weights, self.optimizers, save.resume_extras)
        self.log.write(record)
        print(f"epoch {epoch}: {hooks.summary(record)} -> {self.out} (grid {grid_path})", flush=True)
