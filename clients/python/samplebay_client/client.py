"""A Python client for a samplebay server: models, samples as images or arrays, streamed frames, typed errors.

Sync and async twins over httpx, with nothing of the server imported (no torch): PNGs are decoded with PIL.
A `503` (queue full, device failure, shutting down) is retried after the `Retry-After` the server names,
a bounded number of times; every other error is raised at once as a `SamplebayError` carrying the
server's status and message.

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
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, Unpack

import httpx

from samplebay_client.answers import (  # noqa: F401
    EventParser,
    Frame,
    ImageInput,
    ModelInfo,
    SampleFields,
    SampleFile,
    Samples,
    Timings,
    decode_png,
    encode_image,
    image_grid,
    sample_body,
    stream_item,
)
from samplebay_client.errors import (  # noqa: F401
    BACKOFF_S,
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRY_WAIT_S,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    EVENT_STREAM,
    JSON,
    BadRequest,
    ConnectionFailed,
    FieldProblem,
    NotFound,
    SamplebayError,
    ServerBusy,
    StreamInterrupted,
    Timeout,
    Unauthorized,
    error_for,
    error_from_response,
    retry_after_seconds,
)

T = TypeVar("T")
MODEL_VERSION_HEADER = "x-model-version"  # service/app.py: the version of the model that drew an answer


@dataclass(frozen=True)
class RetryPolicy:
    """Which answers are tried again, and after how long: a 503, `retries` times at most, after the
    server's Retry-After (doubling backoff when it names none); a wait over `max_wait_s` is not waited."""

    retries: int = DEFAULT_RETRIES
    max_wait_s: float = DEFAULT_MAX_RETRY_WAIT_S

    def wait_before_retry(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before trying again after `response` (the `attempt`-th retry); None: do not."""
        if response.status_code != 503 or attempt >= self.retries:
            return None
        wait = retry_after_seconds(response.headers.get("retry-after"))
        if wait is None:
            wait = min(BACKOFF_S * 2**attempt, self.max_wait_s)
        return wait if wait <= self.max_wait_s else None


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"user-agent": "samplebay-client/0.1.0"}
    if api_key is not None:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def _transport_error(error: httpx.TransportError, base_url: str) -> SamplebayError:
    if isinstance(error, httpx.TimeoutException):
        return Timeout(f"no answer from {base_url} within the client's timeout ({type(error).__name__})")
    return ConnectionFailed(f"could not reach {base_url}: {error or type(error).__name__}")


def _parse(response: httpx.Response, build: Callable[[Any], T]) -> T:
    """`build` applied to a JSON answer; an answer that is not JSON, or not of the shape built, is a
    SamplebayError naming what was wrong (another server at that address, a proxy's page)."""
    try:
        return build(response.json())
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        what = f"{type(error).__name__}: {error}"
        raise SamplebayError(f"unexpected answer from {response.url} ({what})", response.status_code) from error


def _model_list(items: list[Any]) -> list[ModelInfo]:
    return [ModelInfo.from_json(item) for item in items]


def _samples(response: httpx.Response) -> Callable[[Any], Samples]:
    """A JSON answer's samples, with the model version its header names."""
    version = response.headers.get(MODEL_VERSION_HEADER)
    return lambda data: dataclasses.replace(Samples.from_json(data), model_version=version)


def _sample_file(response: httpx.Response) -> SampleFile:
    seed, steps = response.headers.get("x-seed", ""), response.headers.get("x-steps")
    if not seed.isdigit() or not (steps is None or steps.isdigit()):
        raise SamplebayError(f"unexpected answer from {response.url}: X-Seed {seed!r}, X-Steps {steps!r}")
    return SampleFile(
        content=response.content,
        media_type=response.headers.get("content-type", ""),
        seed=int(seed),
        steps=int(steps) if steps is not None else None,
        model_version=response.headers.get(MODEL_VERSION_HEADER),
    )


def _check_event_stream(response: httpx.Response) -> None:
    if not response.headers.get("content-type", "").startswith(EVENT_STREAM):
        kind = response.headers.get("content-type", "none")
        raise SamplebayError(f"asked for a stream, the server answered {kind}", response.status_code)


# --- the clients --------------------------------------------------------------------------------------------


class Client:
    """Synchronous client. Use it as a context manager, or call `close()`.

        with Client(api_key="secret") as client:
            grid = client.sample("eqm_mnist", n=16, label=3).grid()

    `retries`/`max_retry_wait_s`: a 503 is tried again up to `retries` times after the server's
    Retry-After, unless that is over `max_retry_wait_s`. `transport` (httpx.MockTransport, ...) and
    `sleep` are for tests.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        max_retry_wait_s: float = DEFAULT_MAX_RETRY_WAIT_S,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(retries, max_retry_wait_s)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def models(self) -> list[ModelInfo]:
        """Every servable model (GET /models)."""
        return _parse(self._open("GET", "/models"), _model_list)

    def sample(self, model: str, **options: Unpack[SampleFields]) -> Samples:
        """Samples of `model` with their seed, energies (EBMs) or bits/dim (flows), and the trajectory
        when `trajectory_every` is given."""
        response = self._open("POST", "/sample", sample_body(model, options, "json"))
        return _parse(response, _samples(response))

    def sample_file(
        self, model: str, image_format: Literal["png", "gif"] = "png", **options: Unpack[SampleFields]
    ) -> SampleFile:
        """The server's own PNG (a grid for n > 1) or GIF of the trajectory, with the seed and steps it used."""
        response = self._open("POST", "/sample", sample_body(model, options, image_format), f"image/{image_format}")
        return _sample_file(response)

    def stream(self, model: str, **options: Unpack[SampleFields]) -> Iterator[Frame | Samples]:
        """Frames as the chains make them, then the Samples (the last item); the server's 'error' event is
        raised. Leaving the loop early closes the connection, and the server stops the chains."""
        response = self._open("POST", "/sample", sample_body(model, options, "json", stream=True), EVENT_STREAM)
        try:
            _check_event_stream(response)
            parser = EventParser()
            for line in response.iter_lines():
                event = parser.feed(line)
                item = stream_item(*event) if event else None
                if item is not None:
                    yield item
                    if isinstance(item, Samples):
                        return
        except httpx.TransportError as error:
            raise _transport_error(error, self.base_url) from error
        finally:
            response.close()
        raise StreamInterrupted("the stream ended before its 'done' event")

    def _open(self, method: str, path: str, body: dict[str, Any] | None = None, accept: str = JSON) -> httpx.Response:
        """A response with status < 400 (a stream's body not read yet: the caller closes it); a 503 is retried."""
        attempt = 0
        while True:
            request = self._http.build_request(method, path, json=body, headers={"accept": accept})
            try:
                response = self._http.send(request, stream=True)
                if response.status_code < 400:
                    if not response.headers.get("content-type", "").startswith(EVENT_STREAM):
                        response.read()
                    return response
                response.read()
            except httpx.TransportError as error:
                raise _transport_error(error, self.base_url) from error
            response.close()
            wait = self.retry.wait_before_retry(response, attempt)
            if wait is None:
                raise error_from_response(response)
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
        retries: int = DEFAULT_RETRIES,
        max_retry_wait_s: float = DEFAULT_MAX_RETRY_WAIT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(retries, max_retry_wait_s)
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def models(self) -> list[ModelInfo]:
        """Every servable model (GET /models)."""
        return _parse(await self._open("GET", "/models"), _model_list)

    async def sample(self, model: str, **options: Unpack[SampleFields]) -> Samples:
        """Samples of `model` with their seed, energies (EBMs) or bits/dim (flows), and the trajectory."""
        response = await self._open("POST", "/sample", sample_body(model, options, "json"))
        return _parse(response, _samples(response))

    async def sample_file(
        self, model: str, image_format: Literal["png", "gif"] = "png", **options: Unpack[SampleFields]
    ) -> SampleFile:
        """The server's own PNG (a grid for n > 1) or GIF of the trajectory, with the seed and steps it used."""
        response = await self._open(
            "POST", "/sample", sample_body(model, options, image_format), f"image/{image_format}"
        )
        return _sample_file(response)

    async def stream(self, model: str, **options: Unpack[SampleFields]) -> AsyncIterator[Frame | Samples]:
        """Frames as the chains make them, then the Samples (the last item); the server's 'error' event is raised."""
        response = await self._open("POST", "/sample", sample_body(model, options, "json", stream=True), EVENT_STREAM)
        try:
            _check_event_stream(response)
            parser = EventParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                item = stream_item(*event) if event else None
                if item is not None:
                    yield item
                    if isinstance(item, Samples):
                        return
        except httpx.TransportError as error:
            raise _transport_error(error, self.base_url) from error
        finally:
            await response.aclose()
        raise StreamInterrupted("the stream ended before its 'done' event")

    async def _open(
        self, method: str, path: str, body: dict[str, Any] | None = None, accept: str = JSON
    ) -> httpx.Response:
        """A response with status < 400 (a stream's body not read yet: the caller closes it); a 503 is retried."""
        attempt = 0
        while True:
            request = self._http.build_request(method, path, json=body, headers={"accept": accept})
            try:
                response = await self._http.send(request, stream=True)
                if response.status_code < 400:
                    if not response.headers.get("content-type", "").startswith(EVENT_STREAM):
                        await response.aread()
                    return response
                await response.aread()
            except httpx.TransportError as error:
                raise _transport_error(error, self.base_url) from error
            await response.aclose()
            wait = self.retry.wait_before_retry(response, attempt)
            if wait is None:
                raise error_from_response(response)
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
