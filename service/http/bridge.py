"""The HTTP side of the worker: submit an order, wait for its answer (or stream its frames), turn the
answer into a response. Answers cross from the worker thread through `loop.call_soon_threadsafe` only."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, MutableMapping
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.engine.messages import (
    CancelledByClient,
    ChainDiverged,
    DeadlinePassed,
    Frame,
    FrameSink,
    Handle,
    Order,
    QueueFull,
    SampleOrder,
    SampleResult,
    ScoreResult,
    TooLarge,
    WorkerFailure,
)
from service.engine.worker import Worker
from service.http.memory import return_freed_memory
from service.http.render import frame_event, gif_body, grid_b64, json_body, png_body, sse
from service.metrics import Metrics
from service.settings import Settings

GRACE_SECONDS = 10.0  # past a job's deadline, the HTTP side stops waiting even if the worker never answers
KEEPALIVE_SECONDS = 5.0
POLL_SECONDS = 0.1  # how soon a waiting request asks again after its receive said something else than disconnect
# A result of at most this many image values (16 MNIST digits, one 3 x 64²) is encoded on the event loop: in
# about a millisecond, less than a hand-off to a thread and back costs on a busy CPU (2-4 ms on one shared core).
INLINE_VALUES = 2**14

log = logging.getLogger(__name__)
T = TypeVar("T")


def worker_error(error: BaseException, settings: Settings) -> HTTPException:
    """The HTTP answer to a worker error."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    if isinstance(error, QueueFull):
        return HTTPException(503, detail=f"server busy: {error}; retry shortly", headers=retry)
    if isinstance(error, TimeoutError):
        return HTTPException(504, detail="the request's deadline passed before its chains finished")
    if isinstance(error, ChainDiverged | TooLarge):
        return HTTPException(422, detail=str(error))
    if isinstance(error, WorkerFailure):
        return HTTPException(503, detail=str(error), headers=retry)
    return HTTPException(500, detail=f"unexpected worker error: {type(error).__name__}")


def record(metrics: Metrics, model: str, status: int, started: float) -> None:
    """Count one finished POST /sample (plain or streamed) and its latency."""
    metrics.requests.labels(model, str(status)).inc()
    metrics.latency_seconds.labels(model).observe(time.perf_counter() - started)


def _submit(
    worker: Worker,
    order: Order,
    settings: Settings,
    deliver: Any,
    on_frame: FrameSink | None,
    timeout_s: float | None = None,  # None: the server's request_timeout_s
) -> Handle:
    deadline = time.monotonic() + (settings.request_timeout_s if timeout_s is None else timeout_s)
    try:
        return worker.submit(order, deliver, deadline, on_frame)
    except (QueueFull, TooLarge, WorkerFailure) as error:
        raise worker_error(error, settings) from error


async def sample_result(worker: Worker, order: SampleOrder, settings: Settings, request: Request) -> SampleResult:
    """The worker's samples; if the client goes away first, its chains are cancelled at the next step."""
    result = await worker_answer(worker, order, settings, request)
    assert isinstance(result, SampleResult)
    return result


