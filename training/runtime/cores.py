"""How many CPU threads torch should run: the one rule behind the server's `--threads` and training's.

PyTorch's CPU kernels run on OpenMP threads that spin while they wait for each other, so a thread on a core
that another process holds stalls every parallel step of the rest. On two cores with one held by a training
run, the quick-start epoch took 19.3 min at torch's default (a thread per core) and about 15x less at one
thread, and the server took 65 s to start instead of 10 (issue 29). So `auto` counts the cores idle when the
process starts, not the cores there are. Nothing here imports torch: the server checks its settings first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

AUTO: Literal["auto"] = "auto"
PROC_STAT = Path("/proc/stat")
CGROUP = Path("/sys/fs/cgroup")  # a container's own cgroup is mounted here (cgroup namespaces)
IDLE_WINDOW_S = 0.2  # long enough for a core's ticks (100 a second) to tell busy from idle


def parse_threads(value: int | str) -> int | Literal["auto"]:
    """A `--threads` value, from a flag's text or a number: 'auto' or a count of 1 or more."""
    text = str(value).strip()
    if text == AUTO:
        return AUTO
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--threads must be auto or a whole number of 1 or more, not {str(value)!r}")


def usable_cores() -> list[int]:
    """The cores this process may run on (a container's or taskset's cpuset, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs' worth of time this container may use (`docker run --cpus`, compose `cpus:`), from its cgroup's CFS
    quota (v2 `cpu.max`, v1 `cpu/cpu.cfs_quota_us` over `cpu.cfs_period_us`); None when unlimited or unreadable.
    A cpuset says which cores; a quota says how much of them, and threads past it are throttled in turn."""
    try:
        if (root / "cpu.max").is_file():
            quota_text, period_text = (root / "cpu.max").read_text().split()[:2]
            if quota_text == "max":
                return None
            quota, period = int(quota_text), int(period_text)
        else:
            quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def allowed_cores() -> tuple[int, str]:
    """How many cores' worth this process may use, and a note when a cgroup quota, not the cpuset, sets it."""
    cores = len(usable_cores())
    quota = cpu_quota()
    if quota is None or quota >= cores:
        return cores, ""
    return max(1, int(quota)), f" (cgroup CPU quota {quota:g})"


def per_core_ticks(stat: str) -> dict[int, tuple[int, int]]:
    """/proc/stat's `cpuN` lines -> {N: (idle ticks, all ticks)}: idle counts iowait; all leaves out guest time,
    which user time already holds, and counts steal time, which a hypervisor gave to someone else."""
    ticks = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            user, nice, system, idle, iowait, irq, softirq, steal = (int(field) for field in fields[:8])
            ticks[int(name[3:])] = (idle + iowait, user + nice + system + idle + iowait + irq + softirq + steal)
    return ticks


def idle_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cores: list[int]) -> float:
    """How many of `cores`' worth of time went idle between two readings (1.5: one core free, another half)."""
    idle = 0.0
    for core in cores:
        if core in before and core in after:
            spent = after[core][1] - before[core][1]
            idle += (after[core][0] - before[core][0]) / spent if spent > 0 else 1.0
    return idle


def idle_cores(window_s: float = IDLE_WINDOW_S) -> tuple[int, int] | None:
    """(cores left idle by every process over the next `window_s`, at least 1; cores this process may use), from
    /proc/stat; None where it cannot be read (not Linux). This process sleeps meanwhile, so it does not count."""
    cores = usable_cores()
    try:
        before = per_core_ticks(PROC_STAT.read_text())
        time.sleep(window_s)
        after = per_core_ticks(PROC_STAT.read_text())
    except (OSError, ValueError):
        return None
    if not any(core in before and core in after for core in cores):
        return None
    return min(len(cores), max(1, int(idle_between(before, after, cores) + 0.5))), len(cores)


def _omp_threads() -> int | None:
    """OMP_NUM_THREADS when it holds one count: the knob OpenMP users (and the benches) already set."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) >= 1 else None


def thread_count(setting: int | str | None) -> tuple[int, str]:
    """The torch threads for `setting`, and why, for the start-up log.

    A count is taken as given. `auto` (the server's default) is OMP_NUM_THREADS when set, else the cores
    idle at start. None (training's default) is OMP_NUM_THREADS when set, else 1: a run lasts hours, and a
    count chosen from an idle moment stalls ~15x once another process starts, where one thread loses at most
    the other cores' share (one run per core: the zoo runs several side by side).
    """
    chosen = None if setting is None else parse_threads(setting)
    if isinstance(chosen, int):
        return chosen, f"--threads {chosen}"
    if (omp := _omp_threads()) is not None:
        return omp, f"{'auto: ' if chosen == AUTO else ''}OMP_NUM_THREADS={omp}"
    if chosen is None:
        return 1, "the default: one run per core; --threads auto or N for more"
    allowed, note = allowed_cores()
    reading = idle_cores()
    if reading is None:
        return allowed, f"auto: {allowed} cores{note}; their load could not be read"
    idle, cores = reading
    if idle > allowed:
        return allowed, f"auto: {idle} of {cores} cores idle, {allowed} allowed{note}"
    return idle, f"auto: {idle} of {cores} cores idle"
