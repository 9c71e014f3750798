"""Guards that act before FastAPI parses a request: on the connection (idle clients), on the request head
(the API key) and on the body.

A client can hold a server without sending anything it could reject: by opening a connection and never
sending a request, or by sending a request head and then only part of its body. Each guard bounds one
of these by time, so that neither sockets nor a graceful shutdown wait on a client forever. A client
without the API key is turned away on its head alone, before any of this.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Collection
from typing import Any

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol


class BodyLimits:
    """ASGI middleware: 413 for a body over `limit` bytes, 408 for one not received within `timeout_s`.

    The size is checked by Content-Length and by counting a chunked body. The timeout runs from the
    first read of the body to its last byte, so a client that trickles a byte now and then is cut off
    as surely as one that stops. The body is read here (it is small by construction) and replayed to
    the app, so both limits hold however the client sends it. `limit` may be a function: the limit then
    follows the models served (an init image of the largest one must fit).
    """

    def __init__(
        self, app: Any, limit: int | Callable[[], int], timeout_s: float, path_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self._limit = limit
        self.path_limits = path_limits or {}  # a path whose bodies may be larger (POST /score's images)
        self.timeout_s = timeout_s

    @property
    def limit(self) -> int:
        return self._limit() if callable(self._limit) else self._limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.limit)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _reject(send, 413, f"request body is larger than {limit} bytes")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        try:
            async with asyncio.timeout(self.timeout_s):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    more = message.get("more_body", False)
                    if size > limit:
                        await _reject(send, 413, f"request body is larger than {limit} bytes")
                        return
        except TimeoutError:
            detail = f"request body not received within {self.timeout_s:g} s ({size} bytes arrived); send it whole"
            await _reject(send, 408, detail)
            return
        except asyncio.CancelledError:  # the graceful shutdown ran out while the body was still coming
            await _reject(send, 503, "the server is shutting down; retry on the next instance")
            return  # this task ends here: the cancellation has done its work
        body_sent = False

        async def replay() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BearerKey:
    """ASGI middleware: 401 for a request to a protected path without `Authorization: Bearer <key>`.

    Outermost, so it answers on the request head alone: an unauthenticated client's body is never read,
    never waited for and never validated (it learns nothing of the fields from a 422). The scheme must be
    `Bearer` (any case, RFC 7235); the key is compared in constant time.
    """

    def __init__(self, app: Any, key: str, protected_paths: Collection[str]) -> None:
        self.app = app
        self.key = key.encode()
        self.protected_paths = frozenset(protected_paths)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _route_path(scope) in self.protected_paths and not self._authorized(scope):
            detail = "missing or wrong API key: send 'Authorization: Bearer <key>'"
            await _reject(send, 401, detail, {"www-authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        supplied = [value for name, value in scope.get("headers", []) if name == b"authorization"]
        if len(supplied) != 1:
            return False
        scheme, _, token = supplied[0].partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token, self.key)


def _route_path(scope: dict) -> str:
    """The path the app routes on: without the prefix a proxy mounts it under (`root_path`)."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


async def _reject(send: Any, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """Answer before the body is read whole; `Connection: close`, since its rest may still be coming."""
    headers = {"connection": "close", **(headers or {})}
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict:
    """The receive channel of a rejected request: its body is not read again."""
    return {"type": "http.disconnect"}


class IdleTimeoutH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with its keep-alive timeout applied to every wait for a request head.

    uvicorn closes a connection that sends nothing for `timeout_keep_alive` seconds after a response, but
    not one that never sends a request, nor one that sends part of a request head and stops (each byte
    stops the clock). Here the clock also runs from the moment a connection is made, and keeps running
    until a whole request head has arrived.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        waiting = self.timeout_keep_alive_task
        super().data_received(data)  # cancels the timer on any byte
        head_incomplete = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting is not None and self.timeout_keep_alive_task is None and head_incomplete:
            self.timeout_keep_alive_task = self.loop.call_at(waiting.when(), self.timeout_keep_alive_handler)
