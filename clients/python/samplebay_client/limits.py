"""What the client accepts from whatever answers at its address: a deadline per call, bytes per answer and per
stream event, decoded pixels per image and per answer.

A server (or a proxy, or something else listening there) may send an endless body, trickle it a byte at a time,
stream comments forever, or send a small PNG that decodes to gigabytes. Each of these ends in a SamplebayError
within the limits below, never a hang or a process out of memory (issue 37, item 8).
"""

from __future__ import annotations

import ssl
import struct
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from samplebay_client.errors import AnswerTooLarge, BadAnswer, Timeout

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BOUNDING: ContextVar[Deadline | None] = ContextVar("samplebay_bounding_deadline", default=None)


@dataclass(frozen=True)
class Limits:
    """Bounds on one call's answer. The defaults admit the largest answer a server with default settings gives
    (64 samples of 128x128 RGB with 65 trajectory frames: about 200 MB of base64 PNGs, 68 M pixels)."""

    # One call, from sending the request to its last byte: retries and their waits included. A stream's
    # time counts only while the client waits for the server, not while the caller's loop holds an item.
    deadline_s: float = 150.0
    max_answer_bytes: int = 256 << 20  # a JSON answer, a PNG/GIF file
    max_event_bytes: int = 256 << 20  # one event of a stream (its 'done' event carries the samples)
    max_error_bytes: int = 1 << 20  # an error's body; more is cut, not refused
    max_image_pixels: int = 1 << 24  # one decoded image (a 4096 x 4096 grid)
    max_answer_pixels: int = 1 << 27  # all images of one answer or event together (134 M; 400 MB as RGB)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"Limits.{name} must be positive; got {value!r}")


