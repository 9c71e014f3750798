"""What a pool's step costs by the chains it advances, measured as it runs: the table the scheduler reads to
choose each step's batch (service/engine/scheduler.py) and /metrics shows."""

from __future__ import annotations

from collections import deque

RECENT_STEPS = 8  # a bucket of the step cost table reads as the median of its last this many timed steps
STALE_STEPS = RECENT_STEPS  # a bucket none of the table's last this many timed steps went to is stale (`fresh`)


def bucket_of(chains: int) -> int:
    """The step cost table's bucket of a chain count: floor(log2 chains), so [1], [2, 3], [4, 7], ..."""
    return chains.bit_length() - 1


def _bucket_name(level: int) -> str:
    """A bucket named by its chain counts: "1", "2-3", "4-7", ..."""
    return f"{2**level}-{2 ** (level + 1) - 1}" if level else "1"


def _median(values: list[float]) -> float:
    """statistics.median's value (the middle one, or the mean of the two middle ones), without its checks: a step
    reads two of a few values each."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


class StepCost:
    """What a step costs by the chains it advances, measured: a table of the pool's recent timed steps in buckets
    of chain counts a factor of 2 apart ([1], [2, 3], [4, 7], ...), each read as the median of its last
    `RECENT_STEPS` (so one slow first step, or a burst of load, does not move it), joined by straight lines.

    A table rather than a fitted curve: a CPU's cost per chain is flat, then rises once a batch's activations leave
    the caches (3 x 128²: 58 ms a chain at 8, 80 at 32, 124 at 64), a shape a line cannot show and a convex fit
    would smooth over where it bends; a dozen buckets cover 1 to 4,096 chains and assume nothing."""

    def __init__(self) -> None:
        self.buckets: dict[int, deque[tuple[int, float]]] = {}  # floor(log2 chains) -> recent (chains, seconds)
        self._points: dict[int, tuple[float, float]] = {}  # each bucket's point, updated as its steps come in
        self._table: list[tuple[float, float]] = []  # points(), kept as the buckets change (read several times a step)
        self.last_level: int | None = None  # the bucket of the latest timed step
        self.run = 0  # timed steps in a row in that bucket
        self.recorded = 0  # timed steps the table holds or held (those set aside not counted)
        self.latest: dict[int, int] = {}  # bucket -> `recorded` at its latest step
        self.timed: dict[int, int] = {}  # bucket -> its steps in the table since it was first measured (or forgotten)

    def observe(self, chains: int, seconds: float) -> dict[str, float]:
        """One timed step; a zero or negative interval (a fake clock, a coarse timer) says nothing and is ignored, and
        so is the first step in a bucket after a run of steps in another: its time carries what the step before left
        (that step's frames still being encoded and sent beside it, its freed blocks), which steps of one size in a
        row share out evenly and a lone step of another size does not. (Steps that alternate every step share it
        out too: none of them is set aside.) A step timed into a stale bucket (`stale`) starts its figure afresh: its
        old steps were of another load. Returns what changed in `by_bucket` (its bucket's entry, or nothing), for
        /metrics."""
        if seconds <= 0 or chains <= 0:
            return {}
        level, previous, run = bucket_of(chains), self.last_level, self.run
        self.last_level, self.run = level, run + 1 if level == previous else 1
        if previous is not None and level != previous and run >= 2:
            return {}
        steps = self.buckets.get(level)
        if steps is None:
            steps = self.buckets[level] = deque(maxlen=RECENT_STEPS)
        elif self.stale(level) is not None:  # its steps were of another load: this one starts its figure afresh
            steps.clear()
        steps.append((chains, seconds))
        self.timed[level] = self.timed.get(level, 0) + 1
        self.recorded += 1
        self.latest[level] = self.recorded
        middle = _median([count for count, _ in steps])
        per_chain = _median([taken for _, taken in steps]) / middle
        fresh = level not in self._points
        self._points[level] = (middle, per_chain)
        if fresh:
            self._table = [self._points[level] for level in sorted(self._points)]
        else:  # the same buckets, in the same order: one point moved
            self._table[sorted(self._points).index(level)] = (middle, per_chain)
        return {_bucket_name(level): per_chain}

    def points(self) -> list[tuple[float, float]]:
        """(chains, seconds per chain) of each bucket measured, fewest chains first: the median chain count of its
        recent steps, and their median seconds over it (a step's cost rises with its chains, so the two medians
        belong together)."""
        return self._table

    def fresh(self) -> list[tuple[float, float]]:
        """points() of the buckets measured in the table's last STALE_STEPS timed steps: figures of one load, as the
        bucket stepped all along reads its median over its last RECENT_STEPS. A bucket left longer keeps the figure
        of its time, and on a shared CPU the load moves the other's: the two differ by what the load did as much as
        by what the batch does (issue 37: 128 chains' figure, ninety steps old, read 10 % cheaper a chain than 64
        chains' under a heavier load; measured again, it was dearer)."""
        return [point for level, point in zip(sorted(self._points), self._table, strict=True) if not self.stale(level)]

    def stale(self, level: int) -> tuple[float, float] | None:
        """A bucket's point if it is measured but by none of the table's last STALE_STEPS timed steps, else None."""
        if level in self.latest and self.recorded - self.latest[level] >= STALE_STEPS:
            return self._points[level]
        return None

    def forget(self, level: int) -> None:
        """Drop a bucket's steps, so that it is measured afresh (its next steps its only ones)."""
        self.buckets.pop(level, None)
        self.latest.pop(level, None)
        self.timed.pop(level, None)
        if self._points.pop(level, None) is not None:
            self._table = [self._points[level] for level in sorted(self._points)]

    def by_bucket(self) -> dict[str, float]:
        """Each measured bucket's median cost per chain, named by its chain counts ("1", "2-3", "4-7"): /metrics."""
        names = [_bucket_name(level) for level in sorted(self.buckets)]
        return {name: per_chain for name, (_, per_chain) in zip(names, self.points(), strict=True)}

    def seconds(self, chains: float) -> float | None:
        """A step's cost at `chains`, on the lines between the buckets' points (beyond them, the nearest line
        extended); None until two buckets are measured (no slope to read)."""
        table = [(at, at * per_chain) for at, per_chain in self.points()]
        if len(table) < 2:
            return None
        right = next((index for index, (at, _) in enumerate(table) if at >= chains), len(table) - 1)
        (b0, c0), (b1, c1) = table[max(right, 1) - 1], table[max(right, 1)]
        return max(0.0, c0 + (c1 - c0) * (chains - b0) / (b1 - b0))
