"""Seconds and bytes to encode a trajectory GIF (training/runtime/images.py `gif_bytes`, what `format: "gif"`
answers), and how far its decoded pixels are from the frames it was given.

    python bench/gif_speed.py --rows 1x28:64:61 3x128:16:33 3x128:64:33 --before

A row is CxS:N:T: T frames of N chains of C x S x S images, laid out as the server lays them out (`pixel_grid`).
The frames are synthetic trajectories, uniform noise turning into smooth images (four coloured Gaussian blobs a
chain) with Gaussian noise fading out, as Langevin chains from noise look; `--real GIF` adds a row for the frames of
an existing GIF (docs/samples_ebm_noise.gif: an EBM's chains from noise). `--before` adds a row for Pillow's own
encoding of the same frames, an adaptive palette fitted to each colour frame, as `gif_bytes` did before it
shared one palette. MAE: the mean absolute difference of the decoded GIF's 8-bit values from the frames', per
channel, over all frames and over the last one, which the GIF holds (0: exact).
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from training.runtime.images import gif_bytes, pixel_grid


def trajectory(chains: int, channels: int, size: int, frames: int, seed: int = 0) -> list[torch.Tensor]:
    """T frames [N, S, S, C] uint8 of chains moving from uniform noise to smooth images."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    image = torch.zeros(chains, channels, size, size)
    for _ in range(4):
        centre_x, centre_y = torch.rand(2, chains, 1, 1, 1, generator=generator) * 2 - 1
        width = 0.1 + 0.4 * torch.rand(chains, 1, 1, 1, generator=generator)
        colour = torch.rand(chains, channels, 1, 1, generator=generator) * 2 - 1
        image += colour * torch.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / width**2)
    image = image.clamp(-1, 1)  # [N, C, S, S]
    start = torch.rand(chains, channels, size, size, generator=generator) * 2 - 1
    kept = []
    for index in range(frames):
        done = index / max(1, frames - 1)
        noise = 0.3 * (1 - done) ** 2 * torch.randn(chains, channels, size, size, generator=generator)
        state = ((1 - done) * start + done * image + noise).clamp(-1, 1)
        kept.append(((state + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    return kept


def frames_of(path: Path) -> list[Image.Image]:
    with Image.open(path) as animation:
        return [
            frame.convert("L" if animation.mode in ("L", "P") and _grey(frame) else "RGB")
            for frame in ImageSequence.Iterator(animation)
        ]


def _grey(frame: Image.Image) -> bool:
    red, green, blue = frame.convert("RGB").split()
    return red.tobytes() == green.tobytes() == blue.tobytes()


def pillow_adaptive(frames: list[Image.Image]) -> bytes:
    """Pillow's own GIF of the frames: an adaptive palette for each colour frame (gif_bytes before)."""
    buffer = io.BytesIO()
    durations = [80] * (len(frames) - 1) + [1200]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return buffer.getvalue()


def mean_abs_error(body: bytes, frames: list[Image.Image]) -> tuple[float, float]:
    """Mean |decoded - given| over every frame's 8-bit values, and over the last frame's (the one held)."""
    errors = []
    with Image.open(io.BytesIO(body)) as animation:
        decoded = [frame.convert(frames[0].mode) for frame in ImageSequence.Iterator(animation)]
    assert len(decoded) == len(frames), (len(decoded), len(frames))
    for shown, given in zip(decoded, frames, strict=True):
        errors.append(np.abs(np.asarray(shown, dtype=np.int16) - np.asarray(given, dtype=np.int16)).mean())
    return float(np.mean(errors)), float(errors[-1])


def timed(encode: Callable[[list[Image.Image]], bytes], frames: list[Image.Image], repeats: int) -> tuple[float, bytes]:
    best, body = float("inf"), b""
    for _ in range(repeats):
        started = time.perf_counter()
        body = encode(frames)
        best = min(best, time.perf_counter() - started)
    return best, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["1x28:64:61", "3x128:16:33", "3x128:64:33"], help="CxS:N:T")
    parser.add_argument("--real", type=Path, nargs="*", default=[], help="GIFs whose frames are encoded again")
    parser.add_argument("--before", action="store_true", help="also time Pillow's per-frame adaptive palette")
    parser.add_argument("--repeats", type=int, default=1, help="the fastest of this many encodings is printed")
    args = parser.parse_args()
    cases: list[tuple[str, list[Image.Image], float]] = []
    for row in args.rows:
        shape, chains, count = row.split(":")
        channels, size = (int(part) for part in shape.split("x"))
        started = time.perf_counter()
        grids = [pixel_grid(frame) for frame in trajectory(int(chains), channels, size, int(count))]
        cases.append((f"{count} frames x {chains} chains of {channels}x{size}²", grids, time.perf_counter() - started))
    for path in args.real:
        cases.append((f"{path.name}", frames_of(path), 0.0))
    print("| frames | pixels | encoder | seconds | bytes | MAE | last frame's MAE |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, frames, _ in cases:
        width, height = frames[0].size
        pixels = f"{len(frames) * width * height:,} ({frames[0].mode} {width}x{height})"
        encoders = [("gif_bytes", gif_bytes)] + (
            [("Pillow per frame (before)", pillow_adaptive)] if args.before else []
        )
        for label, encode in encoders:
            seconds, body = timed(encode, frames, args.repeats)
            error, last = mean_abs_error(body, frames)
            print(
                f"| {name} | {pixels} | {label} | {seconds:.2f} | {len(body):,} | {error:.2f} | {last:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
