"""Tensors -> pictures: the one place that knows how samples become PNG and GIF bytes."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor, data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """[N, C, H, W] floats in data_range -> [N, H, W, C] uint8 on the CPU."""
    low, high = data_range
    scaled = ((x.detach().float().cpu() - low) / (high - low)).clamp(0, 1)
    return (scaled * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def points_to_images(points: torch.Tensor, size: int = 128, extent: float = 1.5) -> torch.Tensor:
    """2-D samples [N, 2] -> one density image [1, 1, size, size] in [-1, 1] (a 2-D histogram)."""
    cells = ((points.detach().float().cpu() + extent) / (2 * extent) * size).long()
    inside = ((cells >= 0) & (cells < size)).all(dim=1)
    cells = cells[inside]
    counts = torch.zeros(size, size)
    counts.index_put_((size - 1 - cells[:, 1], cells[:, 0]), torch.ones(len(cells)), accumulate=True)
    shade = (counts / counts.max().clamp(min=1)).sqrt()
    return (shade * 2 - 1).reshape(1, 1, size, size)


def grid(
    x: torch.Tensor, data_range: tuple[float, float] = (-1.0, 1.0), columns: int | None = None, padding: int = 2
) -> Image.Image:
    """Images [N, C, H, W] -> one PIL image laid out in a near-square grid (one image if N == 1)."""
    return pixel_grid(to_uint8(x, data_range), columns, padding)


def pixel_grid(pixels: torch.Tensor, columns: int | None = None, padding: int = 2) -> Image.Image:
    """8-bit pixels [N, H, W, C] (to_uint8's) -> the grid `grid` lays out: a trajectory's frames are kept so."""
    n, height, width, channels = pixels.shape
    if n == 1:
        return _to_pil(pixels[0])
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)  # what grid_pixels counts
    canvas = torch.zeros(
        rows * (height + padding) + padding, columns * (width + padding) + padding, channels, dtype=torch.uint8
    )
    for index in range(n):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top : top + height, left : left + width] = pixels[index]
    return _to_pil(canvas)


def grid_pixels(n: int, shape: tuple[int, ...] | list[int], padding: int = 2) -> int:
    """Pixels of the picture `pixel_grid` lays out for n images of `shape` [C, H, W]: one frame of a GIF."""
    channels, height, width = shape
    wide = 1 if channels in (1, 3) else channels  # other channel counts are shown side by side (_to_pil)
    if n == 1:
        return height * wide * width
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    return (rows * (height + padding) + padding) * wide * (columns * (width + padding) + padding)


def _to_pil(pixels: torch.Tensor) -> Image.Image:  # [H, W, C] uint8
    """Grey for one channel, RGB for three; any other count (2, 4: no colour model's) as its channels side by
    side in grey, [H, C * W], so none is hidden as transparency."""
    height, width, channels = pixels.shape
    if channels not in (1, 3):
        pixels = pixels.permute(0, 2, 1).reshape(height, channels * width, 1)  # [H, C * W, 1]
    array = pixels.numpy()
    return Image.fromarray(array[:, :, 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


PALETTE_COLOURS = 255  # an RGB animation's one palette; index 255 is transparent: "as the frame before"
PALETTE_SAMPLE = 1 << 14  # pixels, drawn evenly from every frame, that the palette is fitted to


def gif_bytes(frames: list[Image.Image], frame_ms: int = 80, final_hold_ms: int = 1200) -> bytes:
    """An animated GIF that plays once per loop and holds on the last frame. Grey frames ('L') are written as they
    are: a GIF's 256 grey levels are 8-bit grey exactly. Colour frames share one palette (`palette_frames`) instead
    of the adaptive palette Pillow would fit to each frame (15.9 s for 33 frames of 16 chains at 3 x 128²)."""
    buffer = io.BytesIO()
    durations = [frame_ms] * (len(frames) - 1) + [final_hold_ms]
    if all(frame.mode == "L" for frame in frames):
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
        return buffer.getvalue()
    indexed = palette_frames(frames)
    # Disposal 1 keeps each frame under the next, so a transparent pixel shows the one before; optimize would fit
    # a palette to each frame again.
    indexed[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=indexed[1:],
        duration=durations,
        loop=0,
        transparency=PALETTE_COLOURS,
        disposal=1,
        optimize=False,
    )
    return buffer.getvalue()


def palette_frames(frames: list[Image.Image]) -> list[Image.Image]:
    """Colour frames -> 'P' frames over one palette for the whole animation: an octree's colours (Gervautz and
    Purgathofer 1988; Pillow's fast octree) for PALETTE_SAMPLE pixels drawn from all frames, fitted once; each
    frame's pixels then take their nearest colour (one C pass a frame, no dithering: dither would flicker between
    frames and defeat LZW). From the second frame on, a pixel whose colour is the one before becomes transparent
    (index PALETTE_COLOURS): long runs that LZW packs into few codes."""
    rgb = [frame if frame.mode == "RGB" else frame.convert("RGB") for frame in frames]
    width, height = rgb[0].size
    rng = np.random.default_rng(0)  # the same frames give the same bytes
    shares = [PALETTE_SAMPLE // (2 * len(rgb))] * len(rgb)
    shares[-1] += PALETTE_SAMPLE // 2  # the last frame, which the GIF holds, has half the sample
    drawn = [
        np.asarray(image).reshape(-1, 3)[rng.integers(0, width * height, share)]
        for image, share in zip(rgb, shares, strict=True)
    ]
    sample = Image.fromarray(np.concatenate(drawn)[None])  # one row of about PALETTE_SAMPLE pixels
    palette = sample.quantize(PALETTE_COLOURS, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    fitted = palette.getpalette() or []  # up to PALETTE_COLOURS colours; frames map to these only
    colours = [*fitted, *[0] * (3 * PALETTE_COLOURS - len(fitted)), 0, 0, 0]  # 256 entries, the last transparent
    indexed: list[Image.Image] = []
    previous: np.ndarray | None = None
    for image in rgb:
        index = np.asarray(image.quantize(palette=palette, dither=Image.Dither.NONE))  # [H, W] uint8
        shown = index if previous is None else np.where(index == previous, np.uint8(PALETTE_COLOURS), index)
        previous = index
        frame = Image.fromarray(shown, mode="P")
        frame.putpalette(colours)
        indexed.append(frame)
    return indexed


def save_grid(x: torch.Tensor, path: str, data_range: tuple[float, float] = (-1.0, 1.0)) -> None:
    image = grid(points_to_images(x) if x.dim() == 2 else x, (-1.0, 1.0) if x.dim() == 2 else data_range)
    image.save(path)


class ImageDecodeError(ValueError):
    """An uploaded image could not be read; the message says why."""


def image_size(payload: bytes) -> tuple[int, int]:
    """(width, height) of PNG/JPEG/... bytes, from the header alone."""
    try:
        with Image.open(io.BytesIO(payload)) as image:
            return image.size
    except Exception as error:  # Pillow raises many types for broken input
        raise ImageDecodeError(f"not a readable image ({type(error).__name__})") from error


IMAGE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # channels -> the image mode an upload is read in


def image_body_bytes(shape: tuple[int, ...] | list[int]) -> int:
    """The most bytes an image of `shape` [C, H, W] takes in a request body: an uncompressed PNG (a filter
    byte a row, chunk headers) in base64. 0 for a shape no image has (2-D points)."""
    if len(shape) != 3:
        return 0
    channels, height, width = shape
    png = height * (channels * width + 1) + 1024
    return 4 * math.ceil(png / 3)


def decode_image(
    payload: bytes, shape: tuple[int, ...], data_range: tuple[float, float] = (-1.0, 1.0), max_pixels: int = 1024 * 1024
) -> torch.Tensor:
    """PNG/JPEG/... bytes -> a tensor [*shape] in data_range, read in the mode of the shape's channel count
    (grey, grey + alpha, RGB, RGBA: IMAGE_MODES) and resized to fit; ImageDecodeError for a shape no image has."""
    if len(shape) != 3 or shape[0] not in IMAGE_MODES:
        raise ImageDecodeError(
            f"the model's samples are {list(shape)}; an image gives [C, H, W] with C of 1 (grey), 2 (grey + alpha), "
            "3 (RGB) or 4 (RGBA)"
        )
    try:
        with Image.open(io.BytesIO(payload)) as image:
            if image.width * image.height > max_pixels:
                raise ImageDecodeError(f"image is {image.width}x{image.height}; at most {max_pixels} pixels")
            channels, height, width = shape
            mode = IMAGE_MODES[channels]
            converted = image.convert(mode).resize((width, height), Image.Resampling.LANCZOS)
    except ImageDecodeError:
        raise
    except Exception as error:  # Pillow raises many types for broken input
        raise ImageDecodeError(f"not a readable image ({type(error).__name__})") from error
    return _in_range(converted, shape, data_range)


def decode_exact(payload: bytes, shape: tuple[int, ...], data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """PNG/JPEG/... bytes -> a tensor [*shape] in data_range, refused (ImageDecodeError naming both shapes)
    unless the image already has the model's size and channels: a score is of the image sent, so nothing is
    resized or converted (grey is 'L', or 'LA'/'P' without colour; RGB is 'RGB', or 'RGBA'/'P' with opaque
    alpha ignored). An alpha channel is dropped only where every pixel is opaque."""
    return pixels_in_range(torch.from_numpy(exact_pixels(payload, shape).copy()), data_range)


def exact_pixels(payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """`decode_exact`'s image as its 8-bit levels [H, W, C] (uint8, read-only): what a batch of images is stacked
    from before `pixels_in_range` turns all of them into the model's range at once (POST /score)."""
    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(payload)) as image:
            if (image.width, image.height) != (width, height):
                raise ImageDecodeError(
                    f"image is {image.width}x{image.height} pixels ({image.mode}); the model scores "
                    f"{width}x{height} images with {channels} channel{'s' if channels > 1 else ''} (no resizing)"
                )
            image.load()
            pixels = np.asarray(_exact_channels(image, channels, width, height))
    except ImageDecodeError:
        raise
    except Exception as error:  # Pillow raises many types for broken input
        raise ImageDecodeError(f"not a readable image ({type(error).__name__})") from error
    return pixels.reshape(height, width, channels)


