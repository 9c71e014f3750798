"""The replay buffer Langevin chains restart from (Du & Mordatch 2019): slots, restarts, and its saved state."""

from __future__ import annotations

import math
import threading

import torch


class ReplayBuffer:
    """Past negative samples that Langevin chains restart from (Du & Mordatch 2019, section 3.1).

    `draw` hands out slots (a slot is never handed to two chains at once until it is written back or
    released); a fraction `restart_prob` of the chains, and all while the buffer is empty, start from
    uniform noise instead. Fresh chains are appended until the buffer is full, then replace the
    oldest appended slot. Each slot may carry the class its chain samples (a class-conditional energy's
    chains; -1: none), so a chain drawn again moves under the same class. The state is plain tensors, so
    it is saved inside a checkpoint.

    Slots are held in `dtype`: the trainer keeps float32, a server float16 (half the memory; a chain's state
    in the data range loses nothing a Langevin step's noise would not). Chains are handed out and taken back
    in float32 either way. Capacity 0 is a buffer a server's byte budget refused: every chain starts from
    noise and none is kept. Writes take `lock`, so a save on another thread copies whole rows
    (`rows`) while chains go on stepping.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        capacity: int = 8192,
        restart_prob: float = 0.05,
        data_range: tuple[float, float] = (-1.0, 1.0),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"replay buffer capacity must be 0 (none kept) or more, got {capacity}")
        if not 0.0 <= restart_prob <= 1.0:
            raise ValueError(f"restart_prob must lie in [0, 1], got {restart_prob}")
        self.shape = tuple(shape)
        self.capacity = capacity
        self.restart_prob = restart_prob
        self.data_range = data_range
        self.samples = torch.empty(capacity, *self.shape, dtype=dtype)  # [capacity, *shape], rows < size are valid
        self.size = 0
        self.next_replace = 0  # oldest-appended slot to overwrite once full
        self.in_use = torch.zeros(capacity, dtype=torch.bool)
        self.labels = torch.full((capacity,), -1, dtype=torch.int64)  # [capacity] class of each slot's chain
        self.lock = threading.Lock()  # held while rows are written or copied out for a save

    def __len__(self) -> int:
        return self.size

    @property
    def dtype(self) -> torch.dtype:
        return self.samples.dtype

    @staticmethod
    def slot_bytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
        """Memory one slot holds: its sample, its class (int64) and its lease flag."""
        return math.prod(shape) * dtype.itemsize + 8 + 1

    @property
    def nbytes(self) -> int:
        return self.capacity * self.slot_bytes(self.shape, self.dtype)

    def rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Slots [start, stop) copied into `out` [>= stop - start, *shape] (one chunk a save reuses: no fresh
        allocation per chunk, which the C allocator would keep), with their classes [stop - start]; each row
        whole, taken under the lock writes hold. Returns the classes."""
        with self.lock:
            out[: stop - start].copy_(self.samples[start:stop])
            return self.labels[start:stop].clone()

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        low, high = self.data_range
        return torch.rand(n, *self.shape, generator=generator) * (high - low) + low

    def draw(
        self, n: int, generator: torch.Generator | None = None, label: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Starting points [n, *shape] and their slots [n] (-1 marks a chain started from noise); with
        `label`, only slots whose chains sample that class (the rest of the n start from noise)."""
        available = ~self.in_use[: self.size]
        if label is not None:
            available &= self.labels[: self.size] == label
        free = available.nonzero().squeeze(1)  # [F]
        restart = torch.rand(n, generator=generator) < self.restart_prob
        from_buffer = int((~restart).sum().clamp(max=free.numel()))
        order = torch.randperm(free.numel(), generator=generator)[:from_buffer]
        slots = torch.full((n,), -1, dtype=torch.int64)
        rows = (~restart).nonzero().squeeze(1)[:from_buffer]
        slots[rows] = free[order]
        x = self.noise(n, generator)
        x[rows] = self.samples[slots[rows]].float()
        self.in_use[slots[rows]] = True
        return x, slots

    def start_chains(
        self,
        n: int,
        generator: torch.Generator | None,
        asked: torch.Tensor | None,  # [n] classes a request asked for, or None
        fallback: torch.Tensor | None,  # [n] classes for chains that continue no classed slot (None: null label)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Buffer starts for one request's chains: states [n, *shape], slots [n] and each chain's class [n].

        Asked for one class, the chains continue only that class's slots; asked for none, each chain keeps
        the class of the slot it continues, so a conditional energy's buffer chains never switch classes.
        """
        single = asked is not None and len(asked) > 0 and bool((asked == asked[0]).all())
        x, slots = self.draw(n, generator, int(asked[0]) if single and asked is not None else None)
        if asked is not None:
            return x, slots, asked
        if not bool((slots >= 0).any()):  # every chain from noise (a refused buffer has no slots at all)
            return x, slots, fallback
        slot_classes = self.labels[slots.clamp(min=0)]
        classed = (slots >= 0) & (slot_classes >= 0)
        if not classed.any():
            return x, slots, fallback
        base = torch.full((n,), -1) if fallback is None else fallback.to("cpu")
        return x, slots, torch.where(classed, slot_classes, base)

    def write_back(self, slots: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Store finished chains: a drawn slot gets its chain back; a fresh chain takes a new slot. `labels`
        [n] (-1: none) is each chain's class; without it, drawn slots keep theirs and fresh ones get none."""
        x = x.detach().to("cpu", self.dtype)
        slots = slots.to("cpu")
        drawn = slots >= 0
        kept_labels = labels is not None
        labels = torch.full(slots.shape, -1) if labels is None else labels.to("cpu", torch.int64)
        fresh: list[tuple[int, int]] = []  # (row of x, slot it takes)
        for row in (~drawn).nonzero().squeeze(1).tolist():
            if self.size + len(fresh) < self.capacity:
                fresh.append((row, self.size + len(fresh)))
            else:
                slot = self._next_free_to_replace()
                if slot is not None:  # None: every slot is leased out: drop this chain rather than clobber one
                    fresh.append((row, slot))
        with self.lock:
            self.samples[slots[drawn]] = x[drawn]
            if kept_labels:
                self.labels[slots[drawn]] = labels[drawn]
            for row, slot in fresh:
                self.samples[slot] = x[row]
                self.labels[slot] = labels[row]
            self.size = min(self.capacity, self.size + sum(slot >= self.size for _, slot in fresh))
        self.in_use[slots[drawn]] = False

    def release(self, slots: torch.Tensor) -> None:
        """Give slots back unchanged (a cancelled chain)."""
        slots = slots.to("cpu")
        self.in_use[slots[slots >= 0]] = False

    def _next_free_to_replace(self) -> int | None:
        for _ in range(self.capacity):
            slot = self.next_replace
            self.next_replace = (self.next_replace + 1) % self.capacity
            if not self.in_use[slot]:
                return slot
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "samples": self.samples[: self.size].clone(),
            "labels": self.labels[: self.size].clone(),
            "capacity": torch.tensor(self.capacity),
            "restart_prob": torch.tensor(self.restart_prob, dtype=torch.float64),
            "next_replace": torch.tensor(self.next_replace),
            "data_range": torch.tensor(self.data_range, dtype=torch.float64),
        }

    @staticmethod
    def empty_state(
        shape: tuple[int, ...], capacity: int, restart_prob: float, data_range: tuple[float, float]
    ) -> dict[str, torch.Tensor]:
        """The state of an empty buffer of `capacity`, without allocating one (an exported energy's)."""
        return {
            "samples": torch.empty(0, *shape),
            "labels": torch.empty(0, dtype=torch.int64),
            "capacity": torch.tensor(capacity),
            "restart_prob": torch.tensor(restart_prob, dtype=torch.float64),
            "next_replace": torch.tensor(0),
            "data_range": torch.tensor(data_range, dtype=torch.float64),
        }

    @staticmethod
    def kept_rows(total: int, capacity: int) -> torch.Tensor:
        """Which of `total` saved rows a buffer of `capacity` keeps [min(total, capacity)]: all, or evenly
        spaced ones (so thinning keeps old and new chains alike)."""
        if total <= capacity:
            return torch.arange(total)
        return torch.linspace(0, total - 1, capacity).round().long()

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], capacity: int | None = None, dtype: torch.dtype = torch.float32
    ) -> ReplayBuffer:
        """The buffer a state holds, in `dtype`; with `capacity` (default: the saved one), thinned evenly to it."""
        samples = state["samples"]  # [n, *shape], float32 or float16
        low, high = state["data_range"].tolist()
        saved_capacity = int(state["capacity"])
        capacity = saved_capacity if capacity is None else capacity
        buffer = cls(tuple(samples.shape[1:]), capacity, float(state["restart_prob"]), (low, high), dtype)
        labels = state.get("labels", torch.full((len(samples),), -1))  # buffers saved before classes have none
        keep = cls.kept_rows(min(len(samples), saved_capacity), capacity)
        buffer.size = len(keep)
        if buffer.size == len(samples):
            buffer.samples[: buffer.size] = samples
            buffer.labels[: buffer.size] = labels
            buffer.next_replace = int(state["next_replace"]) % capacity if capacity else 0
        else:
            buffer.samples[: buffer.size] = samples[keep]
            buffer.labels[: buffer.size] = labels[keep]
            buffer.next_replace = buffer.size % capacity if capacity else 0
        return buffer

    @classmethod
    def pooled(
        cls,
        states: list[dict[str, torch.Tensor]],
        shape: tuple[int, ...],
        restart_prob: float,
        data_range: tuple[float, float],
        capacity: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ReplayBuffer:
        """One buffer holding every saved buffer of an ensemble's members (empty when none was saved); with
        `capacity` (default: the largest saved one, or all their samples), thinned evenly to it."""
        if not states:
            return cls(shape, 8192 if capacity is None else capacity, restart_prob, data_range, dtype)
        samples = torch.cat([state["samples"] for state in states])
        labels = torch.cat([state.get("labels", torch.full((len(state["samples"]),), -1)) for state in states])
        if capacity is None:
            capacity = max(max(int(state["capacity"]) for state in states), len(samples))
        buffer = cls(shape, capacity=capacity, restart_prob=restart_prob, data_range=data_range, dtype=dtype)
        keep = cls.kept_rows(len(samples), capacity)
        buffer.size = len(keep)
        buffer.samples[: buffer.size] = samples[keep]
        buffer.labels[: buffer.size] = labels[keep]
        buffer.next_replace = buffer.size % capacity if capacity and len(keep) < len(samples) else 0
        return buffer