class Deadline:
    """The time left of one call. `pause()` stops the clock while a stream's item is in the caller's hands."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._left = seconds
        self._since: float | None = time.monotonic()

    def remaining(self) -> float:
        if self._since is None:
            return self._left
        return self._left - (time.monotonic() - self._since)

    def expired(self) -> bool:
        return self.remaining() <= 0

    def check(self) -> None:
        if self.expired():
            raise self.error()

    def error(self) -> Timeout:
        return Timeout(f"the call took longer than the client's deadline of {self.seconds:g} s (Limits.deadline_s)")

    def pause(self) -> None:
        self._left, self._since = self.remaining(), None

    def resume(self) -> None:
        if self._since is None:
            self._since = time.monotonic()

    @contextmanager
    def bounding_reads(self) -> Iterator[None]:
        """Within this block, the sync client's connections (DeadlineStream) wait no longer than the time left."""
        token = _BOUNDING.set(self)
        try:
            yield
        finally:
            _BOUNDING.reset(token)

    def timeout(self, base: httpx.Timeout) -> httpx.Timeout:
        """`base`'s per-operation timeouts, none longer than the time left (connect, each read and write)."""
        left = max(self.remaining(), 0.001)
        cap = {name: left if value is None else min(value, left) for name, value in base.as_dict().items()}
        return httpx.Timeout(**cap)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose reads and writes wait no longer than the time left of the call in progress (a blocking
    socket read's timeout is its remaining time), so a server trickling a byte per read, headers included,
    cannot hold a call past its deadline."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _within_deadline(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _within_deadline(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend with every connection a DeadlineStream, and connecting bounded the same way."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.NetworkStream:
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def bound_by_deadlines(client: httpx.Client) -> None:
    """Give the client's own transports (the default one and those of proxies named in the environment) the
    DeadlineBackend. httpx's sync transport has per-read timeouts only and no public hook for the backend: this
    reaches its connection pool (a test that trickles an answer's head keeps this honest across httpx versions)."""
    for transport in [client._transport, *client._mounts.values()]:
        if isinstance(transport, httpx.HTTPTransport):
            pool = transport._pool
            if not isinstance(pool._network_backend, DeadlineBackend):
                pool._network_backend = DeadlineBackend(pool._network_backend)


def _within_deadline(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    """`timeout`, cut to the time left of the call whose reads are bounded now (Deadline.bounding_reads)."""
    deadline = _BOUNDING.get()
    if deadline is None:
        return timeout
    left = deadline.remaining()
    if left <= 0:
        raise expired(str(deadline.error()))
    return left if timeout is None else min(timeout, left)


def check_declared_length(response: httpx.Response, cap: int | None, what: str) -> None:
    """Refuse at once an answer whose Content-Length is over `cap` (None: any length), and one in an encoding the
    client did not ask for (it asks for identity: a compressed body's size says nothing of what it inflates to)."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadAnswer(
            f"{what} came in Content-Encoding {encoding!r}, not the identity asked for", response.status_code
        )
    length = response.headers.get("content-length")
    if (
        cap is not None
        and length is not None
        and length.strip().isdigit()
        and len(length.strip()) < 20
        and int(length) > cap
    ):
        raise too_large(response, f"{what} declares {int(length):,} bytes", cap)


def add_chunk(body: bytearray, chunk: bytes, cap: int, response: httpx.Response, what: str) -> None:
    if len(body) + len(chunk) > cap:
        raise too_large(response, f"{what} went past", cap)
    body += chunk


def too_large(response: httpx.Response, what: str, cap: int) -> AnswerTooLarge:
    return AnswerTooLarge(
        f"{what} the client's limit of {cap:,} bytes from {response.url}; a larger answer needs a larger "
        "Limits(...) passed to the client",
        response.status_code,
    )


class PixelBudget:
    """Decoded pixels left to one answer: each image is checked from its PNG header before it is decoded."""

    def __init__(self, limits: Limits) -> None:
        self.max_image = limits.max_image_pixels
        self.left = self.max_answer = limits.max_answer_pixels

    def take(self, width: int, height: int) -> None:
        pixels = width * height
        if pixels > self.max_image:
            raise AnswerTooLarge(
                f"an image of {width} x {height} pixels is over the client's limit of {self.max_image:,} pixels "
                "per image (Limits.max_image_pixels)"
            )
        if pixels > self.left:
            raise AnswerTooLarge(
                f"the answer's images decode to more than the client's limit of {self.max_answer:,} pixels "
                "(Limits.max_answer_pixels)"
            )
        self.left -= pixels


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, read before anything is decoded."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise BadAnswer("the server sent an image that is not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class EventSplitter:
    """Bytes of a Server-Sent Events stream -> its lines, as they come; the event being gathered (its lines
    since the last blank one, comments aside) and any unfinished line may not pass `cap` bytes."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._pending = bytearray()  # the unfinished line
        self._event_bytes = 0  # of the event's lines so far

    def feed(self, chunk: bytes) -> list[str]:
        """The lines `chunk` completes (without their ends: CRLF, LF or CR)."""
        self._pending += chunk
        lines, start, pending = [], 0, self._pending
        while True:
            newline, carriage = pending.find(b"\n", start), pending.find(b"\r", start)
            if carriage != -1 and (newline == -1 or carriage < newline):
                if carriage + 1 == len(pending):
                    break  # a CR last: wait for what follows, it may be the LF of a CRLF
                end, step = carriage, 2 if pending[carriage + 1 : carriage + 2] == b"\n" else 1
            elif newline != -1:
                end, step = newline, 1
            else:
                break
            line = pending[start:end].decode("utf-8", errors="replace")
            if not line:
                self._event_bytes = 0  # a blank line ends the event
            elif not line.startswith(":"):  # a comment is dropped, not gathered
                self._event_bytes += end - start
            start = end + step
            if self._event_bytes > self.cap:
                raise self._too_large()
            lines.append(line)
        del pending[:start]
        if len(pending) + self._event_bytes > self.cap:
            raise self._too_large()
        return lines

    def end(self) -> list[str]:
        """The line a CR ended at the very end of the stream (held back in case an LF followed)."""
        if self._pending.endswith(b"\r"):
            return self.feed(b"\n")
        return []

    def _too_large(self) -> AnswerTooLarge:
        return AnswerTooLarge(
            f"a stream event went past the client's limit of {self.cap:,} bytes per event (Limits.max_event_bytes)"
        )
