"""service.client against the real app under uvicorn (sync and async), and its retries against a fake transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import aclosing

import httpx
import numpy as np
import pytest
from conftest import write_tiny_ebm, write_tiny_eqm
from fastapi import FastAPI
from payloads import png_b64
from server import free_port, running_server, wait_for

from service.client import (
    AsyncClient,
    BadRequest,
    Client,
    ConnectionFailed,
    Frame,
    NotFound,
    SamplebayError,
    Samples,
    ServerBusy,
    StreamInterrupted,
    Timeout,
    Unauthorized,
)
from service.settings import Settings

KEY = "client-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FastAPI]]:
    """One server for the module, with an API key: an EBM with a replay buffer ('solo') and a
    class-conditional EqM energy ('digits')."""
    root = tmp_path_factory.mktemp("client")
    models = root / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors", seed=0)
    write_tiny_eqm(models / "digits.safetensors", seed=1, conditional=True)
    settings = Settings(
        models_dir=models, state_dir=root / "state", device="cpu", api_key=KEY, max_n=16, max_steps=50000
    )
    with running_server(settings) as running:
        yield running


@pytest.fixture
def client(server: tuple[str, FastAPI]) -> Iterator[Client]:
    with Client(server[0], api_key=KEY) as client:
        yield client


def test_models_are_typed_infos(client: Client) -> None:
    models = {model.name: model for model in client.models()}
    assert set(models) == {"solo", "digits"}
    solo, digits = models["solo"], models["digits"]
    assert solo.family == "ebm" and solo.shape == (1, 28, 28) and solo.data_range == (-1.0, 1.0)
    assert solo.sampler["steps"] == 10 and solo.limits["max_n"] == 16
    assert solo.buffer_size == 32 and solo.classes is None
    assert digits.classes == [str(digit) for digit in range(10)] and digits.buffer_size is None
    assert solo.version and solo.loaded_at is not None and solo.loaded_at.tzinfo is not None


def test_answers_name_the_model_version_and_the_steps_each_stopped_chain_ran(client: Client) -> None:
    version = {model.name: model.version for model in client.models()}["solo"]
    samples = client.sample("solo", n=3, steps=6, init="noise", seed=2, tolerance=10.0)  # every chain stops at once
    assert samples.model_version == version and samples.chain_steps == [1, 1, 1]
    assert client.sample("solo", n=2, steps=3, init="noise").chain_steps in (None, [3, 3])
    assert client.sample_file("solo", n=2, steps=3, init="noise").model_version == version


def test_sample_decodes_each_image_to_the_models_shape_with_seed_and_energies(client: Client) -> None:
    samples = client.sample("solo", n=3, steps=4, init="noise", seed=7, trajectory_every=2)
    assert samples.model == "solo" and samples.seed == 7 and samples.steps == 4
    pixels = samples.array()
    assert pixels.shape == (3, 28, 28) and pixels.dtype == np.uint8
    assert samples.energy is not None and len(samples.energy) == 3
    assert samples.trajectory_steps == [0, 2, 4]
    assert samples.trajectory is not None and [len(frame) for frame in samples.trajectory] == [3, 3, 3]
    assert samples.timings is not None and samples.timings.total_ms >= samples.timings.run_ms


def test_a_seed_reproduces_the_images_and_the_grid_is_the_servers(client: Client) -> None:
    first = client.sample("solo", n=4, steps=3, init="noise", seed=11)
    again = client.sample("solo", n=4, steps=3, init="noise", seed=11)
    other = client.sample("solo", n=4, steps=3, init="noise", seed=12)
    assert np.array_equal(first.array(), again.array())
    assert not np.array_equal(first.array(), other.array())
    png = client.sample_file("solo", "png", n=4, steps=3, init="noise", seed=11)
    assert png.seed == 11 and png.steps == 3 and png.media_type == "image/png"
    assert np.array_equal(np.asarray(png.image()), np.asarray(first.grid()))


def test_a_label_draws_that_class_and_one_out_of_range_is_a_bad_request(client: Client) -> None:
    labelled = client.sample("digits", n=2, label=3, seed=5)
    assert labelled.array().shape == (2, 28, 28)
    with pytest.raises(BadRequest) as raised:
        client.sample("digits", label=10)
    assert raised.value.status == 422 and "label" in raised.value.detail


def test_an_image_array_starts_the_chains(client: Client) -> None:
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 8:20] = 200
    samples = client.sample("solo", n=2, steps=2, init="image", image=digit, trajectory_every=2)
    assert samples.trajectory is not None
    assert all(np.abs(np.asarray(start, dtype=int) - digit).max() <= 1 for start in samples.trajectory[0])
    with pytest.raises(TypeError, match="uint8"):
        client.sample("solo", init="image", image=digit.astype(float))


def test_stream_yields_each_frame_then_the_samples(client: Client) -> None:
    events = list(client.stream("solo", n=4, steps=12, trajectory_every=4, seed=3))
    frames, done = events[:-1], events[-1]
    assert all(isinstance(frame, Frame) for frame in frames) and isinstance(done, Samples)
    assert [frame.step for frame in frames if isinstance(frame, Frame)] == [0, 4, 8, 12]
    assert done.seed == 3 and done.array().shape == (4, 28, 28) and done.energy is not None
    last = frames[-1]
    assert isinstance(last, Frame) and np.array_equal(np.asarray(last.grid), np.asarray(done.grid()))


def test_stream_gives_each_frame_as_it_comes_and_leaving_stops_the_chains(
    client: Client, server: tuple[str, FastAPI]
) -> None:
    pool = server[1].state.worker.pools["solo"]
    events = client.stream("solo", n=2, steps=50000, trajectory_every=1000)
    first = next(events)  # long before the chains could have finished
    assert isinstance(first, Frame) and first.step == 0 and first.steps == 50000
    events.close()
    wait_for(lambda: pool.scheduler.running_chains == 0, 10, "the chains of the left stream stopping")
    assert pool.stats["steps"] < 50000


def test_errors_carry_the_servers_status_and_message(server: tuple[str, FastAPI], client: Client) -> None:
    with pytest.raises(NotFound) as missing:
        client.sample("nope")
    assert missing.value.status == 404
    assert missing.value.detail == "unknown model 'nope'; served models: digits, solo"
    with pytest.raises(NotFound):
        next(client.stream("nope"))
    with pytest.raises(BadRequest) as bad:
        client.sample("solo", steps=-1)
    assert bad.value.status == 422 and [problem.field for problem in bad.value.errors] == ["steps"]
    for key in ("wrong", None):
        with Client(server[0], api_key=key) as stranger:
            with pytest.raises(Unauthorized) as refused:
                stranger.sample("solo")
            assert refused.value.status == 401 and "API key" in refused.value.detail
            assert len(stranger.models()) == 2  # /models stays open


def test_nothing_listening_is_a_connection_error() -> None:
    with Client(f"http://127.0.0.1:{free_port()}") as client, pytest.raises(ConnectionFailed, match="could not reach"):
        client.models()


def test_the_async_client_samples_streams_and_raises_the_same(server: tuple[str, FastAPI]) -> None:
    async def scenario() -> None:
        async with AsyncClient(server[0], api_key=KEY) as client:
            assert {model.name for model in await client.models()} == {"solo", "digits"}
            samples = await client.sample("solo", n=2, steps=3, init="noise", seed=4)
            again = await client.sample("solo", n=2, steps=3, init="noise", seed=4)
            assert samples.array().shape == (2, 28, 28) and np.array_equal(samples.array(), again.array())
            gif = await client.sample_file("solo", "gif", n=2, steps=4, trajectory_every=2)
            assert gif.media_type == "image/gif" and gif.content.startswith(b"GIF")
            async with aclosing(client.stream("solo", n=2, steps=6, trajectory_every=3)) as events:
                names = [type(event).__name__ async for event in events]
            assert names == ["Frame", "Frame", "Frame", "Samples"]
            with pytest.raises(NotFound, match="served models: digits, solo"):
                await client.sample("nope")
            with pytest.raises(BadRequest):
                async with aclosing(client.stream("solo", momentum=2.0)) as events:
                    _ = [event async for event in events]

    asyncio.run(scenario())


# --- retries and transport failures, on a fake transport and a fake clock -----------------------------------

MODELS = [
    {
        "name": "m",
        "family": "flow",
        "members": ["m"],
        "shape": [1, 2, 2],
        "data_range": [-1, 1],
        "dataset": None,
        "ensemble": None,
        "sampler": {},
        "limits": {},
        "metrics": {},
        "replicas": 3,  # a field this client does not know yet
    }
]


def busy_then(answers: list[httpx.Response]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport that gives `answers` in order (the last one again when they run out), and the requests it saw."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[min(len(seen), len(answers)) - 1]

    return httpx.MockTransport(answer), seen


def busy(retry_after: str | None = "2") -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return httpx.Response(503, json={"detail": "server busy: queue full; retry shortly"}, headers=headers)


def test_a_503_is_retried_after_its_retry_after_with_the_key() -> None:
    transport, seen = busy_then([busy("2"), busy("1"), httpx.Response(200, json=MODELS)])
    waits: list[float] = []
    with Client("http://fake", api_key="k", transport=transport, sleep=waits.append) as client:
        models = client.models()
    assert waits == [2.0, 1.0] and len(seen) == 3
    assert all(request.headers["authorization"] == "Bearer k" for request in seen)
    assert models[0].name == "m" and models[0].shape == (1, 2, 2) and models[0].extra == {"replicas": 3}


def test_retries_are_bounded_and_end_in_server_busy() -> None:
    transport, seen = busy_then([busy("1")])
    waits: list[float] = []
    client = Client("http://fake", transport=transport, retries=2, sleep=waits.append)
    with client, pytest.raises(ServerBusy) as raised:
        client.sample("m")
    assert waits == [1.0, 1.0] and len(seen) == 3
    assert raised.value.status == 503 and raised.value.retry_after == 1.0
    assert raised.value.detail == "server busy: queue full; retry shortly"


def test_a_wait_over_the_maximum_is_not_waited_and_no_retry_after_backs_off() -> None:
    transport, seen = busy_then([busy("120")])
    waits: list[float] = []
    client = Client("http://fake", transport=transport, max_retry_wait_s=30, sleep=waits.append)
    with client, pytest.raises(ServerBusy) as raised:
        client.models()
    assert waits == [] and len(seen) == 1 and raised.value.retry_after == 120.0
    transport, seen = busy_then([busy(None)])
    client = Client("http://fake", transport=transport, retries=3, sleep=waits.append)
    with client, pytest.raises(ServerBusy):
        client.models()
    assert waits == [0.5, 1.0, 2.0]


def test_a_stream_is_retried_before_it_starts_and_a_cut_stream_is_an_error() -> None:
    frame = {"step": 0, "steps": 1, "energy": None, "mean_energy": None, "grid": png_b64(np.zeros((2, 2), np.uint8))}
    cut = f"event: frame\ndata: {json.dumps(frame)}\n\n: a comment\n"
    transport, seen = busy_then(
        [busy("1"), httpx.Response(200, text=cut, headers={"content-type": "text/event-stream"})]
    )
    waits: list[float] = []
    with Client("http://fake", transport=transport, sleep=waits.append) as client:
        events = client.stream("m")
        assert isinstance(next(events), Frame)
        with pytest.raises(StreamInterrupted):
            next(events)
    assert waits == [1.0] and json.loads(seen[-1].content)["stream"] is True
    assert seen[-1].headers["accept"] == "text/event-stream"


def test_an_error_event_raises_its_status() -> None:
    error = 'event: error\ndata: {"status": 504, "detail": "the request\'s deadline passed"}\n\n'
    transport, _ = busy_then([httpx.Response(200, text=error, headers={"content-type": "text/event-stream"})])
    with Client("http://fake", transport=transport) as client, pytest.raises(Timeout) as raised:
        list(client.stream("m"))
    assert raised.value.status == 504 and "deadline" in raised.value.detail


def test_the_async_client_retries_with_its_own_sleep() -> None:
    transport, seen = busy_then([busy("3"), httpx.Response(200, json=MODELS)])
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    async def scenario() -> None:
        async with AsyncClient("http://fake", transport=transport, sleep=fake_sleep) as client:
            assert [model.name for model in await client.models()] == ["m"]

    asyncio.run(scenario())
    assert waits == [3.0] and len(seen) == 2


def test_a_client_timeout_is_a_timeout_error() -> None:
    def too_slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with Client("http://fake", transport=httpx.MockTransport(too_slow)) as client, pytest.raises(Timeout) as raised:
        client.models()
    assert raised.value.status is None


def test_an_answer_that_is_not_the_servers_is_named_not_a_crash() -> None:
    page = "<html>502 Bad Gateway</html>" + " " * 10_000
    transport, _ = busy_then([httpx.Response(502, text=page)])
    with Client("http://fake", transport=transport) as client, pytest.raises(SamplebayError) as gateway:
        client.sample("m")
    assert gateway.value.status == 502 and gateway.value.detail == "<html>502 Bad Gateway</html>"
    transport, _ = busy_then([httpx.Response(200, json={"not": "a list"})])
    with Client("http://fake", transport=transport) as client, pytest.raises(SamplebayError, match="unexpected"):
        client.models()
