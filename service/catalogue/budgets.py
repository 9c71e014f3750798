"""A server's memory budgets in one place: every replay buffer's slots (`BufferBudget`, --buffer-budget-mb) and the
chains on the device (`DeviceBudget`, --device-budget-mb). The third, the bytes of model files loaded at once
(--max-loaded-model-bytes), is checked where files are loaded (service/catalogue/model_watch.py). No torch here:
the pools say what their chains need in bytes, these only count."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MIN_BUFFER_SLOTS = 16  # a budget that leaves fewer refuses the buffer: a handful of slots would only repeat chains


@dataclass(frozen=True)
class BufferGrant:
    """What the budget gave one buffer group: slots, and why fewer than it asked for (None: all of them)."""

    capacity: int
    wanted: int
    reason: str | None = None


class BufferBudget:
    """One byte budget for every replay buffer a server holds (--buffer-budget-mb).

    Groups are granted in the order their pools are built; a group that does not fit is thinned to what
    the budget has left (its saved slots kept evenly), or refused when fewer than MIN_BUFFER_SLOTS fit (its
    chains then start from noise and none is kept). A group's new version takes its old version's share.
    """

    def __init__(self, total_bytes: int, setting: str = "--buffer-budget-mb") -> None:
        self.total_bytes = total_bytes
        self.setting = setting
        self.granted: dict[str, int] = {}  # group -> bytes

    def grant(self, name: str, wanted: int, slot_bytes: int) -> BufferGrant:
        others = sum(size for group, size in self.granted.items() if group != name)
        left = max(0, self.total_bytes - others)
        capacity = min(wanted, left // slot_bytes)
        reason = None
        budget = f"the server's buffer budget ({self.setting} {self.total_bytes / 2**20:.4g})"
        budget = f"{budget} has {left / 2**20:.4g} MiB left"
        if capacity < min(wanted, MIN_BUFFER_SLOTS):
            capacity = 0
            reason = (
                f"refused: {wanted:,} slots of {slot_bytes:,} bytes need {wanted * slot_bytes / 2**20:.4g} MiB and "
                f"{budget}, fewer than {MIN_BUFFER_SLOTS} slots; its chains start from noise and none is kept: "
                f"raise {self.setting}"
            )
        elif capacity < wanted:
            reason = (
                f"thinned from {wanted:,} to {capacity:,} slots ({slot_bytes:,} bytes each): {budget}; "
                f"raise {self.setting} to keep them all"
            )
        self.granted[name] = capacity * slot_bytes
        return BufferGrant(capacity, wanted, reason)

    def retain(self, names: Iterable[str]) -> None:
        """Forget the grants of groups no longer served."""
        kept = set(names)
        self.granted = {name: size for name, size in self.granted.items() if name in kept}


class DeviceBudget:
    """One byte budget for the chains on the device, over every pool of a worker (--device-budget-mb).

    Two kinds of bytes count against it. What a running request *holds* between steps (its chains' states and
    velocities, and the trajectory frames it keeps) is held from its admission to its answer; a request is admitted
    only while what is held, its own bytes and one chain's step still fit. What a *step* needs besides (the
    network's activations for the gradient, the noise, the new states: a pool's bytes per chain, measured) is
    needed only while it runs, and the worker steps one pool at a time: a step advances at most as many chains as
    the bytes not held allow, so a request larger than that is stepped in slices of chains (its images are the
    same: every chain's noise is its own, training/sampling/noise.py).
    """

    def __init__(self, total_bytes: int | None, setting: str = "--device-budget-mb") -> None:
        self.total_bytes = total_bytes  # None: no bound
        self.setting = setting
        self.held: dict[int, int] = {}  # id(job) -> bytes it holds

    @property
    def held_bytes(self) -> int:
        return sum(self.held.values())

    def described(self) -> str:
        return f"the device budget ({self.setting} {(self.total_bytes or 0) / 2**20:.4g})"

    def fits_alone(self, held: int, step_per_chain: int) -> bool:
        """Whether a request holding `held` bytes could ever run: alone, with one chain's step beside it."""
        return self.total_bytes is None or held + step_per_chain <= self.total_bytes

    def admits(self, held: int, step_per_chain: int) -> bool:
        """Whether a request holding `held` bytes fits now, beside what running requests hold and one chain's step."""
        return self.total_bytes is None or self.held_bytes + held + step_per_chain <= self.total_bytes

    def hold(self, key: int, held: int) -> None:
        self.held[key] = held

    def release(self, key: int) -> None:
        self.held.pop(key, None)

    def step_chains(self, step_per_chain: int) -> int | None:
        """The most chains one step may advance by the bytes not held (at least 1); None: no bound."""
        if self.total_bytes is None or step_per_chain <= 0:
            return None
        return max(1, (self.total_bytes - self.held_bytes) // step_per_chain)
