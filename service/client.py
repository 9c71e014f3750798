"""A Python client for a samplebay server: models, samples as images or arrays, streamed frames, typed errors.

Sync and async twins over httpx, with nothing of the server imported (no torch): PNGs are decoded with PIL.
A `503` (queue full, device failure, shutting down) is retried after the `Retry-After` the server names,
a bounded number of times; every other error is raised at once as a `SamplebayError` carrying the
server's status and message.

    from service.client import Client

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
import base64
import binascii
import io
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from os import PathLike
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, TypeVar, Unpack

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Past the server's default request deadline (120 s, then 10 s of grace), so its 504 arrives before ours.
DEFAULT_TIMEOUT = httpx.Timeout(150.0, connect=10.0)
DEFAULT_RETRIES = 3  # retries of a 503, after the first try
DEFAULT_MAX_RETRY_WAIT_S = 30.0  # a 503 asking for a longer wait is raised instead of waited out
JSON, EVENT_STREAM = "application/json", "text/event-stream"
BACKOFF_S = 0.5  # first wait after a 503 without Retry-After; doubled each retry
MAX_QUOTED_CHARS = 500  # of an error body that is not the server's JSON (a proxy's HTML page)

T = TypeVar("T")
ImageInput = str | bytes | Image.Image | npt.NDArray[Any]  # base64 or data: URL, PNG/JPEG bytes, PIL, uint8 pixels


# --- errors -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldProblem:
    """One bad field of a 422: its dotted name ("step_size", or "body") and what is wrong with it."""

    field: str
    message: str


class SamplebayError(Exception):
    """Every error this client raises. `status` is the HTTP status (None when no answer came), `detail`
    the server's message, `errors` its per-field problems (on a 422 from validation)."""

    def __init__(self, detail: str, status: int | None = None, errors: Sequence[FieldProblem] = ()) -> None:
        super().__init__(f"{status}: {detail}" if status is not None else detail)
        self.detail = detail
        self.status = status
        self.errors = list(errors)


class BadRequest(SamplebayError):
    """400, 413 or 422: the request itself is wrong (a field out of range, one that does not apply, ...)."""


class Unauthorized(SamplebayError):
    """401: the server has an API key and the request did not carry it (`api_key=`)."""


class NotFound(SamplebayError):
    """404: no such model; the message lists the served ones."""


class ServerBusy(SamplebayError):
    """503 after the retries: the queue was full, the device failed the batch, or the server is stopping.
    `retry_after` is the wait the server asked for, in seconds (None if it named none)."""

    def __init__(
        self,
        detail: str,
        status: int | None = 503,
        errors: Sequence[FieldProblem] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail, status, errors)
        self.retry_after = retry_after


class Timeout(SamplebayError):
    """504 (the request's deadline passed on the server), 408 (its body came too slowly), or no answer in
    the client's own timeout (status None)."""


class ConnectionFailed(SamplebayError):
    """No HTTP answer at all: nothing listens at `base_url`, or the connection broke."""


class StreamInterrupted(SamplebayError):
    """A stream ended without its 'done' or 'error' event."""


ERRORS_BY_STATUS: dict[int, type[SamplebayError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    408: Timeout,
    413: BadRequest,
    422: BadRequest,
    503: ServerBusy,
    504: Timeout,
}


def error_for(
    status: int, detail: str, errors: Sequence[FieldProblem] = (), retry_after: float | None = None
) -> SamplebayError:
    """The typed error of one status (a plain SamplebayError for one without its own class)."""
    kind = ERRORS_BY_STATUS.get(status, SamplebayError)
    if kind is ServerBusy:
        return ServerBusy(detail, status, errors, retry_after)
    return kind(detail, status, errors)


def error_from_response(response: httpx.Response) -> SamplebayError:
    """The server's error body ({"detail": ..., "errors": [...]}) as a typed error; a body that is not
    that (a proxy's page) is quoted as it is."""
    detail, problems = response.text.strip()[:MAX_QUOTED_CHARS] or response.reason_phrase, []
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])
        problems = [
            FieldProblem(str(item.get("field", "body")), str(item.get("message", "")))
            for item in body.get("errors") or []
            if isinstance(item, dict)
        ]
    return error_for(response.status_code, detail, problems, retry_after_seconds(response.headers.get("retry-after")))


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds: a number of seconds or an HTTP date (RFC 9110); None if absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


