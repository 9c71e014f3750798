"""The HTTP side of the worker: submit an order, wait for its answer (or stream its frames), turn the
answer into a response. Answers cross from the worker thread through `loop.call_soon_threadsafe` only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.messages import (
    CancelledByClient,
    ChainDiverged,
    DeadlinePassed,
    Frame,
    FrameSink,
    Handle,
    QueueFull,
    SampleOrder,
    SampleResult,
    WorkerFailure,
)
from service.metrics import Metrics
from service.render import frame_event, gif_body, grid_b64, json_body, png_body, sse
from service.settings import Settings
from service.worker import Worker

GRACE_SECONDS = 10.0  # past a job's deadline, the HTTP side stops waiting even if the worker never answers
KEEPALIVE_SECONDS = 5.0
POLL_SECONDS = 0.1  # how often a waiting request checks whether its client is still there


def worker_error(error: BaseException, settings: Settings) -> HTTPException:
    """The HTTP answer to a worker error."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    if isinstance(error, QueueFull):
        return HTTPException(503, detail=f"server busy: {error}; retry shortly", headers=retry)
    if isinstance(error, TimeoutError):
        return HTTPException(504, detail="the request's deadline passed before its chains finished")
    if isinstance(error, ChainDiverged):
        return HTTPException(422, detail=str(error))
    if isinstance(error, WorkerFailure):
        return HTTPException(503, detail=str(error), headers=retry)
    return HTTPException(500, detail=f"unexpected worker error: {type(error).__name__}")


def record(metrics: Metrics, model: str, status: int, started: float) -> None:
    """Count one finished POST /sample (plain or streamed) and its latency."""
    metrics.requests.labels(model, str(status)).inc()
    metrics.latency_seconds.labels(model).observe(time.perf_counter() - started)


def _submit(worker: Worker, order: SampleOrder, settings: Settings, deliver: Any, on_frame: FrameSink | None) -> Handle:
    try:
        return worker.submit(order, deliver, time.monotonic() + settings.request_timeout_s, on_frame)
    except (QueueFull, WorkerFailure) as error:
        raise worker_error(error, settings) from error


async def sample_result(worker: Worker, order: SampleOrder, settings: Settings, request: Request) -> SampleResult:
    """The worker's result; if the client goes away first, its chains are cancelled at the next step."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[SampleResult | BaseException] = loop.create_future()

    def settle(outcome: SampleResult | BaseException) -> None:
        if not future.done():
            future.set_result(outcome)

    def deliver(outcome: SampleResult | BaseException) -> None:
        loop.call_soon_threadsafe(settle, outcome)

    handle = _submit(worker, order, settings, deliver, None)
    while True:
        try:
            done, _ = await asyncio.wait({future}, timeout=POLL_SECONDS)
        except asyncio.CancelledError:  # the request's task was cancelled (Ray Serve on a disconnect, shutdown)
            handle.cancel()
            raise
        if done:
            outcome = future.result()
            break
        if await request.is_disconnected():
            handle.cancel()
            raise CancelledByClient("client disconnected")
        if time.monotonic() > handle.deadline + GRACE_SECONDS:
            handle.cancel()
            outcome = DeadlinePassed("deadline")
            break
    if isinstance(outcome, CancelledByClient):
        raise outcome
    if isinstance(outcome, BaseException):
        raise worker_error(outcome, settings) from outcome
    return outcome


async def response_for(result: SampleResult, order: SampleOrder, image_format: str, started: float) -> Response:
    """PNG (one image or a grid), GIF (the trajectory) or JSON, encoded off the event loop."""
    data_range = order.model.members[0].data_range
    headers = {"X-Seed": str(order.seed), "X-Steps": str(result.steps)}
    if image_format == "png":
        return Response(await asyncio.to_thread(png_body, result, data_range), media_type="image/png", headers=headers)
    if image_format == "gif":
        return Response(await asyncio.to_thread(gif_body, result, data_range), media_type="image/gif", headers=headers)
    elapsed = time.perf_counter() - started
    payload = await asyncio.to_thread(json_body, result, data_range, order.model.name, order.seed, elapsed)
    return JSONResponse(payload.model_dump(exclude_none=True), headers=headers)


class CancellingStream(StreamingResponse):
    """A stream whose order is cancelled however the response ends, even before its first byte."""

    def __init__(self, handle: Handle, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.handle = handle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()  # harmless once the order finished: the scheduler no longer holds it


def stream(
    worker: Worker, order: SampleOrder, settings: Settings, metrics: Metrics, started: float
) -> CancellingStream:
    """Server-Sent Events: 'frame' per kept step as the worker makes it, then 'done' (or 'error')."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Frame | SampleResult | BaseException] = asyncio.Queue()
    data_range = order.model.members[0].data_range

    def deliver(outcome: SampleResult | BaseException) -> None:
        loop.call_soon_threadsafe(events.put_nowait, outcome)

    def on_frame(frame: Frame) -> None:
        loop.call_soon_threadsafe(events.put_nowait, frame)

    handle = _submit(worker, order, settings, deliver, on_frame)

    async def event_source() -> AsyncIterator[str]:
        status = 200
        try:
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), timeout=KEEPALIVE_SECONDS)
                except TimeoutError:
                    if time.monotonic() <= handle.deadline + GRACE_SECONDS:
                        yield ": waiting for the worker\n\n"  # an SSE comment keeps proxies from timing out
                        continue
                    item = DeadlinePassed("deadline")
                if isinstance(item, Frame):
                    payload = await asyncio.to_thread(frame_event, item, data_range)
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
                    yield sse("done", done)
                return
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            record(metrics, order.model.name, status, started)

    return CancellingStream(
        handle,
        event_source(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Seed": str(order.seed), "X-Accel-Buffering": "no"},
    )
