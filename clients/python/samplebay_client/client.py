"""A Python client for a samplebay server: models, samples as images or arrays, streamed frames, typed errors.

Sync and async twins over httpx, with nothing of the server imported (no torch): PNGs are decoded with PIL.
A `503` (queue full, device failure, shutting down) is retried after the `Retry-After` the server names,
a bounded number of times; every other error is raised at once as a `SamplebayError` carrying the
server's status and message. What the client accepts is bounded (`Limits`: a deadline per call, bytes per answer
and per stream event, decoded pixels), so a hostile or broken server costs a SamplebayError, never a hang.

    from samplebay_client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        print([model.name for model in client.models()])
        samples = client.sample("eqm_mnist", n=16, label=7, seed=1)
        samples.grid().save("sevens.png")  # the grid the server's PNG would show
        pixels = samples.array()  # uint8 [16, 28, 28]
        for event in client.stream("eqm_mnist", n=4, trajectory_every=4):
            print(event.step, event.mean_energy) if isinstance(event, Frame) else print("done", event.seed)

    async with AsyncClient() as client:  # the same methods, awaited; stream() is an async generator
        samples = await client.sample("eqm_mnist", n=4)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Literal, Self, Unpack

import httpx

from samplebay_client.answers import (
    EventParser,
    Frame,
    ImageInput,
    ModelInfo,
    SampleFields,
    SampleFile,
    Samples,
    sample_body,
)
from samplebay_client.answers import stream_item as _stream_item
from samplebay_client.errors import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRY_WAIT_S,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    EVENT_STREAM,
    JSON,
    StreamInterrupted,
)
from samplebay_client.exchange import (
    RetryPolicy,
    achunks,
    aerror_body,
    aread_body,
    check_event_stream,
    chunks,
    client_headers,
    error_body,
    json_body,
    model_list,
    parse,
    read_body,
    refusal,
    request_headers,
    sample_file,
    samples,
    transport_error,
)
from samplebay_client.limits import Deadline, EventSplitter, Limits, bound_by_deadlines, check_declared_length
from samplebay_client.scores import Scores, score_body

__all__ = ["AsyncClient", "Client", "RetryPolicy"]


def _items(lines: list[str], parser: EventParser, limits: Limits) -> Iterator[Frame | Samples]:
    """The stream's items these lines complete (events this client does not know are skipped)."""
    for line in lines:
        event = parser.feed(line)
        item = _stream_item(*event, limits) if event else None
        if item is not None:
            yield item


