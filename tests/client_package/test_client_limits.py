"""The client bounds what it accepts (issue 37, item 8): each test builds the hostile server it needs, a few lines of
asyncio on a loopback port, and expects a SamplebayError within the client's Limits, never a hang, a crash or
memory spent without bound."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from contextlib import aclosing

import httpx
import numpy as np
import pytest
from hostile_http import Respond, head, hostile_server
from PIL import Image
from samplebay_client import (
    AnswerTooLarge,
    AsyncClient,
    BadAnswer,
    BadRequest,
    Client,
    Frame,
    Limits,
    SamplebayError,
    Timeout,
)

CHUNK = b"x" * 65536
ENDLESS = 1 << 18  # chunks an "endless" body sends at most: 16 GiB, far past any limit a test sets
QUICK = Limits(deadline_s=1.0, max_answer_bytes=1 << 20, max_event_bytes=1 << 16)
LONG_READS = httpx.Timeout(60.0)  # httpx's per-read timeout, far longer than the deadline that must end the call
MODEL = {"name": "m", "family": "ebm", "shape": [1, 2, 2], "data_range": [-1, 1]}


def answer(body: bytes, status: str = "200 OK", content_type: str = "application/json", **headers: str) -> Respond:
    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(head(status, content_type, content_length=str(len(body)), **headers) + body)
        await writer.drain()

    return respond


def endless(status: str = "200 OK", content_type: str = "application/json", start: bytes = b"[") -> Respond:
    """A body without end (no Content-Length: it would end when the connection does)."""

    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(head(status, content_type) + start)
        for _ in range(ENDLESS):
            writer.write(CHUNK)
            await writer.drain()

    return respond


def trickle(preamble: bytes, drip: bytes, every_s: float = 0.02) -> Respond:
    """`preamble`, then `drip` again and again, one every `every_s`: each read gets something well within any
    per-read timeout, so only a deadline over the whole call ends it."""

    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(preamble)
        for _ in range(100_000):
            await writer.drain()
            await asyncio.sleep(every_s)
            writer.write(drip)

    return respond


def silent_after(preamble: bytes) -> Respond:
    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(preamble)
        await writer.drain()
        await asyncio.Event().wait()  # holds the connection until the server is left

    return respond


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A small file whose header says width x height grey pixels: what a decompression bomb looks like before
    it is decoded (the pixel data is a few zero rows)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def real_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def samples_body(images: list[bytes], seed: object = 1) -> bytes:
    return json.dumps({"model": "m", "seed": seed, "images": [b64(image) for image in images]}).encode()


def seconds_to_raise(kind: type[Exception], call: Callable[[], object]) -> float:
    start = time.monotonic()
    with pytest.raises(kind):
        call()
    return time.monotonic() - start


# --- bytes: endless bodies, declared lengths, endless errors --------------------------------------------------


def test_an_endless_answer_stops_at_the_byte_cap() -> None:
    with (
        hostile_server(endless()) as (url, _),
        Client(url, limits=QUICK) as client,
        pytest.raises(AnswerTooLarge, match="1,048,576 bytes") as raised,
    ):
        client.models()
    assert raised.value.status == 200


def test_a_declared_length_over_the_cap_is_refused_before_any_of_it_is_read() -> None:
    too_long = silent_after(head(content_length=str(10 << 30)))  # says 10 GiB, then sends nothing
    with hostile_server(too_long) as (url, _), Client(url, limits=QUICK, timeout=LONG_READS) as client:
        assert seconds_to_raise(AnswerTooLarge, client.models) < 5  # not the 60 s per read: refused from the head


def test_an_endless_error_body_is_cut_and_its_status_kept() -> None:
    with (
        hostile_server(endless("500 Internal Server Error", "text/html", b"<html>")) as (url, _),
        Client(url, limits=QUICK) as client,
        pytest.raises(SamplebayError) as raised,
    ):
        client.models()
    assert raised.value.status == 500 and raised.value.detail.startswith("<html>xxx")
    assert len(raised.value.detail) <= 500


def test_a_compressed_answer_is_refused_the_client_asks_for_identity() -> None:
    bomb = zlib.compress(b"[" + b" " * (8 << 20) + b"]")  # 8 MiB of JSON in a few KiB
    gzip_answer = answer(bomb, content_encoding="deflate")
    with (
        hostile_server(gzip_answer) as (url, heads),
        Client(url, limits=QUICK) as client,
        pytest.raises(BadAnswer, match="Content-Encoding 'deflate'"),
    ):
        client.models()
    assert b"accept-encoding: identity" in heads[0].lower()
    compressed_stream = answer(bomb, content_type="text/event-stream", content_encoding="gzip")
    with (
        hostile_server(compressed_stream) as (url, _),
        Client(url, limits=QUICK) as client,
        pytest.raises(BadAnswer, match="Content-Encoding 'gzip'"),
    ):
        list(client.stream("m"))


# --- time: trickles, silence, endless comments --------------------------------------------------------------


@pytest.mark.parametrize("deadline_s", [0.5, 1.5])
def test_a_trickling_answer_ends_at_the_deadline_not_per_read(deadline_s: float) -> None:
    slow = trickle(head(content_length="1000000") + b"[", b" ")
    limits = Limits(deadline_s=deadline_s)
    with hostile_server(slow) as (url, _), Client(url, limits=limits, timeout=LONG_READS) as client:
        took = seconds_to_raise(Timeout, client.models)
    assert deadline_s <= took < deadline_s + 1.0


def test_silence_after_the_headers_ends_at_the_deadline() -> None:
    with (
        hostile_server(silent_after(head(content_length="100") + b"[")) as (url, _),
        Client(url, limits=QUICK, timeout=LONG_READS) as client,
    ):
        took = seconds_to_raise(Timeout, client.models)
    assert 1.0 <= took < 2.5  # the deadline, not the 60 s per read; slack for a loaded machine


def test_an_endless_stream_of_comments_ends_at_the_deadline() -> None:
    comments = trickle(head(content_type="text/event-stream"), b": still here\n", every_s=0.005)
    with hostile_server(comments) as (url, _), Client(url, limits=QUICK, timeout=LONG_READS) as client:
        took = seconds_to_raise(Timeout, lambda: list(client.stream("m")))
    assert 1.0 <= took < 2.5  # the deadline, not the 60 s per read; slack for a loaded machine


def test_a_streams_deadline_does_not_count_the_time_the_caller_holds_a_frame() -> None:
    """Frames come at once; the caller spends 0.3 s on each of five: 1.5 s in all, past the 1 s deadline, yet
    the stream ends normally, because the client waited for the server only a moment."""
    frame = {"step": 0, "steps": 4, "energy": None, "mean_energy": None, "grid": b64(real_png(2, 2))}
    done = json.loads(samples_body([real_png(2, 2)]))
    events = [f"event: frame\ndata: {json.dumps(frame)}\n\n" for _ in range(5)]
    body = ("".join(events) + f"event: done\ndata: {json.dumps(done)}\n\n").encode()
    with (
        hostile_server(answer(body, content_type="text/event-stream")) as (url, _),
        Client(url, limits=QUICK) as client,
    ):
        items = []
        for item in client.stream("m"):
            items.append(item)
            time.sleep(0.3)  # the caller's own work on the frame
    assert [type(item).__name__ for item in items] == ["Frame"] * 5 + ["Samples"]


def test_the_async_client_ends_a_trickle_and_an_endless_answer_the_same_way() -> None:
    async def both() -> tuple[float, SamplebayError]:
        with hostile_server(trickle(head(content_length="1000000") + b"[", b" ")) as (url, _):
            async with AsyncClient(url, limits=QUICK, timeout=LONG_READS) as client:
                start = time.monotonic()
                with pytest.raises(Timeout):
                    await client.models()
                took = time.monotonic() - start
        with hostile_server(endless()) as (url, _):
            async with AsyncClient(url, limits=QUICK) as client:
                with pytest.raises(AnswerTooLarge) as raised:
                    await client.models()
        return took, raised.value

    took, _ = asyncio.run(both())
    assert 1.0 <= took < 2.5  # the deadline, not the 60 s per read; slack for a loaded machine


def drip(data: bytes, every_s: float) -> Respond:
    """`data` one byte at a time, one every `every_s`."""

    async def respond(writer: asyncio.StreamWriter) -> None:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every_s)

    return respond


def test_headers_trickled_a_byte_at_a_time_end_at_the_deadline_in_both_clients() -> None:
    """A status line and headers at a byte every 0.2 s: every read gets a byte well within its 60 s, so only the
    call's deadline (1 s) ends the call, in the sync client as in the async one."""
    head_forever = b"HTTP/1.1 200 OK\r\n" + b"x-still: coming\r\n" * 1000

    def sync_models(url: str) -> None:
        with Client(url, limits=QUICK, timeout=LONG_READS) as client:
            client.models()

    async def async_models(url: str) -> None:
        async with AsyncClient(url, limits=QUICK, timeout=LONG_READS) as client:
            await client.models()

    for models in (sync_models, lambda url: asyncio.run(async_models(url))):
        with hostile_server(drip(head_forever, every_s=0.2)) as (url, _):
            took = seconds_to_raise(Timeout, lambda: models(url))  # noqa: B023 (called at once, in this pass)
        assert 1.0 <= took < 2.0  # the deadline, not the 60 s per read; slack for a loaded machine


