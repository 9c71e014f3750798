"""The Python client's errors: each carries the server's status and message, or names what was wrong with the answer."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Past the server's default request deadline (120 s, then 10 s of grace), so its 504 arrives before ours.
DEFAULT_TIMEOUT = httpx.Timeout(150.0, connect=10.0)
DEFAULT_RETRIES = 3  # retries of a 503, after the first try
DEFAULT_MAX_RETRY_WAIT_S = 30.0  # a 503 asking for a longer wait is raised instead of waited out
JSON, EVENT_STREAM = "application/json", "text/event-stream"
BACKOFF_S = 0.5  # first wait after a 503 without Retry-After; doubled each retry
MAX_QUOTED_CHARS = 500  # of an error body that is not the server's JSON (a proxy's HTML page)


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
    """400, 413, 415 or 422: the request itself is wrong (a field out of range, one that does not apply, ...)."""


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


class BadAnswer(SamplebayError):
    """The answer is not one a samplebay server gives: not JSON of the expected shape, a redirect (the client
    follows none: use the address it names as base_url), an image that is not a PNG."""


class AnswerTooLarge(BadAnswer):
    """The answer went past one of the client's Limits: bytes of an answer or stream event, decoded pixels."""


ERRORS_BY_STATUS: dict[int, type[SamplebayError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    408: Timeout,
    413: BadRequest,
    415: BadRequest,
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


def error_from_response(response: httpx.Response, content: bytes | bytearray) -> SamplebayError:
    """The server's error body ({"detail": ..., "errors": [...]}) as a typed error; a body that is not
    that (a proxy's page, or one cut at Limits.max_error_bytes) is quoted as it is."""
    text = content.decode("utf-8", errors="replace")
    detail, problems = text.strip()[:MAX_QUOTED_CHARS] or response.reason_phrase, []
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])[:MAX_QUOTED_CHARS]
        errors = body.get("errors")
        problems = [
            FieldProblem(str(item.get("field", "body")), str(item.get("message", "")))
            for item in (errors if isinstance(errors, list) else [])
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
