"""`python -m training zoo`: train or continue every shipped model in resumable chunks, then ship it back.

Every shipped checkpoint records the run that made it (`training.args`). The zoo rebuilds that command
with the output and run directory outside the work tree (`--runs-dir`), then per model:

- `<runs-dir>/<name>.run/resume.safetensors` exists (a later session on the same machine): `--resume`,
  with the run's own recorded flags, so it continues exactly;
- it does not (a new machine): `--init-from <shipped checkpoint>`, a warm start from the shipped weights
  and extras (EMA, critic, replay buffer) rather than from scratch; with `--force`, since without a
  resume state there is no run to continue, only files an unfinished chunk left behind.

Each run ends at an epoch end within `--stop-after-minutes` (a chunk that fits a lent GPU's command
limit); the next zoo call continues it. `--ship` copies finished runs into `checkpoints/` as float16
(under the repository's size limits), records `evaluate` figures in them and prints the models table.
Schedule, execute, ship: `plan` decides, `execute` runs the commands, `ship` brings the results home.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.commands.flags import TRAINER_CONFIGS, trainer_parser
from training.commands.record_key import override_words
from training.commands.ship_paths import portable_record
from training.families import family_named
from training.runtime.checkpoint import (
    ModelConfig,
    atomic_write_bytes,
    encode_checkpoint,
    load_checkpoint,
    read_metadata,
)
from training.train.run import ResumeState, option_words

FILE_LIMIT = 5 * 1024 * 1024  # bytes: every shipped checkpoint stays under 5 MiB
DIRECTORY_LIMIT = 30 * 1000 * 1000  # bytes: checkpoints/ stays under 30 MB
MAX_CHUNK_MINUTES = 9.0  # a lent GPU's command limit is 10 minutes; leave one for start-up and the last epoch

# What a preset changes in a rebuilt command. CUDA: the CPU runs' batches leave a GPU mostly idle, so a
# warm-started run takes at least this batch size (per trainer; 'eqm' is `ebm --objective eqm`). CD EBMs:
# 256 chains of 60 Langevin steps per update; EqM U-Nets and flows: 256 images; GANs: 128 (the DCGAN
# paper's batch). A resumed run keeps the batch size it started with, so that it continues exactly.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"device": "cpu", "batch_size": {}},
    "cuda": {"device": "cuda", "batch_size": {"ebm": 256, "eqm": 256, "gan": 128, "flow": 256}},
}


class ShipRefused(ValueError):
    """Shipping these files would break the repository's size limits."""


@dataclass
class ZooRun:
    """One model's chunk: what the zoo decided and the command that does it."""

    name: str
    shipped: Path  # checkpoints/<name>.safetensors
    action: str  # resume | init-from | finished (trained to its target; waits for --ship) | skip
    argv: list[str]  # after `python -m training`; empty unless the run trains
    out: Path | None = None  # <runs-dir>/<name>.safetensors
    note: str = ""

    def command(self) -> str:
        return shlex.join(["python", "-m", "training", *self.argv])


def read_config(path: Path) -> ModelConfig:
    """A checkpoint's config from its header alone (resume states are large; the tensors are not needed)."""
    with path.open("rb") as handle:
        head = handle.read(8)
        payload = head + handle.read(int.from_bytes(head, "little")) if len(head) == 8 else head
    return ModelConfig.from_json(read_metadata(payload, str(path)).get("config", "null"), str(path))


def same_run(record: dict[str, Any], shipped: dict[str, Any], name: str) -> bool:
    """Whether a run's training record (its output's or its resume state's) is what is shipped already as
    `name`: shipped records carry the repository's paths (ship_paths.py), so both are compared in that form."""
    resume_only = ("resume_epoch", "optimizer_param_groups")
    run = {k: v for k, v in record.items() if k not in resume_only}
    return portable_record(run, name) == portable_record(shipped, name)


def trainer_key(family: str, args: dict[str, Any]) -> str:
    """The preset key of a run: its family, or 'eqm' for `ebm --objective eqm`."""
    return "eqm" if family == "ebm" and args.get("objective") == "eqm" else family


