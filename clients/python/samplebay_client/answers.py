"""What the Python client hands back and sends: models, samples, frames, images, stream events."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from os import PathLike
from typing import Any, Literal, TypedDict

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from samplebay_client.errors import AnswerTooLarge, BadAnswer, BadRequest, error_for
from samplebay_client.limits import Limits, PixelBudget, png_size

# What an answer of the wrong shape raises while it is read: a missing key, a string where a list was, 1e999 where
# an integer was (OverflowError), JSON nested thousands deep (RecursionError).
MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError)
ImageInput = str | bytes | Image.Image | npt.NDArray[Any]  # base64 or data: URL, PNG/JPEG bytes, PIL, uint8 pixels


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
    version: str | None = None  # the digest prefix of the file serving now (X-Model-Version of its answers)
    loaded_at: datetime | None = None  # when that version was loaded
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer server this client does not know

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        known = {item.name for item in fields(cls)} - {"extra"}
        saved_at, loaded_at = data.get("buffer_saved_at"), data.get("loaded_at")
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
            version=data.get("version"),
            loaded_at=datetime.fromisoformat(loaded_at) if loaded_at else None,
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
    steps: int | None = None  # Langevin steps run (EBMs, DDLS; with a tolerance, the most a chain ran)
    chain_steps: list[int] | None = None  # EBMs with a tolerance: the steps each sample's chain ran
    energy: list[float | None] | None = None  # EBM: each sample's energy at its last step (None if not finite)
    bits_per_dim: list[float | None] | None = None  # flow: each sample's bits/dim
    trajectory: list[list[Image.Image]] | None = field(default=None, repr=False)  # frames x samples
    trajectory_steps: list[int] | None = None
    timings: Timings | None = None
    dropped: int = 0  # a stream's frames dropped just before 'done' (the client read slower than they came)
    model_version: str | None = None  # X-Model-Version: the version of the model that drew them

    def array(self) -> npt.NDArray[np.uint8]:
        """The samples as uint8 pixels: [n, H, W] for grey images, [n, H, W, C] for colour."""
        return np.stack([np.asarray(image) for image in self.images])

    def grid(self, columns: int | None = None, padding: int = 2) -> Image.Image:
        """All samples in one image: the grid the server's PNG answer shows for the same request."""
        return image_grid(self.images, columns, padding)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], budget: PixelBudget | None = None) -> Samples:
        """`budget`: the decoded pixels the answer may hold (the default Limits' when None)."""
        budget = budget or PixelBudget(Limits())
        trajectory = data.get("trajectory")
        timings = data.get("timings")
        return cls(
            model=data["model"],
            seed=int(data["seed"]),
            images=[decode_png(encoded, budget) for encoded in data["images"]],
            steps=data.get("steps"),
            chain_steps=data.get("chain_steps"),
            energy=data.get("energy"),
            bits_per_dim=data.get("bits_per_dim"),
            trajectory=None
            if trajectory is None
            else [[decode_png(item, budget) for item in frame] for frame in trajectory],
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
    def from_json(cls, data: Mapping[str, Any], budget: PixelBudget | None = None) -> Frame:
        return cls(
            step=int(data["step"]),
            steps=int(data["steps"]),
            energy=data.get("energy"),
            mean_energy=data.get("mean_energy"),
            grid=decode_png(data["grid"], budget or PixelBudget(Limits())),
            dropped=int(data.get("dropped", 0)),
        )


@dataclass(frozen=True)
class SampleFile:
    """The server's own PNG (one image, or a grid for n > 1) or GIF (the trajectory), as bytes."""

    content: bytes = field(repr=False)
    media_type: str
    seed: int  # from X-Seed
    steps: int | None  # from X-Steps
    model_version: str | None = None  # from X-Model-Version
    max_pixels: int = field(default=Limits.max_image_pixels, repr=False)  # the client's Limits.max_image_pixels

    def image(self) -> Image.Image:
        """The picture, decoded (a GIF's first frame; iterate PIL's frames for the rest), once its header
        shows it within the client's pixel limit."""
        try:
            image = Image.open(io.BytesIO(self.content))
            PixelBudget(Limits(max_image_pixels=self.max_pixels, max_answer_pixels=self.max_pixels)).take(*image.size)
            image.load()
        except Image.DecompressionBombError as error:
            raise AnswerTooLarge(f"the server's {self.media_type} file is too large to decode ({error})") from error
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise BadAnswer(f"the server sent a {self.media_type} file that does not decode ({error})") from error
        return image

    def save(self, path: str | PathLike[str]) -> None:
        with open(path, "wb") as file:
            file.write(self.content)


def decode_png(encoded: str, budget: PixelBudget) -> Image.Image:
    """A base64 PNG of the server's answer -> a loaded PIL image; its size is taken from `budget` as its header
    states it, before any pixel is decoded."""
    if not isinstance(encoded, str):
        raise BadAnswer(f"the server sent an image that is not a base64 string but {type(encoded).__name__}")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadAnswer(f"the server sent an image that is not base64 ({error})") from error
    width, height = png_size(data)
    budget.take(width, height)
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        if image.size != (width, height):
            raise ValueError(f"its header says {width} x {height}, PIL reads {image.size}")
        image.load()
    except Image.DecompressionBombError as error:
        raise AnswerTooLarge(f"the server sent an image too large to decode ({error})") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise BadAnswer(f"the server sent an image that is not a PNG ({error})") from error
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
    tolerance: float | None
    trajectory_every: int | None


INTEGER_FIELDS = ("n", "seed", "steps", "label", "trajectory_every")
NUMBER_FIELDS = ("step_size", "noise", "momentum", "guidance", "temperature", "tolerance")
MAX_INTEGER = 2**64  # past any bound the server has (a seed is below 2**63): refused here, not sent


def sample_body(model: str, options: Mapping[str, Any], image_format: str, stream: bool = False) -> dict[str, Any]:
    """The JSON body of POST /sample: the fields given, images encoded, None left out. A number that JSON cannot
    carry or no server takes (1e999, NaN, a seed of 10**5000) is a BadRequest here, before anything is sent."""
    body: dict[str, Any] = {"model": model, "format": image_format}
    for name, value in options.items():
        if value is None:
            continue
        if name in ("image", "mask"):
            value = encode_image(value)
        elif name in INTEGER_FIELDS:
            value = _integer(name, value)
        elif name in NUMBER_FIELDS:
            value = _number(name, value)
        body[name] = value
    if stream:
        body["stream"] = True
    return body


def _integer(name: str, value: Any) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not -MAX_INTEGER < value < MAX_INTEGER:
        raise BadRequest(f"{name} must be an integer below 2**64 in size; got {_shown(value)}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number; got {_shown(value)}")
    return float(value)


def _shown(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 100:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)[:80]


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


def stream_item(event: str, data: str, limits: Limits | None = None) -> Frame | Samples | None:
    """One event of a sample stream: a Frame, the final Samples, or raises the server's 'error'.
    Events this client does not know are skipped (None). Each event's images are held to `limits`' pixels."""
    if event not in ("frame", "done", "error"):
        return None
    budget = PixelBudget(limits or Limits())
    try:
        payload = json.loads(data)
        if event == "frame":
            return Frame.from_json(payload, budget)
        if event == "done":
            return Samples.from_json(payload, budget)
        status, detail = int(payload.get("status", 500)), str(payload.get("detail", "the stream failed"))[:500]
    except MALFORMED as error:
        raise BadAnswer(f"unexpected {event!r} event ({type(error).__name__}: {str(error)[:200]})") from error
    raise error_for(status, detail)
