"""The live models directory: files added, replaced or removed while the server runs are served without a
restart, as Triton's polled model repository and its explicit load calls do.

A scan lists the directory and compares each file's status (inode, size, mtime, ctime; a program's with its
sidecar's) with the one its current version was taken at. A changed file is taken only once it is complete:

- renamed into place: its ctime is later than its mtime, so nothing has written to it since its last status
  change. Training's saves end this way (training/runtime/checkpoint.py: `atomic_write_bytes`), and so do
  `mv`, `cp -p` and rsync (a program with its sidecar, two files, waits for the next rule);
- or stopped changing: the previous scan saw exactly the same status.

A file still being written is neither, so it is never read half-way; one that changes while it is read is
put off to the next scan. A complete file is loaded here, off the worker thread, through the same checks as
at start (service/catalogue/registry.py: `load_file`), and the directory's new registry is handed to the worker, which
swaps it in between steps: requests already admitted finish on the version they started on. A file that
fails to load leaves its previous version serving, and /readyz says why; one loaded again with the same
bytes changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from service.catalogue.budgets import ModelBudget
from service.catalogue.registry import LoadedFile, Registry, assemble, load_file, model_files, refusal
from service.metrics import Metrics
from training.runtime.checkpoint import CheckpointError
from training.runtime.exported import PROGRAM_SUFFIX, SIDECAR_SUFFIX, companion_paths, companion_role

log = logging.getLogger(__name__)
HAND_OVER_WAIT_S = 60.0  # how long a reload waits for the worker to swap the new models in
RELOAD_SPACING_S = 1.0  # POST /models/reload starts at most one scan a second, however many clients call it


@dataclass(frozen=True)
class FileStatus:
    """What a scan sees of one file without reading it."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @property
    def renamed_in(self) -> bool:
        """Whether its status changed after its content last did (a rename, a link, a copy's restored times)."""
        return self.ctime_ns > self.mtime_ns


# A file's status (None: it cannot be read); a program's sidecar's and companions' after it.
Stamp = tuple[FileStatus | None, ...]


def status_of(path: Path) -> FileStatus | None:
    try:
        status = os.stat(path)
    except OSError:  # gone, a dangling link: the loader says why it is not served
        return None
    return FileStatus(status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def stamp_of(path: Path) -> Stamp:
    """A model file's status; a program's together with its sidecar's and its companions', since they are served
    as one."""
    if path.suffix == PROGRAM_SUFFIX and companion_role(path.name) is None:
        companions = [status_of(companion) for _, companion in sorted(companion_paths(path).items())]
        return status_of(path), status_of(path.with_suffix(SIDECAR_SUFFIX)), *companions
    return (status_of(path),)


def is_complete(stamp: Stamp, previous: Stamp | None) -> bool:
    """Whether a file can be read whole: renamed into place, or unchanged since the previous scan.

    A program, its sidecar and its companions are several files, each renamed into place on its own: a scan
    between two renames would see a new one beside an old one, so the bundle is taken only once none has changed.
    """
    if stamp == previous:
        return True
    return len(stamp) == 1 and (stamp[0] is None or stamp[0].renamed_in)


class ReloadReport(BaseModel):
    """What one scan of the models directory changed (the answer of POST /models/reload)."""

    added: list[str] = Field(default_factory=list, description="models served now that were not before")
    replaced: list[str] = Field(default_factory=list, description="models whose file changed: new requests get it")
    removed: list[str] = Field(
        default_factory=list, description="models no longer offered (requests already running finish)"
    )
    failed: dict[str, str] = Field(
        default_factory=dict, description="file -> why it was not loaded; a previous version keeps serving"
    )
    pending: list[str] = Field(
        default_factory=list, description="files still being written (changed since the last scan): taken once complete"
    )
    versions: dict[str, str] = Field(default_factory=dict, description="every served model -> its version now")
    applied: bool = Field(True, description="whether the worker has swapped the changes in (false: it is not running)")

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed)


