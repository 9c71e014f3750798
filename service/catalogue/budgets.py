"""A server's memory budgets in one place (`MemoryBudgets`, built from its settings): the bytes of model files
loaded at once (`ModelBudget`, --max-loaded-model-bytes), every replay buffer's slots (`BufferBudget`,
--buffer-budget-mb) and the chains on the device (`DeviceBudget`, --device-budget-mb). No torch here: the model
watch, the buffer keeper and the pools say how many bytes they would hold, these only count and refuse with a
reason that names the setting."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings

MIN_BUFFER_SLOTS = 16  # a budget that leaves fewer refuses the buffer: a handful of slots would only repeat chains


class ModelBudget:
    """One byte budget for the model files loaded at once, all files together (--max-loaded-model-bytes).

    A file's bytes (a program's with its sidecar's and companions') are counted from its load until it is removed;
    a new version takes its old version's share. A file that would pass the budget is refused (unread, when its
    size on disk already does), and tried again at every scan, so it is taken once others leave.
    """

    def __init__(self, total_bytes: int | None, setting: str = "max_loaded_model_bytes") -> None:
        self.total_bytes = total_bytes  # None: no bound
        self.setting = setting
        self.loaded: dict[str, int] = {}  # file -> bytes its version loaded now holds

    def refusal(self, name: str, size: int) -> str | None:
        """Why loading `size` bytes as `name` (replacing its version loaded now) would pass the budget; None when
        it fits."""
        if self.total_bytes is None:
            return None
        others = sum(held for file, held in self.loaded.items() if file != name)
        if others + size <= self.total_bytes:
            return None
        return (
            f"{name} ({size:,} bytes) would bring the model files loaded to {others + size:,} bytes, past "
            f"{self.setting} ({self.total_bytes:,}); remove a model or raise the budget"
        )

    def take(self, name: str, size: int) -> None:
        self.loaded[name] = size

    def release(self, name: str) -> None:
        self.loaded.pop(name, None)


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


@dataclass
class MemoryBudgets:
    """Every byte budget of one server: the model watch counts loaded model files against `models`, the worker's
    buffer keeper its replay buffers against `buffers`, and its chain pools their chains against `device`."""

    models: ModelBudget = field(default_factory=lambda: ModelBudget(None))
    buffers: BufferBudget = field(default_factory=lambda: BufferBudget(2**62))
    device: DeviceBudget = field(default_factory=lambda: DeviceBudget(None))

    @classmethod
    def from_settings(cls, settings: Settings) -> MemoryBudgets:
        device_mb = settings.device_budget_mb
        return cls(
            models=ModelBudget(settings.max_loaded_model_bytes),
            buffers=BufferBudget(int(settings.buffer_budget_mb * 2**20)),
            device=DeviceBudget(None if device_mb is None else int(device_mb * 2**20)),
        )
