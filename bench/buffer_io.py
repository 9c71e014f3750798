"""A full replay buffer saved and loaded as a server does: how long, how much memory above the buffer, and how
long a chain step's write-back waits while the save runs.

    python bench/buffer_io.py --shape 3 128 128 --slots 10000

Saves run on a thread of their own (service/catalogue/buffer_store.py); while one runs, this script writes 64
chains back into the buffer again and again, as finished requests do, and reports the slowest write-back: the stall
a save causes a step. Memory is the process's resident set, sampled every 5 ms.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time
from pathlib import Path

import torch

from service.catalogue.buffer_store import BUFFER_DTYPE, BufferStore
from training.sampling.replay_buffer import ReplayBuffer

MiB = 2**20


def rss() -> int:
    """Resident bytes of this process now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The largest resident set seen while the block runs (sampled every 5 ms on a thread)."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 128, 128], help="one sample's shape")
    parser.add_argument("--slots", type=int, default=10_000, help="replay-buffer capacity, filled")
    parser.add_argument("--chains", type=int, default=64, help="chains written back per step while saving")
    parser.add_argument("--state-dir", type=Path, default=None, help="where to save (default: a temporary one)")
    args = parser.parse_args()
    shape = tuple(args.shape)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        store = BufferStore(args.state_dir or Path(scratch))
        baseline = rss()
        buffer = ReplayBuffer(shape, args.slots, dtype=BUFFER_DTYPE)
        for start in range(0, args.slots, 256):  # filled in pieces, as chains fill it
            count = min(256, args.slots - start)
            buffer.write_back(torch.full((count,), -1), torch.rand(count, *shape) * 2 - 1)
        held = rss() - baseline
        print(f"buffer: {args.slots:,} slots of {list(shape)} in {buffer.dtype}: {buffer.nbytes / MiB:.0f} MiB")
        print(f"  resident after filling: +{held / MiB:.0f} MiB")

        x = torch.rand(args.chains, *shape) * 2 - 1
        slots = torch.arange(args.chains)
        stalls: list[float] = []
        outcome: list[bool] = []
        with PeakRss() as memory:
            started = time.perf_counter()
            saver = threading.Thread(target=lambda held=buffer: outcome.append(store.save("bench", "ab" * 32, held)))
            saver.start()
            while saver.is_alive() and args.chains:
                tick = time.perf_counter()
                buffer.write_back(slots, x)
                stalls.append(time.perf_counter() - tick)
                time.sleep(0.002)  # a step's compute, roughly, between write-backs
            saver.join()
            saved_s = time.perf_counter() - started
        assert outcome == [True]
        size = store.path("bench", "ab" * 32).stat().st_size
        stalls = sorted(stalls) or [0.0]
        print(f"save: {saved_s:.2f} s on its own thread, {size / MiB:.0f} MiB file")
        print(f"  peak resident above the buffer while saving: +{(memory.peak - memory.start) / MiB:.0f} MiB")
        print(
            f"  write-backs of {args.chains} chains during the save: {len(stalls)}, "
            f"median {1000 * stalls[len(stalls) // 2]:.2f} ms, slowest {1000 * stalls[-1]:.2f} ms"
        )

        del buffer
        gc.collect()
        with PeakRss() as memory:
            started = time.perf_counter()
            loaded = store.load("bench", "ab" * 32, shape, args.slots, BUFFER_DTYPE)
            load_s = time.perf_counter() - started
        assert loaded is not None and len(loaded) == args.slots
        print(
            f"load: {load_s:.2f} s, peak resident +{(memory.peak - memory.start) / MiB:.0f} MiB "
            f"for a {loaded.nbytes / MiB:.0f} MiB buffer"
        )


if __name__ == "__main__":
    main()