def trainer_argv(family: str, values: dict[str, Any]) -> tuple[list[str], list[str]]:
    """`<family> --flag value ...` for every option whose value differs from today's default, and the recorded
    options this version no longer has (dropped)."""
    config_type = TRAINER_CONFIGS[family]
    known = {item.name for item in dataclasses.fields(config_type)}
    return [family, *option_words(config_type, values)], sorted(set(values) - known)


def plan(
    checkpoints: Path,
    runs_dir: Path,
    *,
    preset: str = "cpu",
    epochs_more: int = 5,
    stop_after_minutes: float = 8.0,
    threads: int | None = 1,
    data_dir: str | None = None,
    only: list[str] | None = None,
) -> list[ZooRun]:
    """Decide each shipped model's chunk: resume its run, warm-start one, or leave a finished run for --ship."""
    paths = sorted(checkpoints.glob("*.safetensors"))
    if only:
        unknown = sorted(set(only) - {path.stem for path in paths})
        if unknown:
            raise ValueError(
                f"--only: no {', '.join(unknown)} in {checkpoints} (it has {', '.join(p.stem for p in paths)})"
            )
        paths = [path for path in paths if path.stem in only]
    runs = []
    for shipped in paths:
        name = shipped.stem
        config = read_config(shipped)
        recorded = config.training.get("args")
        if config.family not in TRAINER_CONFIGS or not isinstance(recorded, dict):
            runs.append(ZooRun(name, shipped, "skip", [], note="records no training.args to rebuild its run from"))
            continue
        out, run_dir = runs_dir / f"{name}.safetensors", runs_dir / f"{name}.run"
        resume_path = ResumeState.path(run_dir)
        shipped_done = int(config.training.get("epochs_done", 0))
        if resume_path.is_file():
            state = read_config(resume_path).training
            values = dict(state["args"])  # the run's own flags: it continues exactly
            done, target = int(state["resume_epoch"]), int(values["epochs"])
            if done >= target:
                if not same_run(state, config.training, name):
                    note = f"trained to epoch {done} of {target}; --ship brings it into {checkpoints}"
                    runs.append(ZooRun(name, shipped, "finished", [], out, note))
                    continue
                target = done + epochs_more  # shipped already: aim further
            action, values["resume"] = "resume", True
            note = f"epoch {done} of {target}"
        else:
            values = dict(recorded)
            key = trainer_key(config.family, values)
            values["batch_size"] = max(int(values.get("batch_size") or 0), PRESETS[preset]["batch_size"].get(key, 0))
            values["resume"], values["init_from"] = False, str(shipped.resolve())
            values["force"] = True  # no resume state to continue: what a broken chunk left in the run dir goes
            target = shipped_done + epochs_more  # a warm start counts its epochs on from the shipped ones
            action, note = "init-from", f"warm start from epoch {shipped_done}, to {target}"
            seconds = float(config.training.get("wall_seconds", 0.0))
            if shipped_done and seconds / shipped_done > stop_after_minutes * 60:
                minutes, device = seconds / shipped_done / 60, config.training.get("device")
                note += f"; its epochs took {minutes:.0f} min each on {device}, longer than a chunk"
        values.update(
            out=str(out.resolve()),
            run_dir=str(run_dir.resolve()),
            epochs=target,
            device=PRESETS[preset]["device"],
            threads=threads,
            stop_after_minutes=stop_after_minutes,
        )
        if data_dir is not None:
            values["data_dir"] = data_dir
        argv, dropped = trainer_argv(config.family, values)
        if dropped:
            note += f"; options this version lacks, dropped: {', '.join(dropped)}"
        trainer_parser(config.family).parse_args(argv[1:])  # a command the CLI would refuse fails here, first
        runs.append(ZooRun(name, shipped, action, argv, out, note))
    return runs


