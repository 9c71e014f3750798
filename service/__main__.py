"""`python -m service`: flags override SAMPLEBAY_* environment variables, which override defaults."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn

from service.app import create_app
from service.settings import Settings

FLAG_TYPES = {int: int, float: float, Path: str}  # anything else (str, str | None) is read as a string


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field, so the settings class stays the single list of options."""
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve samples from checkpoints.")
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else "none"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=FLAG_TYPES.get(field.annotation, str),  # type: ignore[arg-type]
            help=f"{field.description} (default: {default}; env SAMPLEBAY_{name.upper()})",
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