# --- what the server answers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """One entry of GET /models: what a model is and which request fields and bounds it takes."""

    name: str
    family: str  # "ebm", "flow" or "gan"
    members: list[str]  # checkpoints behind the name (several for an ensemble)
    shape: tuple[int, ...]  # [C, H, W] of one sample
    data_range: tuple[float, float]
    dataset: str | None
    ensemble: str | None
    sampler: dict[str, Any]  # the checkpoint's sampler defaults
    classes: list[str] | None  # what `label` indexes; None for an unconditional model
    latent_langevin: bool  # a GAN whose critic was saved: `steps` > 0 refines its latents (DDLS)
    limits: dict[str, Any]  # max_n, max_steps, max_frames, and each numeric field's bounds under "fields"
    metrics: dict[str, Any]
    buffer_size: int | None = None
    buffer_capacity: int | None = None
    buffer_saved_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer server this client does not know

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        known = {item.name for item in fields(cls)} - {"extra"}
        saved_at = data.get("buffer_saved_at")
        return cls(
            name=data["name"],
            family=data["family"],
            members=list(data.get("members", [])),
            shape=tuple(data["shape"]),
            data_range=(float(data["data_range"][0]), float(data["data_range"][1])),
            dataset=data.get("dataset"),
            ensemble=data.get("ensemble"),
            sampler=dict(data.get("sampler", {})),
            classes=data.get("classes"),
            latent_langevin=bool(data.get("latent_langevin", False)),
            limits=dict(data.get("limits", {})),
            metrics=dict(data.get("metrics", {})),
            buffer_size=data.get("buffer_size"),
            buffer_capacity=data.get("buffer_capacity"),
            buffer_saved_at=datetime.fromisoformat(saved_at) if saved_at else None,
            extra={key: value for key, value in data.items() if key not in known},
        )


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    run_ms: float
    total_ms: float


def image_grid(images: Sequence[Image.Image], columns: int | None = None, padding: int = 2) -> Image.Image:
    """Images of one size in a near-square grid on black, laid out as the server lays out its PNG grids
    (training/images.py `grid`): one image alone is returned as it is."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if len(images) == 1:
        return images[0]
    pixels = np.stack([np.asarray(image) for image in images])  # [n, H, W] or [n, H, W, C] uint8
    n, height, width = pixels.shape[:3]
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, *pixels.shape[3:]))
    for index in range(n):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top : top + height, left : left + width] = pixels[index]
    return Image.fromarray(canvas.astype(np.uint8))


@dataclass(frozen=True)
class Samples:
    """The answer to one sample request (POST /sample, format json; or a stream's 'done' event)."""

    model: str
    seed: int  # the seed the chains used: the same request with it gets the same images
    images: list[Image.Image] = field(repr=False)  # one PIL image per sample (mode L for grey, RGB for colour)
    steps: int | None = None  # Langevin steps run (EBMs, DDLS)
    energy: list[float | None] | None = None  # EBM: each sample's energy at its last step (None if not finite)
    bits_per_dim: list[float | None] | None = None  # flow: each sample's bits/dim
    trajectory: list[list[Image.Image]] | None = field(default=None, repr=False)  # frames x samples
    trajectory_steps: list[int] | None = None
    timings: Timings | None = None
    dropped: int = 0  # a stream's frames dropped just before 'done' (the client read slower than they came)

    def array(self) -> npt.NDArray[np.uint8]:
        """The samples as uint8 pixels: [n, H, W] for grey images, [n, H, W, C] for colour."""
        return np.stack([np.asarray(image) for image in self.images])

    def grid(self, columns: int | None = None, padding: int = 2) -> Image.Image:
        """All samples in one image: the grid the server's PNG answer shows for the same request."""
        return image_grid(self.images, columns, padding)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Samples:
        trajectory = data.get("trajectory")
        timings = data.get("timings")
        return cls(
            model=data["model"],
            seed=int(data["seed"]),
            images=[decode_png(encoded) for encoded in data["images"]],
            steps=data.get("steps"),
            energy=data.get("energy"),
            bits_per_dim=data.get("bits_per_dim"),
            trajectory=None if trajectory is None else [[decode_png(item) for item in frame] for frame in trajectory],
            trajectory_steps=data.get("trajectory_steps"),
            timings=None if timings is None else Timings(timings["queue_ms"], timings["run_ms"], timings["total_ms"]),
            dropped=int(data.get("dropped", 0)),
        )


@dataclass(frozen=True)
class Frame:
    """One streamed trajectory frame: every chain's state at `step` of `steps`, as one grid."""

    step: int
    steps: int
    energy: list[float | None] | None  # per chain; None at step 0
    mean_energy: float | None
    grid: Image.Image = field(repr=False)
    dropped: int = 0  # frames the server dropped just before this one (the client read slower than they came)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Frame:
        return cls(
            step=int(data["step"]),
            steps=int(data["steps"]),
            energy=data.get("energy"),
            mean_energy=data.get("mean_energy"),
            grid=decode_png(data["grid"]),
            dropped=int(data.get("dropped", 0)),
        )


@dataclass(frozen=True)
class SampleFile:
    """The server's own PNG (one image, or a grid for n > 1) or GIF (the trajectory), as bytes."""

    content: bytes = field(repr=False)
    media_type: str
    seed: int  # from X-Seed
    steps: int | None  # from X-Steps

    def image(self) -> Image.Image:
        """The picture, decoded (a GIF's first frame; iterate PIL's frames for the rest)."""
        return Image.open(io.BytesIO(self.content))

    def save(self, path: str | PathLike[str]) -> None:
        with open(path, "wb") as file:
            file.write(self.content)


def decode_png(encoded: str) -> Image.Image:
    """A base64 PNG of the server's answer -> a loaded PIL image."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as error:
        raise SamplebayError(f"the server sent an image that is not a base64 PNG ({error})") from error
    return image


def encode_image(value: ImageInput) -> str:
    """What `image` and `mask` accept, as the base64 the server reads: a str is sent as it is (base64, or
    a data: URL), bytes are a PNG/JPEG file, a PIL image or uint8 array ([H, W] grey, [H, W, 3] colour) is
    written as PNG."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 pixels 0-255, [H, W] or [H, W, 3]; got {value.dtype}")
        value = Image.fromarray(value)
    if not isinstance(value, Image.Image):
        raise TypeError(f"an image must be base64 str, PNG/JPEG bytes, a PIL image or a uint8 array; got {type(value)}")
    buffer = io.BytesIO()
    value.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- requests -----------------------------------------------------------------------------------------------


