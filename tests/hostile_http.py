"""A hostile HTTP server for tests: a few lines of asyncio on a free loopback port that answer each request with
whatever bytes a test's coroutine writes (endless bodies, trickles, garbage status lines, cut chunks)."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress

Respond = Callable[[asyncio.StreamWriter], Awaitable[None]]


@contextmanager
def hostile_server(respond: Respond) -> Iterator[tuple[str, list[bytes]]]:
    """A server on a free loopback port that reads each request (head, and body by its Content-Length) and answers
    with `respond`; yields its address and the request heads it read. Leaving it cancels what is still sending."""
    loop = asyncio.new_event_loop()
    heads: list[bytes] = []
    listening = threading.Event()
    port: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            if length:
                await reader.readexactly(int(length.group(1)))
            await respond(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up: what these servers are for
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        listening.set()
        await server.serve_forever()

    def run() -> None:
        asyncio.set_event_loop(loop)
        main = loop.create_task(serve())
        with suppress(asyncio.CancelledError):
            loop.run_until_complete(main)
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert listening.wait(10), "the hostile server did not start"
    try:
        yield f"http://127.0.0.1:{port[0]}", heads
    finally:
        loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks(loop)])
        thread.join(10)


def head(status: str = "200 OK", content_type: str = "application/json", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-type: {content_type}", "connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
