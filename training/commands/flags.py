"""What every command's parser shares: flags made from config dataclasses (each field's comment is its help),
the help formatter, and the trainers' configs by family (the zoo re-parses a trainer's command with them)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
from collections.abc import Callable

from training.train.ebm_config import EBMTrainConfig
from training.train.flow import FlowTrainConfig
from training.train.gan import GANTrainConfig

TRAINER_CONFIGS: dict[str, type] = {"ebm": EBMTrainConfig, "gan": GANTrainConfig, "flow": FlowTrainConfig}


@functools.cache
def field_comments(config_type: type) -> dict[str, str]:
    """Each field's end-of-line comment in the source of its config dataclass (a subclass's own comment over
    its base's): the comments that document the defaults are also the flags' help."""
    comments: dict[str, str] = {}
    for klass in reversed(config_type.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        field_on_line: dict[int, str] = {}
        previous = None
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.OP and token.string == ":" and previous is not None:
                if previous.type == tokenize.NAME and previous.start[1] == 4:  # `name:` in the class body
                    field_on_line[previous.start[0]] = previous.string
            elif token.type == tokenize.COMMENT and token.start[0] in field_on_line:
                comments[field_on_line[token.start[0]]] = token.string.lstrip("#").strip()
            if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                previous = token
    return comments


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_type: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field, so the dataclass stays the single list of options, defaults and their help
    (each field's comment)."""
    comments = field_comments(config_type)
    for item in dataclasses.fields(config_type):
        if item.name in skip:
            continue
        flag = "--" + item.name.replace("_", "-")
        default = item.default
        kind = str(item.type)
        text = comments.get(item.name, "").replace("%", "%%")
        if kind in ("bool", "bool | None"):  # None: the default is decided later (per loss, per family)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif "int" in kind and "float" not in kind and "str" not in kind:  # a `str` one takes words too (auto)
            parser.add_argument(flag, type=int, default=default, help=text)
        elif "float" in kind:
            parser.add_argument(flag, type=float, default=default, help=text)
        else:
            parser.add_argument(flag, type=str, default=default, help=text)


def config_from(args: argparse.Namespace, config_type: type):
    names = {item.name for item in dataclasses.fields(config_type)}
    return config_type(**{key: value for key, value in vars(args).items() if key in names})


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default (unless the help already names it); descriptions and epilogs
    print as written, so the examples keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        default = "none" if action.default is None else str(action.default).replace("%", "%%")
        return f"{text} (default: {default})"


def positive_float(text: str) -> float:
    """An argparse type for tolerances: a bad value exits 2 with the flag's name and what would be right."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {text}")
    return value


def count_at_least(least: int) -> Callable[[str], int]:
    """An argparse type for counts of at least `least` (probes >= 1, images >= 0)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, not {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, not {value}")
        return value

    return parse


def add_likelihood_arguments(parser: argparse.ArgumentParser) -> None:
    """evaluate's flags for a CNF's test bits/dim (training/sampling/likelihood.py). Their defaults are None
    here and resolved by evaluate, so a flag given for a model without an ODE is refused rather than ignored."""
    parser.add_argument(
        "--ode-rtol",
        type=positive_float,
        default=None,
        help="CNFs: relative tolerance of the adaptive dopri5 solve behind test bits/dim (default 1e-5)",
    )
    parser.add_argument(
        "--ode-atol",
        type=positive_float,
        default=None,
        help="CNFs: absolute tolerance of that solve (default 1e-5)",
    )
    parser.add_argument(
        "--probes",
        type=count_at_least(1),
        default=None,
        help="CNFs: Rademacher probes of Hutchinson's divergence estimate per image; their noise is inside the "
        "reported standard error (default 1: for the same time, more images shrink it more than more probes)",
    )
    parser.add_argument(
        "--exact-trace",
        action="store_true",
        default=None,
        help="CNFs: the exact divergence instead of Hutchinson's (one backward pass per dimension, 784 on MNIST: "
        "hundreds of times slower; for a small --likelihood-n; default: off)",
    )
    parser.add_argument(
        "--likelihood-n",
        type=count_at_least(0),
        default=None,
        help="CNFs: test images behind bits/dim, a seeded random subset (about 2.4 s an image on one core at rtol "
        "1e-5 for a 345k-parameter field; 0: no likelihood; default 200)",
    )


def trainer_parser(family: str) -> argparse.ArgumentParser:
    """The flags of `python -m training FAMILY` alone: what the zoo checks a rebuilt command against."""
    if family not in TRAINER_CONFIGS:
        raise ValueError(f"the zoo trains {', '.join(TRAINER_CONFIGS)} checkpoints, not {family!r}")
    parser = argparse.ArgumentParser(prog=f"python -m training {family}", formatter_class=HelpFormatter)
    add_dataclass_arguments(parser, TRAINER_CONFIGS[family])
    return parser