@dataclass
class ModelRepository:
    """The files of one models directory as loaded, with what each was taken at; one scan at a time."""

    models_dir: Path
    device: torch.device
    max_file_bytes: int
    load_timeout_s: float
    budget: ModelBudget = field(default_factory=lambda: ModelBudget(None))  # bytes of model files loaded at once
    loaded: dict[str, LoadedFile] = field(default_factory=dict)  # file -> the version it serves
    taken: dict[str, Stamp] = field(default_factory=dict)  # file -> the stamp it was last loaded or refused at
    failures: dict[str, str] = field(default_factory=dict)  # file -> why it (or its latest version) is not served
    seen: dict[str, Stamp] = field(default_factory=dict)  # file -> the stamp the previous scan saw
    lock: threading.Lock = field(default_factory=threading.Lock)

    def scan(self, everything: bool = False) -> ReloadReport:
        """Load what changed and is complete (`everything`: every changed file as it is, as at start)."""
        with self.lock:
            report = ReloadReport()
            try:
                stamps = {path.name: stamp_of(path) for path in model_files(self.models_dir)}
            except OSError as error:  # the folder went away or cannot be read: keep serving what is loaded
                reason = (
                    f"cannot list the models directory ({error.strerror or error}); the {len(self.loaded)} model "
                    "file(s) loaded before keep serving until it can be listed again"
                )
                if self.failures.get(self.directory_key) != reason:
                    log.warning("%s: %s", self.models_dir, reason)
                report.failed[self.directory_key] = self.failures[self.directory_key] = reason
                report.versions = {model.name: model.version for model in self.registry().models.values()}
                return report
            self.failures.pop(self.directory_key, None)
            for name, stamp in stamps.items():
                if self.taken.get(name) != stamp:
                    self._take(name, stamp, everything or is_complete(stamp, self.seen.get(name)), report)
            for name in sorted(set(self.taken) - set(stamps)):
                self.taken.pop(name)
                self.failures.pop(name, None)
                self.budget.release(name)
                if (gone := self.loaded.pop(name, None)) is not None:
                    report.removed.append(gone.model.name)
                    log.info("%s was removed: %s is no longer offered to new requests", name, gone.model.name)
            self.seen = stamps
            report.versions = {model.name: model.version for model in self.registry().models.values()}
            return report

    def _take(self, name: str, stamp: Stamp, complete: bool, report: ReloadReport) -> None:
        """Load one changed file, or put it off while it is still being written."""
        path = self.models_dir / name
        if not complete:
            report.pending.append(name)
            return
        started = time.perf_counter()
        planned = sum(status.size for status in stamp if status is not None)
        if (over := self.budget.refusal(name, planned)) is not None:  # refused unread; tried again every scan
            if self.failures.get(name) != over:
                log.warning("not serving %s: %s", name, over)
            report.failed[name] = self.failures[name] = over
            return
        try:
            loaded = load_file(path, self.models_dir, self.device, self.max_file_bytes, self.load_timeout_s)
            if (over := self.budget.refusal(name, loaded.size)) is not None:  # it grew between the stat and the read
                raise CheckpointError(over)
        except Exception as error:  # one bad file must not keep the others from being served
            self.taken[name] = stamp  # tried again once the file changes
            reason = refusal(error)
            previous = self.loaded.get(name)
            if previous is not None:
                when = f"{previous.loaded_at:%Y-%m-%d %H:%M:%S} UTC"
                reason += f" (version {previous.version}, loaded {when}, still serves)"
            report.failed[name] = self.failures[name] = reason
            log.warning("not serving %s: %s", name, reason)
            return
        if stamp_of(path) != stamp:  # written again while it was read: what was read may be torn
            report.pending.append(name)
            return
        self.taken[name] = stamp
        self.failures.pop(name, None)
        previous = self.loaded.get(name)
        if previous is not None and previous.digest == loaded.digest:
            return  # the same bytes (touched, or renamed over by an identical copy): nothing changes
        self.loaded[name] = loaded
        self.budget.take(name, loaded.size)
        (report.replaced if previous else report.added).append(loaded.model.name)
        what = f"version {previous.version} replaced by {loaded.version}" if previous else f"version {loaded.version}"
        log.info("loaded %s (%s): %s in %.1f s", name, loaded.model.name, what, time.perf_counter() - started)

    @property
    def directory_key(self) -> str:
        """The entry of /readyz's refusals that a models directory which cannot be listed is reported under."""
        return f"{self.models_dir}/"

    def registry(self) -> Registry:
        """The served names from the files loaded now, with every refusal /readyz shows."""
        return assemble(self.loaded, self.failures)


