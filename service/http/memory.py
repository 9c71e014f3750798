"""Giving freed memory back to the operating system.

glibc's malloc keeps the pages of freed blocks for reuse, per thread arena, and big blocks freed in
another order than they were made in (a stream's frames, dropped while the worker makes new ones among
them) leave holes it does not hand back: measured on a [1, 128, 128] energy, three streams nobody reads
left the server ~300 MB bigger with nothing alive in it. Two remedies. Blocks of 4 MiB and more (a step's
tensors, a frame) get mappings of their own, unmapped when freed (`map_large_blocks`). `malloc_trim(0)`
returns the free pages of the smaller ones (~30 ms on such a heap); it runs on a thread of its own, at most
once a second however often it is asked for, and a request is never lost: one made during a trim or the
pause after it gets a trim of its own. It is asked for as a stream drops or frees frames (bridge.py) and once
each time the worker's chains run out (the app hands `return_freed_memory` to the Worker as its `on_idle`), so
memory goes back to near idle after a load. Where the C library is not glibc (musl, macOS) both do nothing.

The price of the first remedy is a fresh mapping, and a page fault for every page of it, for each big block.
A pass of gradients pays it many times over (eqm_mnist's `typicality`: four backward passes of 64 images, each
with activations of 4 to 10 MB), so the worker's one-pass score passes run inside `heap_blocks`, which hands
out blocks below glibc's own ceiling from the heap again for the pass's duration (bench/score_throughput.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable, Iterator

TRIM_INTERVAL_S = 1.0  # trims cost the worker page faults as it touches its memory again
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD_BYTES = 4 << 20  # 1 MiB also mapped MNIST-sized activations: their steps ran 40-70% slower
HEAP_THRESHOLD_BYTES = 32 << 20  # the most glibc raises its own threshold to (64-bit)
HEAP_TRIM_BYTES = 2 * HEAP_THRESHOLD_BYTES  # the trim threshold glibc pairs with it: a freed pass is not trimmed
DEFAULT_TRIM_BYTES = 128 << 10  # glibc's trim threshold, which stays put once the mmap threshold is set


def _libc_function(name: str) -> Callable[..., int] | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        return getattr(ctypes.CDLL(path), name, None)
    except OSError:
        return None


_mallopt = _libc_function("mallopt")


def map_large_blocks() -> bool:
    """Give blocks of MMAP_THRESHOLD_BYTES and more mappings of their own, returned to the OS when freed; whether
    the C library took it.

    glibc starts so at 128 KiB, but raises the threshold to the size of each mapped block freed (up to 32 MiB):
    from then on a step's tensors and a stream's frames come from the heap, and freed out of order they stay
    resident. A threshold set once is never raised (bench/stream_memory.py, three never-read n-64 streams of
    a [1, 128, 128] energy: +249 MB over idle before, +139 to +153 MB after; docs/api.md). The price is page
    faults on every fresh mapping: those streams ran 15% slower."""
    return _mallopt is not None and _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


@contextlib.contextmanager
def heap_blocks() -> Iterator[None]:
    """Inside: blocks under HEAP_THRESHOLD_BYTES come from the heap, and what is freed stays there for reuse (the
    thresholds a process that never called `map_large_blocks` ends up with); after: MMAP_THRESHOLD_BYTES and
    glibc's default trim threshold again (so only for a server that set them).

    For the worker's one-pass score passes (service/engine/pools/score.py): 8 requests of 64 eqm_mnist images
    (scores and `typicality` gradient norms) ran on the worker at 62 images a CPU second with every block of 4 MiB
    and more freshly mapped (a third of the time in the kernel, faulting pages in), 84 with only the mmap threshold
    raised (the heap's freed top trimmed), 105 inside this, 94 with glibc's defaults (one core, shared with others).
    What a pass frees stays in the worker's arena for the next one until the trim once the work runs out. The
    setting is the process's: a big block another thread makes meanwhile (the HTTP side's are small) comes from
    the heap too, and goes back at the same trim."""
    if _mallopt is None or _mallopt(M_MMAP_THRESHOLD, HEAP_THRESHOLD_BYTES) != 1:
        yield
        return
    _mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_BYTES)
    try:
        yield
    finally:
        _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        _mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_BYTES)


class _Trimmer:
    def __init__(self, trim: Callable[[int], int] | None, interval_s: float) -> None:
        self.trim = trim
        self.interval_s = interval_s
        self.wanted = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def request(self) -> None:
        if self.trim is None:
            return
        self.wanted.set()
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        assert self.trim is not None
        while True:
            self.wanted.wait()
            self.wanted.clear()
            self.trim(0)
            time.sleep(self.interval_s)  # rate limit: requests meanwhile set `wanted` for the next round


_trimmer = _Trimmer(_libc_function("malloc_trim"), TRIM_INTERVAL_S)


def return_freed_memory() -> None:
    """Ask for the pages of blocks freed so far to go back to the OS soon; cheap, from any thread."""
    _trimmer.request()