async def client_gone(request: Request) -> None:
    """Returns once the client has gone away: the ASGI server answers `receive` with http.disconnect when the
    connection is lost (uvicorn at once, on the event that the body's bytes also set). Waiting on it costs nothing
    while the worker runs; asking every POLL_SECONDS (Request.is_disconnected: a cancelled task each time) cost the
    event loop 0.12-0.15 ms of CPU an image of a 64-image score request on one busy shared core, where such a
    request waited seconds in the queue behind 15 others (docs/scoring.md)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(POLL_SECONDS)  # something else (an empty body part): ask again a little later


async def worker_answer(
    worker: Worker, order: Order, settings: Settings, request: Request, timeout_s: float | None = None
) -> SampleResult | ScoreResult:
    """The worker's answer to an order; if the client goes away first, its chains are cancelled at the next
    step. `timeout_s`: its deadline (None: the server's request_timeout_s)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[SampleResult | ScoreResult | BaseException] = loop.create_future()

    def settle(outcome: SampleResult | ScoreResult | BaseException) -> None:
        if not future.done():
            future.set_result(outcome)

    def deliver(outcome: SampleResult | ScoreResult | BaseException) -> None:
        loop.call_soon_threadsafe(settle, outcome)

    handle = _submit(worker, order, settings, deliver, None, timeout_s)
    gone = asyncio.ensure_future(client_gone(request))
    waits: set[asyncio.Future[Any]] = {future, gone}
    try:
        while True:
            left = handle.deadline + GRACE_SECONDS - time.monotonic()
            try:
                await asyncio.wait(waits, timeout=max(left, 0.0), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # the request's task was cancelled (Ray Serve on a disconnect, shutdown)
                handle.cancel()
                raise
            if future.done():
                outcome = future.result()
                break
            if gone.done():  # its receive said http.disconnect (or failed: the connection is no more)
                _ = gone.cancelled() or gone.exception()  # a failure is read here, not logged as never retrieved
                handle.cancel()
                raise CancelledByClient("client disconnected")
            if time.monotonic() > handle.deadline + GRACE_SECONDS:
                handle.cancel()
                outcome = DeadlinePassed("deadline")
                break
    finally:
        gone.cancel()
    if isinstance(outcome, CancelledByClient):
        raise outcome
    if isinstance(outcome, BaseException):
        raise worker_error(outcome, settings) from outcome
    return outcome


async def encoded(values: int, encode: Callable[..., T], *args: Any) -> T:
    """`encode(*args)` for a result of `values` image values: off the event loop, on a thread of its own, unless it
    is small enough (INLINE_VALUES) that encoding it costs less than the hand-off to that thread and back."""
    if values <= INLINE_VALUES:
        return encode(*args)
    return await asyncio.to_thread(encode, *args)


async def response_for(result: SampleResult, order: SampleOrder, image_format: str, started: float) -> Response:
    """PNG (one image or a grid), GIF (the trajectory) or JSON, encoded off the event loop (a small one on it)."""
    data_range = order.model.members[0].data_range
    headers = {"X-Seed": str(order.seed), "X-Steps": str(result.steps)}
    values = result.samples.numel() * (1 + len(result.frames))
    if image_format == "png":
        body = await encoded(values, png_body, result, data_range)
        return Response(body, media_type="image/png", headers=headers)
    if image_format == "gif":
        return Response(await encoded(values, gif_body, result, data_range), media_type="image/gif", headers=headers)
    elapsed = time.perf_counter() - started
    payload = await encoded(values, json_body, result, data_range, order.model.name, order.seed, elapsed)
    return JSONResponse(payload.model_dump(exclude_none=True), headers=headers)


class FrameBacklog:
    """A stream's frames that its client has not taken yet, at most `limit_bytes` of them (the newest; always
    at least one), then its outcome.

    The worker makes frames at its own pace, whatever the client reads; a client that reads slower (or
    not at all) must not make the server keep every frame of its chains. So the oldest waiting frames
    are dropped when a new one would pass the limit, and their count goes out with the next event the
    client gets. Bursts a client reads at once fit (a flow makes all its frames in one pass). Frames
    wait as tensors and are encoded only when sent: a dropped frame costs no encoding, and at most one
    encoding per stream is in flight. Lives on the event loop (the worker thread reaches it through
    `loop.call_soon_threadsafe` only).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.frames: deque[Frame] = deque()
        self.held_bytes = 0
        self.outcome: SampleResult | BaseException | None = None
        self.dropped = 0  # frames dropped since the client last took an event
        self.closed = False
        self.changed = asyncio.Event()

    def add_frame(self, frame: Frame) -> None:
        if self.closed:
            return
        self.frames.append(frame)
        self.held_bytes += frame.nbytes
        if self.held_bytes > self.limit_bytes and len(self.frames) > 1:
            while self.held_bytes > self.limit_bytes and len(self.frames) > 1:
                self.held_bytes -= self.frames.popleft().nbytes
                self.dropped += 1
            return_freed_memory()  # frames dropped among the worker's blocks leave holes malloc keeps
        self.changed.set()

    def close(self) -> None:
        """The stream ended: its waiting frames go, and any the worker still makes are not kept."""
        self.closed = True
        self.frames.clear()
        self.held_bytes = 0
        self.outcome = None
        return_freed_memory()

    def finish(self, outcome: SampleResult | BaseException) -> None:
        if self.outcome is None and not self.closed:
            self.outcome = outcome
        self.changed.set()

    async def take(self, timeout_s: float) -> tuple[Frame | SampleResult | BaseException, int]:
        """The oldest waiting frame (the outcome once no frame waits) and how many were dropped before it;
        TimeoutError when nothing came within `timeout_s`."""
        if not self.frames and self.outcome is None:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), timeout_s)
        dropped, self.dropped = self.dropped, 0
        if not self.frames:
            assert self.outcome is not None
            return self.outcome, dropped
        frame = self.frames.popleft()
        self.held_bytes -= frame.nbytes
        return frame, dropped


class ClientStalled(Exception):
    """A stream's client took none of its bytes for the send timeout."""


class CancellingStream(StreamingResponse):
    """A stream whose order is cancelled however the response ends, even before its first byte.

    Each send must be taken up within `send_timeout_s`: a client that stops reading would otherwise keep
    its chains running and its frames waiting for as long as it keeps the connection open.
    """

    def __init__(
        self,
        handle: Handle,
        backlog: FrameBacklog,
        content: AsyncGenerator[str, None],
        send_timeout_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self.handle = handle
        self.backlog = backlog
        self.events = content
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_in_time(message: MutableMapping[str, Any]) -> None:
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await send(message)
            except TimeoutError as error:
                raise ClientStalled(f"the client took nothing for {self.send_timeout_s:g} s") from error

        try:
            await super().__call__(scope, receive, send_in_time)
        except ClientStalled as stalled:
            log.warning("stream to %s cancelled: %s (stream_send_timeout_s)", scope.get("client"), stalled)
        finally:
            self.handle.cancel()  # harmless once the order finished: the scheduler no longer holds it
            await self.events.aclose()  # records the outcome now, not when the generator is collected
            self.backlog.close()


def stream(
    worker: Worker, order: SampleOrder, settings: Settings, metrics: Metrics, started: float
) -> CancellingStream:
    """Server-Sent Events: 'frame' per kept step as the worker makes it, then 'done' (or 'error').

    A client that reads slower than the chains make frames gets the newest `stream_pending_bytes` of
    them, each event saying in `dropped` how many it lost just before it.
    """
    loop = asyncio.get_running_loop()
    backlog = FrameBacklog(settings.stream_pending_bytes)
    data_range = order.model.members[0].data_range

    def deliver(outcome: SampleResult | BaseException) -> None:
        loop.call_soon_threadsafe(backlog.finish, outcome)

    def on_frame(frame: Frame) -> None:
        loop.call_soon_threadsafe(backlog.add_frame, frame)

    handle = _submit(worker, order, settings, deliver, on_frame)

    async def event_source() -> AsyncGenerator[str, None]:
        status = 200
        try:
            while True:
                try:
                    item, dropped = await backlog.take(KEEPALIVE_SECONDS)
                except TimeoutError:
                    if time.monotonic() <= handle.deadline + GRACE_SECONDS:
                        yield ": waiting for the worker\n\n"  # an SSE comment keeps proxies from timing out
                        continue
                    item, dropped = DeadlinePassed("deadline"), 0
                if isinstance(item, Frame):
                    payload = await asyncio.to_thread(frame_event, item, data_range, dropped)
                    yield sse("frame", payload)
                    continue
                if isinstance(item, BaseException):
                    error = worker_error(item, settings)
                    status = error.status_code
                    yield sse("error", {"status": error.status_code, "detail": error.detail})
                else:
                    elapsed = time.perf_counter() - started
                    body = await asyncio.to_thread(json_body, item, data_range, order.model.name, order.seed, elapsed)
                    done = body.model_dump(exclude_none=True)
                    done["grid"] = await asyncio.to_thread(grid_b64, item.samples, data_range)
                    done["dropped"] = dropped
                    yield sse("done", done)
                return
        except (asyncio.CancelledError, GeneratorExit):  # the client left, or stopped reading
            status = 499
            raise
        finally:
            record(metrics, order.model.name, status, started)

    return CancellingStream(
        handle,
        backlog,
        event_source(),
        settings.stream_send_timeout_s,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Seed": str(order.seed), "X-Accel-Buffering": "no"},
    )