def test_the_async_stream_ends_endless_comments_at_the_deadline() -> None:
    async def read_all(url: str) -> None:
        async with AsyncClient(url, limits=QUICK, timeout=LONG_READS) as client, aclosing(client.stream("m")) as stream:
            async for _ in stream:
                pass

    comments = trickle(head(content_type="text/event-stream"), b": still here\n", every_s=0.005)
    with hostile_server(comments) as (url, _):
        took = seconds_to_raise(Timeout, lambda: asyncio.run(read_all(url)))
    assert 1.0 <= took < 2.5  # the deadline, not the 60 s per read; slack for a loaded machine


# --- stream events ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start", [b"event: frame\ndata: ", b"event: frame\n" + b"data: xxxxxxxx\n" * 10_000], ids=["one line", "lines"]
)
def test_a_stream_event_without_end_stops_at_the_event_cap(start: bytes) -> None:
    with (
        hostile_server(endless(content_type="text/event-stream", start=start)) as (url, _),
        Client(url, limits=QUICK) as client,
        pytest.raises(AnswerTooLarge, match="per event"),
    ):
        list(client.stream("m"))


# --- pixels -------------------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    """200 megapixels in a small PNG (PIL itself would raise DecompressionBombError): refused before decoding."""
    bomb = samples_body([png_claiming(20_000, 10_000)])
    with (
        hostile_server(answer(bomb)) as (url, _),
        Client(url) as client,
        pytest.raises(AnswerTooLarge, match="20000 x 10000 pixels"),
    ):
        client.sample("m")