class Client:
    """Synchronous client. Use it as a context manager, or call `close()`.

        with Client(api_key="secret") as client:
            grid = client.sample("eqm_mnist", n=16, label=3).grid()

    `retries`/`max_retry_wait_s`: a 503 is tried again up to `retries` times after the server's
    Retry-After, unless that is over `max_retry_wait_s` or the call's deadline. `timeout`: httpx's, per
    connect and per read; `limits`: the call's deadline and the most an answer may hold (see Limits).
    `transport` (httpx.MockTransport, ...) and `sleep` are for tests.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        limits: Limits | None = None,
        retries: int = DEFAULT_RETRIES,
        max_retry_wait_s: float = DEFAULT_MAX_RETRY_WAIT_S,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(retries, max_retry_wait_s)
        self.limits = limits or Limits()
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url, headers=client_headers(api_key), timeout=self._timeout, transport=transport
        )
        bound_by_deadlines(self._http)

    def models(self) -> list[ModelInfo]:
        """Every servable model (GET /models)."""
        response, content = self._answer("GET", "/models")
        return parse(response, content, model_list)

    def sample(self, model: str, **options: Unpack[SampleFields]) -> Samples:
        """Samples of `model` with their seed, energies (EBMs) or bits/dim (flows), and the trajectory
        when `trajectory_every` is given."""
        response, content = self._answer("POST", "/sample", json_body(sample_body(model, options, "json")))
        return parse(response, content, samples(response, self.limits))

    def score(self, model: str, images: Sequence[ImageInput], label: int | None = None) -> Scores:
        """Each image's scores under `model` and its OOD verdict (POST /score); images must have the model's size."""
        response, content = self._answer("POST", "/score", json_body(score_body(model, images, label)))
        return parse(response, content, Scores.from_json)

    def sample_file(
        self, model: str, image_format: Literal["png", "gif"] = "png", **options: Unpack[SampleFields]
    ) -> SampleFile:
        """The server's own PNG (a grid for n > 1) or GIF of the trajectory, with the seed and steps it used."""
        body = json_body(sample_body(model, options, image_format))
        response, content = self._answer("POST", "/sample", body, f"image/{image_format}")
        return sample_file(response, content, self.limits)

    def stream(self, model: str, **options: Unpack[SampleFields]) -> Iterator[Frame | Samples]:
        """Frames as the chains make them, then the Samples (the last item); the server's 'error' event is
        raised. Leaving the loop early closes the connection, and the server stops the chains."""
        body = json_body(sample_body(model, options, "json", stream=True))
        deadline = Deadline(self.limits.deadline_s)
        response = self._open("POST", "/sample", body, EVENT_STREAM, deadline)
        body_chunks = chunks(response, deadline, self.base_url)
        try:
            check_event_stream(response)
            check_declared_length(response, None, "the stream")
            splitter, parser = EventSplitter(self.limits.max_event_bytes), EventParser()
            for chunk in body_chunks:
                for item in _items(splitter.feed(chunk), parser, self.limits):
                    yield item
                    if isinstance(item, Samples):
                        return
            for item in _items(splitter.end(), parser, self.limits):
                yield item
                if isinstance(item, Samples):
                    return
        finally:
            body_chunks.close()
            response.close()
        raise StreamInterrupted("the stream ended before its 'done' event")

    def _answer(
        self, method: str, path: str, body: bytes | None = None, accept: str = JSON
    ) -> tuple[httpx.Response, bytearray]:
        """A 2xx answer and its body, read whole within the limits."""
        deadline = Deadline(self.limits.deadline_s)
        response = self._open(method, path, body, accept, deadline)
        try:
            return response, read_body(response, self.limits.max_answer_bytes, deadline, self.base_url, "the answer")
        finally:
            response.close()

    def _open(self, method: str, path: str, body: bytes | None, accept: str, deadline: Deadline) -> httpx.Response:
        """A 2xx response, its body not read yet (the caller closes it); a 503 is retried within the deadline."""
        attempt = 0
        while True:
            deadline.check()
            request = self._http.build_request(
                method,
                path,
                content=body,
                headers=request_headers(accept, body),
                timeout=deadline.timeout(self._timeout),
            )
            try:
                with deadline.bounding_reads():  # the answer's head too, however slowly it comes
                    response = self._http.send(request, stream=True)
            except httpx.HTTPError as error:
                raise transport_error(error, self.base_url, deadline) from error
            if 200 <= response.status_code < 300:
                return response
            try:
                refused = refusal(response, error_body(response, self.limits.max_error_bytes, deadline, self.base_url))
            finally:
                response.close()
            wait = self.retry.wait_before_retry(response, attempt)
            if wait is None or wait >= deadline.remaining():
                raise refused
            self._sleep(wait)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """Asynchronous client: Client's methods, awaited; `stream()` is an async generator.

        async with AsyncClient(api_key="secret") as client:
            async for event in client.stream("eqm_mnist", n=4):
                ...

    An async generator left early is closed when collected; wrap it in `contextlib.aclosing` to stop the
    server's chains at once.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        limits: Limits | None = None,
        retries: int = DEFAULT_RETRIES,
        max_retry_wait_s: float = DEFAULT_MAX_RETRY_WAIT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(retries, max_retry_wait_s)
        self.limits = limits or Limits()
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=client_headers(api_key), timeout=self._timeout, transport=transport
        )

    async def models(self) -> list[ModelInfo]:
        """Every servable model (GET /models)."""
        response, content = await self._answer("GET", "/models")
        return parse(response, content, model_list)

    async def score(self, model: str, images: Sequence[ImageInput], label: int | None = None) -> Scores:
        """Each image's scores under `model` and its OOD verdict (POST /score)."""
        response, content = await self._answer("POST", "/score", json_body(score_body(model, images, label)))
        return parse(response, content, Scores.from_json)

    async def sample(self, model: str, **options: Unpack[SampleFields]) -> Samples:
        """Samples of `model` with their seed, energies (EBMs) or bits/dim (flows), and the trajectory."""
        response, content = await self._answer("POST", "/sample", json_body(sample_body(model, options, "json")))
        return parse(response, content, samples(response, self.limits))

    async def sample_file(
        self, model: str, image_format: Literal["png", "gif"] = "png", **options: Unpack[SampleFields]
    ) -> SampleFile:
        """The server's own PNG (a grid for n > 1) or GIF of the trajectory, with the seed and steps it used."""
        body = json_body(sample_body(model, options, image_format))
        response, content = await self._answer("POST", "/sample", body, f"image/{image_format}")
        return sample_file(response, content, self.limits)

    async def stream(self, model: str, **options: Unpack[SampleFields]) -> AsyncIterator[Frame | Samples]:
        """Frames as the chains make them, then the Samples (the last item); the server's 'error' event is raised."""
        body = json_body(sample_body(model, options, "json", stream=True))
        deadline = Deadline(self.limits.deadline_s)
        response = await self._open("POST", "/sample", body, EVENT_STREAM, deadline)
        try:
            check_event_stream(response)
            check_declared_length(response, None, "the stream")
            splitter, parser = EventSplitter(self.limits.max_event_bytes), EventParser()
            async for chunk in achunks(response, deadline, self.base_url):
                for item in _items(splitter.feed(chunk), parser, self.limits):
                    yield item
                    if isinstance(item, Samples):
                        return
            for item in _items(splitter.end(), parser, self.limits):
                yield item
                if isinstance(item, Samples):
                    return
        finally:
            await response.aclose()
        raise StreamInterrupted("the stream ended before its 'done' event")

    async def _answer(
        self, method: str, path: str, body: bytes | None = None, accept: str = JSON
    ) -> tuple[httpx.Response, bytearray]:
        deadline = Deadline(self.limits.deadline_s)
        response = await self._open(method, path, body, accept, deadline)
        try:
            cap = self.limits.max_answer_bytes
            return response, await aread_body(response, cap, deadline, self.base_url, "the answer")
        finally:
            await response.aclose()

    async def _open(
        self, method: str, path: str, body: bytes | None, accept: str, deadline: Deadline
    ) -> httpx.Response:
        """A 2xx response, its body not read yet (the caller closes it); a 503 is retried within the deadline."""
        attempt = 0
        while True:
            deadline.check()
            request = self._http.build_request(
                method,
                path,
                content=body,
                headers=request_headers(accept, body),
                timeout=deadline.timeout(self._timeout),
            )
            try:
                async with asyncio.timeout(max(deadline.remaining(), 0.0)):
                    response = await self._http.send(request, stream=True)
            except TimeoutError:
                raise deadline.error() from None
            except httpx.HTTPError as error:
                raise transport_error(error, self.base_url, deadline) from error
            if 200 <= response.status_code < 300:
                return response
            try:
                content = await aerror_body(response, self.limits.max_error_bytes, deadline, self.base_url)
                refused = refusal(response, content)
            finally:
                await response.aclose()
            wait = self.retry.wait_before_retry(response, attempt)
            if wait is None or wait >= deadline.remaining():
                raise refused
            await self._sleep(wait)
            attempt += 1

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()
