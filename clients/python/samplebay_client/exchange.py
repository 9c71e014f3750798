"""One call's exchange, shared by Client and AsyncClient: the request's headers and body, which answers are retried,
the answer's bytes read within the call's Limits, and the answer parsed into what the client hands back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from samplebay_client.answers import MALFORMED, ModelInfo, SampleFile, Samples
from samplebay_client.errors import (
    BACKOFF_S,
    DEFAULT_MAX_RETRY_WAIT_S,
    DEFAULT_RETRIES,
    EVENT_STREAM,
    BadAnswer,
    ConnectionFailed,
    SamplebayError,
    Timeout,
    error_from_response,
    retry_after_seconds,
)
from samplebay_client.limits import Deadline, Limits, PixelBudget, add_chunk, check_declared_length

T = TypeVar("T")
MODEL_VERSION_HEADER = "x-model-version"  # service/http/app.py: the version of the model that drew an answer
USER_AGENT = "samplebay-client/0.1.0"


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


def client_headers(api_key: str | None) -> dict[str, str]:
    # identity: a compressed answer's size says nothing of what it inflates to (limits.check_declared_length)
    headers = {"user-agent": USER_AGENT, "accept-encoding": "identity"}
    if api_key is not None:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def request_headers(accept: str, body: bytes | None) -> dict[str, str]:
    return {"accept": accept} if body is None else {"accept": accept, "content-type": "application/json"}


def json_body(body: dict[str, Any]) -> bytes:
    """A request body as JSON; numbers JSON cannot carry were refused by sample_body before this."""
    return json.dumps(body, allow_nan=False).encode()


def transport_error(error: httpx.HTTPError, base_url: str, deadline: Deadline) -> SamplebayError:
    if deadline.expired():
        return deadline.error()
    if isinstance(error, httpx.TimeoutException):
        return Timeout(f"no answer from {base_url} within the client's timeout ({type(error).__name__})")
    if isinstance(error, httpx.TransportError):
        return ConnectionFailed(f"could not reach {base_url}: {str(error)[:200] or type(error).__name__}")
    return BadAnswer(f"the answer from {base_url} could not be read ({type(error).__name__}: {str(error)[:200]})")


def refusal(response: httpx.Response, content: bytes | bytearray) -> SamplebayError:
    """The error an answer of status 300 or more stands for: a redirect is not followed (it could send the key
    elsewhere, or its body would be taken for the answer)."""
    if 300 <= response.status_code < 400:
        location = response.headers.get("location", "nowhere")[:200]
        return BadAnswer(
            f"{response.url} answered a redirect to {location}; the client follows none: if that is the server, "
            "pass its address as base_url",
            response.status_code,
        )
    return error_from_response(response, content)


def chunks(response: httpx.Response, deadline: Deadline, base_url: str) -> Generator[bytes]:
    """The body's chunks as they come; the deadline runs only while waiting for one, and bounds each read."""
    body = response.iter_bytes()
    while True:
        deadline.resume()
        try:
            with deadline.bounding_reads():
                chunk = next(body, None)
        except httpx.HTTPError as error:
            raise transport_error(error, base_url, deadline) from error
        finally:
            deadline.pause()
        if deadline.expired():  # the chunk came after the deadline
            raise deadline.error()
        if chunk is None:
            return
        yield chunk


async def achunks(response: httpx.Response, deadline: Deadline, base_url: str) -> AsyncIterator[bytes]:
    """chunks(), awaited: each wait is cancelled when it would pass the deadline."""
    body = response.aiter_bytes()
    while True:
        deadline.resume()
        try:
            async with asyncio.timeout(max(deadline.remaining(), 0.0)):
                chunk = await anext(body, None)
        except TimeoutError:
            raise deadline.error() from None
        except httpx.HTTPError as error:
            raise transport_error(error, base_url, deadline) from error
        finally:
            deadline.pause()
        if chunk is None:
            return
        yield chunk


def read_body(response: httpx.Response, cap: int, deadline: Deadline, base_url: str, what: str) -> bytearray:
    check_declared_length(response, cap, what)
    content = bytearray()
    for chunk in chunks(response, deadline, base_url):
        add_chunk(content, chunk, cap, response, what)
    return content


async def aread_body(response: httpx.Response, cap: int, deadline: Deadline, base_url: str, what: str) -> bytearray:
    check_declared_length(response, cap, what)
    content = bytearray()
    async for chunk in achunks(response, deadline, base_url):
        add_chunk(content, chunk, cap, response, what)
    return content


def error_body(response: httpx.Response, cap: int, deadline: Deadline, base_url: str) -> bytearray:
    """An error's body, cut at `cap` bytes (the message is quoted, not the whole body)."""
    check_declared_length(response, None, "an error's body")
    content = bytearray()
    for chunk in chunks(response, deadline, base_url):
        content += chunk[: cap - len(content)]
        if len(content) >= cap:
            break
    return content


async def aerror_body(response: httpx.Response, cap: int, deadline: Deadline, base_url: str) -> bytearray:
    check_declared_length(response, None, "an error's body")
    content = bytearray()
    async for chunk in achunks(response, deadline, base_url):
        content += chunk[: cap - len(content)]
        if len(content) >= cap:
            break
    return content


# --- answers parsed -----------------------------------------------------------------------------------------


def parse(response: httpx.Response, content: bytes | bytearray, build: Callable[[Any], T]) -> T:
    """`build` applied to a JSON answer; an answer that is not JSON, or not of the shape built, is a
    BadAnswer naming what was wrong (another server at that address, a proxy's page)."""
    try:
        return build(json.loads(content))
    except MALFORMED as error:
        what = f"{type(error).__name__}: {str(error)[:200]}"
        raise BadAnswer(f"unexpected answer from {response.url} ({what})", response.status_code) from error


def model_list(items: list[Any]) -> list[ModelInfo]:
    if not isinstance(items, list):
        raise TypeError(f"GET /models answered a {type(items).__name__}, not a list")
    return [ModelInfo.from_json(item) for item in items]


def samples(response: httpx.Response, limits: Limits) -> Callable[[Any], Samples]:
    """A JSON answer's samples, their images within the limits' pixels, with the model version its header names."""
    version = response.headers.get(MODEL_VERSION_HEADER)
    return lambda data: dataclasses.replace(Samples.from_json(data, PixelBudget(limits)), model_version=version)


def sample_file(response: httpx.Response, content: bytes | bytearray, limits: Limits) -> SampleFile:
    seed, steps = response.headers.get("x-seed", ""), response.headers.get("x-steps")
    if not _small_count(seed) or not (steps is None or _small_count(steps)):
        raise BadAnswer(f"unexpected answer from {response.url}: X-Seed {seed[:40]!r}, X-Steps {(steps or '')[:40]!r}")
    return SampleFile(
        content=bytes(content),
        media_type=response.headers.get("content-type", ""),
        seed=int(seed),
        steps=int(steps) if steps is not None else None,
        model_version=response.headers.get(MODEL_VERSION_HEADER),
        max_pixels=limits.max_image_pixels,
    )


def _small_count(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 20


def check_event_stream(response: httpx.Response) -> None:
    if not response.headers.get("content-type", "").startswith(EVENT_STREAM):
        kind = response.headers.get("content-type", "none")[:100]
        raise BadAnswer(f"asked for a stream, the server answered {kind}", response.status_code)