def test_the_pixels_of_all_images_of_an_answer_are_capped_together() -> None:
    limits = Limits(max_image_pixels=10_000, max_answer_pixels=25_000)
    three = samples_body([real_png(100, 100)] * 3)  # each within the per-image limit, 30,000 together
    with (
        hostile_server(answer(three)) as (url, _),
        Client(url, limits=limits) as client,
        pytest.raises(AnswerTooLarge, match="25,000 pixels"),
    ):
        client.sample("m")
    with (
        hostile_server(answer(samples_body([real_png(100, 100)] * 2))) as (url, _),
        Client(url, limits=limits) as client,
    ):
        assert client.sample("m").array().shape == (2, 100, 100)


def test_a_streamed_frame_and_a_png_file_are_held_to_the_pixel_limit() -> None:
    frame = {"step": 0, "steps": 4, "grid": b64(png_claiming(5000, 5000))}
    stream = f"event: frame\ndata: {json.dumps(frame)}\n\n".encode()
    with (
        hostile_server(answer(stream, content_type="text/event-stream")) as (url, _),
        Client(url, limits=Limits(max_image_pixels=1 << 20)) as client,
        pytest.raises(AnswerTooLarge),
    ):
        list(client.stream("m"))
    png = answer(png_claiming(20_000, 10_000), content_type="image/png", x_seed="3", x_steps="10")
    with hostile_server(png) as (url, _), Client(url) as client:
        file = client.sample_file("m")  # the bytes are what was asked for; decoding them is held to the limit
        assert file.seed == 3
        with pytest.raises(AnswerTooLarge):
            file.image()


# --- the rest: redirects, numbers, shapes ---------------------------------------------------------------------