class ModelWatcher:
    """Rescans the models directory every `interval_s` (0: only when asked, POST /models/reload) on a thread
    of its own, and hands each change to the worker: `hand_over(registry)` returns an event set once the
    worker serves it."""

    def __init__(
        self,
        repository: ModelRepository,
        interval_s: float,
        hand_over: Callable[[Registry], threading.Event],
        metrics: Metrics,
    ) -> None:
        self.repository = repository
        self.interval_s = interval_s
        self.hand_over = hand_over
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handing_over = threading.Lock()  # scans hand their registries over in the order they were made

    def start(self) -> None:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="model-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.repository.load_timeout_s + 5)

    def reload(self, wait_s: float = HAND_OVER_WAIT_S) -> ReloadReport:
        """Scan now, and answer once the worker serves what changed (an operator's explicit reload)."""
        return self._rescan(wait_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._rescan(wait_s=0)
            except Exception:  # a scan that fails past its own guards must not end the watch
                log.exception("scanning %s failed; trying again in %g s", self.repository.models_dir, self.interval_s)

    def _rescan(self, wait_s: float) -> ReloadReport:
        with self._handing_over:
            refused_before = dict(self.repository.failures)
            report = self.repository.scan()
            served = None
            if report.changed or self.repository.failures != refused_before:  # /readyz shows the refusals too
                served = self.hand_over(self.repository.registry())
        self.metrics.model_scans.inc()
        for outcome in ("added", "replaced", "removed", "failed"):
            if count := len(getattr(report, outcome)):
                self.metrics.model_changes.labels(outcome).inc(count)
        if served is not None:
            report.applied = served.wait(wait_s) if wait_s > 0 else served.is_set()
        return report


class CoalescedReloads:
    """POST /models/reload's scans: one at a time, on a thread of its own, never on the thread pool that encodes
    answers (asyncio.to_thread's), and at most one start per RELOAD_SPACING_S. A call waits for the next scan,
    shared by every call that arrives before it starts: each answer comes from a scan that began after its call
    did (so it sees the file its caller just wrote), a lone call after a quiet second is scanned at once, and
    clients calling it in a loop, with or without an API key, cost one scan a second and take no thread from
    the answers."""

    def __init__(self, reload: Callable[[], ReloadReport], spacing_s: float = RELOAD_SPACING_S) -> None:
        self._reload = reload
        self.spacing_s = spacing_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-reload")
        self._running: asyncio.Future[ReloadReport] | None = None
        self._next: asyncio.Future[ReloadReport] | None = None  # the scan calls wait for, not started yet
        self._last_start = -math.inf
        self.started = 0  # scans started: a test's witness that calls coalesced
        self.calls = 0  # calls received: a test's witness that every caller has arrived

    async def __call__(self) -> ReloadReport:
        self.calls += 1
        if self._next is None:
            self._next = asyncio.ensure_future(self._scan_after(self._running))
        return await asyncio.shield(self._next)  # a caller that goes away does not cancel the others' scan

    async def _scan_after(self, running: asyncio.Future[ReloadReport] | None) -> ReloadReport:
        if running is not None:
            await asyncio.wait([running])  # its outcome is its own callers'
        loop = asyncio.get_running_loop()
        if (delay := self._last_start + self.spacing_s - loop.time()) > 0:
            await asyncio.sleep(delay)
        self._next = None  # calls from now on wait for the scan after this one
        self._last_start = loop.time()
        self._running = loop.run_in_executor(self._executor, self._reload)
        self.started += 1
        return await self._running

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