def pixels_in_range(pixels: torch.Tensor, data_range: tuple[float, float]) -> torch.Tensor:
    """8-bit levels [..., H, W, C] (uint8) -> floats [..., C, H, W] in data_range, with a stacked batch's strides:
    the same numbers for an image alone as in a batch (elementwise), so a batch costs the few tensor operations one
    image does. (`movedim(...).contiguous()` would keep a grey batch's strides [H W, 1, W, 1], which are also
    channels-last ones: a convolution then took its channels-last path, and scores moved by 1e-5.)"""
    low, high = data_range
    *batch, height, width, channels = pixels.shape
    levels = torch.empty((*batch, channels, height, width), dtype=torch.float32)
    levels.copy_(pixels.movedim(-1, -3))
    return levels / 255.0 * (high - low) + low


def _in_range(image: Image.Image, shape: tuple[int, ...], data_range: tuple[float, float]) -> torch.Tensor:
    """A decoded image of `shape`'s size and channels -> a tensor [C, H, W] with its 8-bit levels in data_range."""
    channels, height, width = shape
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float() / 255.0
    pixels = pixels.reshape(height, width, channels).permute(2, 0, 1)  # [C, H, W] in [0, 1]
    low, high = data_range
    return pixels * (high - low) + low


EIGHT_BIT_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # what decode_exact reads as 8-bit levels, losing nothing


def _exact_channels(image: Image.Image, channels: int, width: int, height: int) -> Image.Image:
    """The image in mode L (channels 1) or RGB (3) when that loses nothing; else ImageDecodeError."""
    wanted = "L" if channels == 1 else "RGB"
    if image.mode == wanted:
        return image
    if image.mode not in EIGHT_BIT_MODES:  # 16-bit grey would be clipped at 255, CMYK converted: not exact
        raise ImageDecodeError(f"image has {image.mode} pixels, not 8-bit levels; send an 8-bit {wanted} image")
    rgba = image.convert("RGBA")
    if rgba.getchannel("A").getextrema() != (255, 255):
        raise ImageDecodeError(f"image has transparent pixels ({image.mode}); send an opaque {wanted} image")
    rgb = rgba.convert("RGB")
    if channels == 3:
        return rgb
    red, green, blue = rgb.split()
    if red.tobytes() != green.tobytes() or red.tobytes() != blue.tobytes():
        raise ImageDecodeError(
            f"image is in colour ({image.mode}); the model scores {width}x{height} greyscale images (1 channel)"
        )
    return red
