"""Pictures as `training/runtime/images.py` makes them, decoded back with Pillow."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from training.runtime.images import gif_bytes, grid_pixels, pixel_grid


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 64])
def test_grid_pixels_counts_the_pixels_of_the_grid_laid_out(n: int, channels: int) -> None:
    picture = pixel_grid(torch.zeros(n, 7, 5, channels, dtype=torch.uint8))
    assert grid_pixels(n, (channels, 7, 5)) == picture.width * picture.height


def decoded(body: bytes) -> list[np.ndarray]:
    with Image.open(io.BytesIO(body)) as animation:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(animation)]


def test_a_colour_gif_of_few_colours_is_its_frames_exactly_where_they_change_and_where_they_do_not() -> None:
    """One palette for the animation, and pixels unchanged since the frame before written transparent: a viewer
    still shows each frame as it was given, the still parts included."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (12, 3), dtype=np.uint8)
    frames = [colours[rng.integers(0, 12, (40, 30))] for _ in range(6)]  # each [40, 30, 3]
    for frame in frames[1:]:
        frame[:20] = frames[0][:20]  # the top half never moves
    frames.append(frames[-1].copy())  # and the last frame is held as it was
    body = gif_bytes([Image.fromarray(frame) for frame in frames])
    shown = decoded(body)
    assert len(shown) == len(frames) and all(np.array_equal(a, b) for a, b in zip(shown, frames, strict=True))


def test_a_colour_gif_of_many_colours_keeps_each_frame_within_a_few_levels() -> None:
    """Noise fading into a smooth picture, as a chain from noise does, under one palette of 255 colours."""
    rng = np.random.default_rng(1)
    smooth = np.linspace(0, 255, 64)
    base = np.stack([*np.meshgrid(smooth, smooth[::-1], indexing="ij"), np.full((64, 64), 128.0)], -1)  # [64, 64, 3]
    frames = [np.clip(base + rng.normal(0, 40 * (1 - t / 9), base.shape), 0, 255).astype(np.uint8) for t in range(10)]
    shown = decoded(gif_bytes([Image.fromarray(frame) for frame in frames]))
    errors = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(shown, frames, strict=True)]
    # 4,096 colours of a gradient under noise that fades: 11.9 levels off at the noisiest frame, 3.6 at the last
    assert max(errors) < 13 and errors[-1] < 5, errors
