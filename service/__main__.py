"""`python -m service`: flags override SAMPLEBAY_* environment variables, which override defaults."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from service.app import create_app
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve samples from checkpoints.")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--models-dir")
    parser.add_argument("--state-dir")
    parser.add_argument("--device", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--api-key")
    parser.add_argument("--max-n", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--chain-budget", type=int, help="most chains one model advances in one batched step")
    parser.add_argument("--max-queue", type=int)
    parser.add_argument("--request-timeout-s", type=float)
    parser.add_argument("--buffer-save-interval-s", type=float)
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
