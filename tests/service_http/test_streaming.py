"""Server-Sent Events and chains started from a client's image, through real HTTP."""

from pathlib import Path

import httpx
import numpy as np
import pytest
from payloads import png_array, png_b64, sse_events
from server import running_server, wait_for

from service.settings import Settings


@pytest.fixture
def server(models_dir: Path, tmp_path: Path):
    settings = Settings(models_dir=models_dir, state_dir=tmp_path / "state", device="cpu", max_steps=50000)
    with running_server(settings) as (base, app):
        yield base, app


def test_stream_sends_each_frame_as_it_is_made_then_the_samples(server) -> None:
    base, _ = server
    body = {"model": "pair", "n": 4, "steps": 12, "trajectory_every": 4, "stream": True, "seed": 3}
    with httpx.stream("POST", f"{base}/sample", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    names = [name for name, _ in events]
    assert names == ["frame"] * 4 + ["done"]
    frames = [data for name, data in events if name == "frame"]
    assert [frame["step"] for frame in frames] == [0, 4, 8, 12]
    assert frames[0]["energy"] is None and len(frames[1]["energy"]) == 4
    assert png_array(frames[0]["grid"]).shape == (62, 62)
    assert not np.array_equal(png_array(frames[0]["grid"]), png_array(frames[-1]["grid"]))
    done = events[-1][1]
    assert done["seed"] == 3 and len(done["images"]) == 4 and len(done["energy"]) == 4
    assert np.array_equal(png_array(done["grid"]), png_array(frames[-1]["grid"]))


def test_accept_header_asks_for_a_stream_too(server) -> None:
    base, _ = server
    with httpx.stream(
        "POST",
        f"{base}/sample",
        json={"model": "solo", "steps": 3},
        headers={"Accept": "text/event-stream"},
        timeout=60,
    ) as response:
        events = sse_events(response.iter_lines())
    assert [name for name, _ in events][-1] == "done"
    assert [data["step"] for name, data in events if name == "frame"] == [0, 1, 2, 3]


def test_a_client_leaving_the_stream_stops_its_chains(server) -> None:
    base, app = server
    pool = app.state.worker.pools["solo"]
    body = {"model": "solo", "n": 2, "steps": 50000, "trajectory_every": 10, "stream": True}
    with httpx.stream("POST", f"{base}/sample", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event: frame"):
                break  # one frame seen; leave
    wait_for(lambda: pool.scheduler.running_chains == 0, 10, "the left stream's chains being dropped")
    assert pool.stats["steps"] < 50000


def test_inpainting_keeps_the_known_pixels_and_fills_the_masked_ones(server) -> None:
    base, _ = server
    digit = np.zeros((28, 28))
    digit[4:24, 12:16] = 255  # a '1'
    mask = np.zeros((28, 28))
    mask[14:, :] = 255  # fill in the lower half
    reply = httpx.post(
        f"{base}/sample",
        json={
            "model": "solo",
            "n": 2,
            "steps": 20,
            "init": "image",
            "image": png_b64(digit),
            "mask": png_b64(mask),
            "format": "json",
            "seed": 1,
        },
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    for encoded in reply.json()["images"]:
        completed = png_array(encoded).astype(int)
        assert np.abs(completed[:14] - digit[:14]).max() <= 1  # kept exactly (up to 8-bit rounding)
        assert np.abs(completed[14:] - digit[14:]).mean() > 10  # the masked half was resampled


def test_denoising_starts_every_chain_from_the_image_and_never_touches_the_buffer(server) -> None:
    base, app = server
    buffer = app.state.worker.pools["solo"].buffer
    before = buffer.samples[: len(buffer)].clone()
    digit = np.zeros((28, 28))
    digit[6:22, 8:20] = 200
    data_url = "data:image/png;base64," + png_b64(digit)
    reply = httpx.post(
        f"{base}/sample",
        json={
            "model": "solo",
            "n": 3,
            "steps": 2,
            "init": "image",
            "image": data_url,
            "format": "json",
            "trajectory_every": 2,
        },
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    start = [png_array(encoded) for encoded in reply.json()["trajectory"][0]]
    assert all(np.abs(frame.astype(int) - digit).max() <= 1 for frame in start)
    assert len(buffer) == len(before) and (buffer.samples[: len(buffer)] == before).all()
