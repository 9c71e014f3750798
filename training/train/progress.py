"""Progress of long work on stderr: a tqdm bar on a terminal, plain lines in a log file or a pipe."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm


class PlainProgress:
    """Progress as whole lines on stderr for a log file or a pipe, where a bar's carriage returns pile up:
    a line every `interval` seconds and one at the end (none for work shorter than the interval).
    The part of tqdm's interface the commands use: iterate, `update`, `set_postfix`, `close`."""

    interval = 10.0  # seconds between lines

    def __init__(
        self, iterable: Iterable | None, total: int | None, description: str, unit: str = "it", unit_scale: bool = False
    ) -> None:
        self.iterable, self.total, self.description = iterable, total, description
        self.unit, self.unit_scale = unit, unit_scale
        self.n: float = 0
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.printed_at: float | None = None  # n at the last line printed

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "PlainProgress made without an iterable: call update instead"
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _amount(self, value: float) -> str:
        return f"{value / 1e6:.1f} M{self.unit}" if self.unit_scale else f"{value:g}"

    def _line(self) -> None:
        done = self._amount(self.n)
        if self.total:
            done = f"{done}/{self._amount(self.total)} ({100 * self.n / self.total:.0f}%)"
        postfix = f", {self.postfix}" if self.postfix else ""
        elapsed = time.monotonic() - self.start
        print(f"{self.description}: {done}, {elapsed:.0f} s{postfix}", file=sys.stderr, flush=True)
        self.printed_at = self.n
        self.last_line = time.monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_line >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        long_work = self.printed_at is not None or time.monotonic() - self.start >= self.interval
        if long_work and self.printed_at != self.n:
            self._line()
        self.printed_at = self.n
        self.start = self.last_line = float("inf")  # closed: no more lines


def progress(
    iterable: Iterable | None, total: int | None, description: str, unit: str = "it", unit_scale: bool = False
) -> tqdm | PlainProgress:
    """Progress of long work on stderr, for training, sampling, evaluation and downloads alike: a tqdm bar
    on a terminal, plain lines (`PlainProgress`) when stderr is a file or a pipe."""
    if sys.stderr.isatty():
        return tqdm(
            iterable,
            total=total,
            desc=description,
            unit=unit,
            unit_scale=unit_scale,
            dynamic_ncols=True,
            mininterval=1.0,
        )
    return PlainProgress(iterable, total, description, unit, unit_scale)
