"""Worker results -> response bodies (PNG, GIF, JSON with base64 PNGs); runs off the event loop."""

from __future__ import annotations

import base64
import json
import math

import torch

from service.engine.messages import Frame, SampleResult
from service.http.schemas import SampleResponse, Timings
from training.runtime.images import gif_bytes, grid, pixel_grid, png_bytes


def grid_b64(x: torch.Tensor, data_range: tuple[float, float]) -> str:
    """Images [n, *shape] -> base64 PNG: one image for n = 1, a grid for more."""
    return base64.b64encode(png_bytes(grid(x, data_range))).decode("ascii")


def pixels_b64(pixels: torch.Tensor) -> str:
    """8-bit pixels [n, H, W, C] (a kept trajectory frame) -> base64 PNG, as grid_b64 renders the images."""
    return base64.b64encode(png_bytes(pixel_grid(pixels))).decode("ascii")


def finite_values(values: torch.Tensor, digits: int) -> list[float | None]:
    """Rounded floats for JSON, None where a value is not finite (JSON has no inf or NaN)."""
    return [round(float(value), digits) if math.isfinite(value) else None for value in values.tolist()]


def frame_event(frame: Frame, data_range: tuple[float, float], dropped: int = 0) -> dict:
    """One streamed trajectory frame: the grid at this step, each chain's energy (none at step 0), the chains
    that have stopped (arrived at their tolerance; frozen since), and how many frames before it were dropped
    because the client read slower than they were made."""
    energies = None if frame.energy is None else finite_values(frame.energy, 6)
    known = [value for value in energies or [] if value is not None]
    return {
        "step": frame.step,
        "steps": frame.steps,
        "energy": energies,
        "mean_energy": round(sum(known) / len(known), 6) if known else None,
        "grid": grid_b64(frame.x, data_range),
        "stopped": frame.stopped,
        "dropped": dropped,
    }


def sse(event: str, data: dict) -> str:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def png_body(result: SampleResult, data_range: tuple[float, float]) -> bytes:
    """One image for n = 1, a near-square grid for more."""
    return png_bytes(grid(result.samples, data_range))


def gif_body(result: SampleResult, data_range: tuple[float, float]) -> bytes:
    """The trajectory's frames (kept as 8-bit pixels) as one GIF; the samples alone without one."""
    frames = [pixel_grid(frame) for frame in result.frames] or [grid(result.samples, data_range)]
    return gif_bytes(frames)


def json_body(
    result: SampleResult, data_range: tuple[float, float], model: str, seed: int, total_seconds: float
) -> SampleResponse:
    trajectory = None
    if result.frames:
        trajectory = [[pixels_b64(frame[i : i + 1]) for i in range(len(frame))] for frame in result.frames]
    return SampleResponse(
        model=model,
        seed=seed,
        steps=result.steps,
        chain_steps=result.chain_steps,
        images=[grid_b64(result.samples[i : i + 1], data_range) for i in range(len(result.samples))],
        energy=None if result.energy is None else finite_values(result.energy, 6),
        bits_per_dim=None if result.bits_per_dim is None else finite_values(result.bits_per_dim, 4),
        trajectory=trajectory,
        trajectory_steps=result.frame_steps or None,
        timings=Timings(
            queue_ms=round(result.queue_seconds * 1000, 2),
            run_ms=round(result.run_seconds * 1000, 2),
            total_ms=round(total_seconds * 1000, 2),
        ),
    )
