"""ASGI middleware that must see a request before FastAPI parses it."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class BodySizeLimit:
    """ASGI middleware: 413 for a body over the limit, by Content-Length or by counting a chunked body.

    The body is read here (it is small by construction) and replayed to the app, so the limit holds
    however the client sends it.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await self._reject(send)
                return
        body_sent = False

        async def replay() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Any) -> None:
        response = JSONResponse({"detail": f"request body is larger than {self.limit} bytes"}, status_code=413)
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict:
    """The receive channel of a rejected request: its body is not read again."""
    return {"type": "http.disconnect"}
