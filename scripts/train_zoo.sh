#!/usr/bin/env bash
# Train or continue every shipped model in resumable chunks: see `python -m training zoo --help`.
cd "$(dirname "$0")/.." && exec python -m training zoo "$@"