def test_a_redirect_is_refused_not_taken_for_the_answer() -> None:
    moved = answer(json.dumps([MODEL]).encode(), "302 Found", location="http://elsewhere.example/models")
    with (
        hostile_server(moved) as (url, heads),
        Client(url, api_key="k") as client,
        pytest.raises(BadAnswer, match=r"redirect to http://elsewhere\.example/models") as raised,
    ):
        client.models()
    assert raised.value.status == 302 and len(heads) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", 1e999), ("seed", float("nan")), ("seed", 10**5000), ("seed", 1.5), ("step_size", float("inf"))],
    ids=["seed 1e999", "seed nan", "seed of 5001 digits", "seed 1.5", "step_size inf"],
)
def test_a_number_no_server_takes_is_refused_before_sending(field: str, value: object) -> None:
    with hostile_server(answer(samples_body([real_png(2, 2)]))) as (url, heads), Client(url) as client:
        with pytest.raises(BadRequest, match=field) as raised:
            client.sample("m", **{field: value})  # type: ignore[misc]
        assert raised.value.status is None and heads == []  # nothing was sent
        assert client.sample("m", seed=7.0).seed == 1  # an integral float is the integer it names
    assert len(heads) == 1 and heads[0].startswith(b"POST /sample")


@pytest.mark.parametrize(
    "body",
    [
        samples_body([real_png(2, 2)], seed=1e999),  # json.loads reads it as inf: int() would overflow
        b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's recursion
        json.dumps({"model": "m", "seed": 1, "images": [12]}).encode(),
        json.dumps({"model": "m", "seed": 1, "images": ["bm90IGEgcG5n"]}).encode(),  # base64 of "not a png"
    ],
    ids=["seed 1e999", "deep", "image not a string", "image not a png"],
)
def test_an_answer_of_the_wrong_shape_is_a_bad_answer(body: bytes) -> None:
    with hostile_server(answer(body)) as (url, _), Client(url) as client, pytest.raises(BadAnswer):
        client.sample("m")


def test_a_seed_header_of_thousands_of_digits_is_a_bad_answer() -> None:
    png = answer(real_png(2, 2), content_type="image/png", x_seed="9" * 5000)
    with hostile_server(png) as (url, _), Client(url) as client, pytest.raises(BadAnswer, match="X-Seed"):
        client.sample_file("m")


def test_an_event_of_the_wrong_shape_is_a_bad_answer() -> None:
    stream = b'event: frame\ndata: {"step": 1e999, "steps": 1, "grid": ""}\n\n'
    with (
        hostile_server(answer(stream, content_type="text/event-stream")) as (url, _),
        Client(url) as client,
        pytest.raises(BadAnswer, match="'frame' event"),
    ):
        list(client.stream("m"))


def test_frames_split_across_reads_and_crlf_line_ends_are_read_whole() -> None:
    frame = {"step": 2, "steps": 4, "grid": b64(real_png(3, 3))}
    done = json.loads(samples_body([real_png(3, 3)]))
    text = f"event: frame\r\ndata: {json.dumps(frame)}\r\n\r\nevent: done\rdata: {json.dumps(done)}\r\r"
    body = text.encode()

    async def in_pieces(writer: asyncio.StreamWriter) -> None:
        writer.write(head(content_type="text/event-stream"))
        for start in range(0, len(body), 7):  # seven bytes at a time: lines and CRLFs cut anywhere
            writer.write(body[start : start + 7])
            await writer.drain()

    with hostile_server(in_pieces) as (url, _), Client(url) as client:
        items = list(client.stream("m"))
    assert isinstance(items[0], Frame) and items[0].step == 2 and items[1].seed == 1


# --- memory -------------------------------------------------------------------------------------------------

MEASURE = """
import sys
from samplebay_client import AnswerTooLarge, Client, Limits

def rss(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) * 1024

with Client(sys.argv[1], limits=Limits(max_answer_bytes=int(sys.argv[2]))) as client:
    before = rss("VmRSS:")
    try:
        client.models()
    except AnswerTooLarge:
        print(rss("VmHWM:") - before)
"""


def test_memory_against_an_endless_answer_stays_within_the_cap_and_50_mb() -> None:
    """The issue's target: a client reading an endless answer grows by at most its byte cap + 50 MB (measured
    in a process of its own: peak resident memory during the call over resident memory before it)."""
    cap = 64 << 20
    with hostile_server(endless()) as (url, _):
        ran = subprocess.run(
            [sys.executable, "-c", MEASURE, url, str(cap)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr
    grown = int(ran.stdout)
    print(f"client memory against an endless answer, cap {cap >> 20} MiB: +{grown / 2**20:.1f} MiB")
    assert grown <= cap + 50_000_000
