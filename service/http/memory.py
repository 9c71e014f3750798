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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable

TRIM_INTERVAL_S = 1.0  # trims cost the worker page faults as it touches its memory again
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 4 << 20  # 1 MiB also mapped MNIST-sized activations: their steps ran 40-70% slower


def _libc_function(name: str) -> Callable[..., int] | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        return getattr(ctypes.CDLL(path), name, None)
    except OSError:
        return None


def map_large_blocks() -> bool:
    """Give blocks of MMAP_THRESHOLD_BYTES and more mappings of their own, returned to the OS when freed; whether
    the C library took it.

    glibc starts so at 128 KiB, but raises the threshold to the size of each mapped block freed (up to 32 MiB):
    from then on a step's tensors and a stream's frames come from the heap, and freed out of order they stay
    resident. A threshold set once is never raised (bench/stream_memory.py, three never-read n-64 streams of
    a [1, 128, 128] energy: +249 MB over idle before, +139 to +153 MB after; docs/api.md). The price is page
    faults on every fresh mapping: those streams ran 15% slower."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


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
