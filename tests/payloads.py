"""What tests send and read back over HTTP: images as base64 PNG both ways, and Server-Sent Events parsed by the
client's own parser (so a test reads a stream exactly as users of the client do)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable

import numpy as np
from PIL import Image
from samplebay_client.answers import EventParser


def png_b64(pixels: np.ndarray, mode: str | None = None) -> str:
    """A PNG of `pixels` (cast to uint8), base64 as a request's `image` field takes it; mode None: Pillow's
    reading of the array's shape (L for [H, W], RGB for [H, W, 3])."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels).astype(np.uint8), mode=mode).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_array(encoded: str) -> np.ndarray:
    """The pixels of a base64 PNG of an answer."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))


def sse_events(lines: Iterable[str]) -> list[tuple[str, dict]]:
    """Every event of a stream's lines, as (event name, its JSON data)."""
    parser, events = EventParser(), []
    for line in lines:
        if (event := parser.feed(line)) is not None:
            events.append((event[0], json.loads(event[1])))
    return events