class SampleFields(TypedDict, total=False):
    """POST /sample's optional fields (README, "The server"); None or left out: the checkpoint's default."""

    n: int | None
    seed: int | None
    steps: int | None
    step_size: float | None
    noise: float | None
    momentum: float | None
    guidance: float | None
    temperature: float | None
    init: Literal["buffer", "noise", "image"] | None
    image: ImageInput | None
    mask: ImageInput | None
    label: int | None
    trajectory_every: int | None


def sample_body(model: str, options: Mapping[str, Any], image_format: str, stream: bool = False) -> dict[str, Any]:
    """The JSON body of POST /sample: the fields given, images encoded, None left out."""
    body: dict[str, Any] = {"model": model, "format": image_format}
    for name, value in options.items():
        if value is not None:
            body[name] = encode_image(value) if name in ("image", "mask") else value
    if stream:
        body["stream"] = True
    return body


class EventParser:
    """Server-Sent Events, fed line by line as they arrive (WHATWG rules: `event:` names the event,
    `data:` lines are joined, a blank line ends it, a line starting with `:` is a comment)."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """(event, data) when `line` ends an event, else None."""
        if not line:
            event = (self.event, "\n".join(self.data)) if self.data else None
            self.event, self.data = "message", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def stream_item(event: str, data: str) -> Frame | Samples | None:
    """One event of a sample stream: a Frame, the final Samples, or raises the server's 'error'.
    Events this client does not know are skipped (None)."""
    if event not in ("frame", "done", "error"):
        return None
    try:
        payload = json.loads(data)
        if event == "frame":
            return Frame.from_json(payload)
        if event == "done":
            return Samples.from_json(payload)
        status, detail = int(payload.get("status", 500)), str(payload.get("detail", "the stream failed"))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SamplebayError(f"unexpected {event!r} event ({type(error).__name__}: {error})") from error
    raise error_for(status, detail)


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


def _sample_file(response: httpx.Response) -> SampleFile:
    seed, steps = response.headers.get("x-seed", ""), response.headers.get("x-steps")
    if not seed.isdigit() or not (steps is None or steps.isdigit()):
        raise SamplebayError(f"unexpected answer from {response.url}: X-Seed {seed!r}, X-Steps {steps!r}")
    return SampleFile(
        content=response.content,
        media_type=response.headers.get("content-type", ""),
        seed=int(seed),
        steps=int(steps) if steps is not None else None,
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
        return _parse(response, Samples.from_json)

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
        return _parse(response, Samples.from_json)

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
