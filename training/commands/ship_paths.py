"""Shipped checkpoints record their run in the repository's own layout, not the machine that trained them.

A run records its flags and command line with the paths it was given (`/root/samplebay-runs/...`, a data mirror
elsewhere); a newcomer reading a shipped checkpoint's command should see `checkpoints/NAME.safetensors`,
`runs/NAME` and `data/mnist`, the paths of the README's quick start. The zoo ships through here and compares
runs in this form, so a rewritten record still counts as the run it came from.
"""

from __future__ import annotations

import copy
from pathlib import PurePath
from typing import Any

PATH_ARGS = ("out", "run_dir", "data_dir", "init_from")  # training.args holding paths


def portable_path(arg: str, value: str, name: str) -> str:
    if arg == "out":
        return f"checkpoints/{name}.safetensors"
    if arg == "run_dir":
        return f"runs/{name}"
    if arg == "data_dir":
        return f"data/{PurePath(value).name}"
    return f"checkpoints/{PurePath(value).name}"  # init_from: a checkpoint the run started from


def portable_record(training: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of a checkpoint's `training` record with its paths (args and command line) in the repository's
    layout; other fields as they are."""
    record = copy.deepcopy(training)
    args = record.get("args")
    if not isinstance(args, dict):
        return record
    command = record.get("command")
    for arg in PATH_ARGS:
        value = args.get(arg)
        if not isinstance(value, str) or not value:
            continue
        args[arg] = portable_path(arg, value, name)
        if isinstance(command, str):
            command = command.replace(value, args[arg])
    if isinstance(command, str):
        record["command"] = command
    return record