def execute(runs: list[ZooRun], runs_dir: Path, jobs: int = 1) -> dict[str, int]:
    """Run the chunks, `jobs` at a time (one per core); each run's output goes to <runs-dir>/<name>.log."""
    waiting = [run for run in runs if run.argv]
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    codes: dict[str, int] = {}
    runs_dir.mkdir(parents=True, exist_ok=True)
    while waiting or running:
        while waiting and len(running) < jobs:
            run = waiting.pop(0)
            log_path = runs_dir / f"{run.name}.log"
            log = log_path.open("a")
            log.write(f"\n$ {run.command()}\n")
            log.flush()
            process = subprocess.Popen(
                [sys.executable, "-m", "training", *run.argv], stdout=log, stderr=subprocess.STDOUT
            )
            running[run.name] = (process, log, time.monotonic())
            print(f"zoo: started {run.name} ({run.action}; log {log_path})", flush=True)
        time.sleep(1.0)
        for name, (process, log, started) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            codes[name] = process.returncode
            del running[name]
            outcome = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            print(f"zoo: {name} {outcome} after {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return codes


def check_sizes(
    incoming: dict[Path, int],
    directory: Path,
    file_limit: int = FILE_LIMIT,
    directory_limit: int = DIRECTORY_LIMIT,
) -> None:
    """Refuse (ShipRefused) unless every incoming file (path -> bytes) and the directory after them fit."""
    for path, size in incoming.items():
        if size >= file_limit:
            raise ShipRefused(
                f"{path.name} would be {size / 2**20:.2f} MiB; shipped files stay under {file_limit / 2**20:g} MiB"
            )
    kept = sum(path.stat().st_size for path in directory.iterdir() if path.is_file() and path not in incoming)
    total = kept + sum(incoming.values())
    if total >= directory_limit:
        raise ShipRefused(f"{directory} would hold {total / 1e6:.1f} MB; it stays under {directory_limit / 1e6:g} MB")


def evaluations(checkpoints: Path, shipped: list[Path], old_metrics: dict[Path, dict]) -> list[list[str]]:
    """The `evaluate --record` commands (after `python -m training evaluate`) that renew the figures each shipped
    file had: the same init, steps, label and n; an ensemble's figures with all its members together."""
    commands: list[list[str]] = []
    ensembles_done: set[str] = set()
    for path in shipped:
        config = read_config(path)
        metrics = old_metrics.get(path) or {}
        keys = [key for key in sorted(metrics) if key.startswith("evaluate")]
        family = family_named(config.family)
        if not keys:
            keys = [family.evaluate_key(config.sampler.get("init", "noise"))]
        for key in keys:
            figures = metrics.get(key, {})
            files = [str(path)]
            if key.startswith("evaluate_ensemble_"):
                if config.ensemble is None or config.ensemble in ensembles_done:
                    continue
                ensembles_done.add(config.ensemble)
                files = [
                    str(p)
                    for p in sorted(checkpoints.glob("*.safetensors"))
                    if read_config(p).ensemble == config.ensemble
                ]
            words = [*files, "--record", *family.evaluation_words(key, figures), *override_words(key)]
            if "_label_" in key:
                words += ["--label", key.partition("_label_")[2].split("_")[0]]
            if figures.get("n") and figures["n"] != 2000:
                words += ["--n", str(figures["n"])]
            commands.append(words)
    return commands


def ship(
    runs: list[ZooRun],
    checkpoints: Path,
    *,
    data_dir: str | None,
    device: str,
    dry_run: bool = False,
) -> int:
    """Copy finished runs' outputs into `checkpoints` as float16, record evaluate figures, print the table."""
    incoming: dict[Path, bytes] = {}
    old_metrics: dict[Path, dict] = {}
    for run in runs:
        if run.out is None or not run.out.is_file():
            continue
        record = read_config(run.out).training
        if int(record.get("epochs_done", 0)) < int(record["args"]["epochs"]):
            print(f"zoo: {run.name} not shipped: epoch {record.get('epochs_done')} of {record['args']['epochs']}")
            continue
        current = read_config(run.shipped)
        if same_run(record, current.training, run.name):
            continue  # this output is what is shipped already
        old_metrics[run.shipped] = current.metrics
        checkpoint = load_checkpoint(run.out)
        checkpoint.config.training = portable_record(record, run.name)  # the repository's paths, not this machine's
        incoming[run.shipped] = encode_checkpoint(checkpoint, torch.float16)
    if not incoming:
        print("zoo: nothing to ship (no run has reached its target since it was last shipped)")
        return 0
    check_sizes({path: len(payload) for path, payload in incoming.items()}, checkpoints)
    for path, payload in incoming.items():
        if dry_run:
            print(f"zoo: would ship {path} ({len(payload) / 2**20:.2f} MiB, float16)")
            continue
        atomic_write_bytes(path, payload)
        print(f"zoo: shipped {path} ({len(payload) / 2**20:.2f} MiB, float16)", flush=True)
    failures = 0
    for words in evaluations(checkpoints, list(incoming), old_metrics):
        words += ["--device", device] + (["--data-dir", data_dir] if data_dir else [])
        print("$ " + shlex.join(["python", "-m", "training", "evaluate", *words]), flush=True)
        if not dry_run:
            failures += subprocess.call([sys.executable, "-m", "training", "evaluate", *words]) != 0
    table = Path(__file__).resolve().parents[2] / "bench" / "models_table.py"
    print(f"$ python {table.relative_to(table.parents[1])} {checkpoints}", flush=True)
    if not dry_run:
        failures += subprocess.call([sys.executable, str(table), str(checkpoints)]) != 0
    return failures


def main(args: argparse.Namespace) -> int:
    """The `zoo` command: plan, print, run the chunks, optionally ship; the exit status counts failures."""
    if not 0 <= args.stop_after_minutes <= MAX_CHUNK_MINUTES:
        raise ValueError(
            f"--stop-after-minutes must lie in [0, {MAX_CHUNK_MINUTES:g}], not {args.stop_after_minutes:g}"
        )
    if args.jobs < 1:
        raise ValueError(f"--jobs must be 1 or more, not {args.jobs}")
    preset = args.preset if args.preset != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    runs_dir = Path(args.runs_dir).expanduser()
    data_dir = args.data_dir or os.environ.get("SAMPLEBAY_DATA_DIR")
    runs = plan(
        Path(args.checkpoints),
        runs_dir,
        preset=preset,
        epochs_more=args.epochs_more,
        stop_after_minutes=args.stop_after_minutes,
        threads=args.threads,
        data_dir=data_dir,
        only=args.only.split(",") if args.only else None,
    )
    for run in runs:
        print(f"# {run.name}: {run.action}" + (f" ({run.note})" if run.note else ""))
        if run.argv:
            print(run.command())
    training = [run for run in runs if run.argv]
    waves = math.ceil(len(training) / args.jobs)
    if waves > 1:
        print(
            f"# {len(training)} runs, {args.jobs} at a time: about {waves * args.stop_after_minutes:g} min in all;"
            " a lent GPU's command limit fits one wave (--only NAME,...)"
        )
    failures = 0
    if not args.dry_run and training:
        codes = execute(runs, runs_dir, args.jobs)
        failures += sum(code != 0 for code in codes.values())
    if args.ship:
        failures += ship(
            runs, Path(args.checkpoints), data_dir=data_dir, device=PRESETS[preset]["device"], dry_run=args.dry_run
        )
    return failures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", default="checkpoints", help="the shipped models to train or continue")
    parser.add_argument(
        "--runs-dir", default="~/samplebay-runs", help="outputs, run directories and logs, outside the work tree"
    )
    parser.add_argument(
        "--preset",
        choices=["auto", *sorted(PRESETS)],
        default="auto",
        help="cpu, or cuda (--device cuda and a larger batch per family for warm starts); auto: cuda when a GPU "
        "is visible",
    )
    parser.add_argument(
        "--stop-after-minutes",
        type=float,
        default=8.0,
        help=f"each run ends at the epoch end within this many minutes (at most {MAX_CHUNK_MINUTES:g})",
    )
    parser.add_argument("--epochs-more", type=int, default=5, help="epochs beyond the recorded ones the runs aim for")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (one per core)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument(
        "--only", default=None, metavar="NAME,...", help="only these models (checkpoint names; None: all)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="MNIST IDX files (None: $SAMPLEBAY_DATA_DIR, else each run's recorded one)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    parser.add_argument(
        "--ship",
        action="store_true",
        help="afterwards copy finished runs into --checkpoints as float16 (files < 5 MiB, directory < 30 MB), "
        "run evaluate --record on them and print the models table",
    )
