"""A live models directory: files copied in, overwritten, broken or removed while `python -m service` runs are
served, swapped, kept or retired without a restart, and no request that was running notices."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from conftest import write_tiny_ebm, write_tiny_gan
from programs import GAN_SIDECAR, SHAPE, TinyCritic, TinyGenerator, save_program
from server import running_server, serve, wait_for

from service.catalogue.buffer_store import BufferStore
from service.catalogue.model_watch import ModelRepository
from service.catalogue.served_models import ServedModels
from service.engine.messages import SampleResult, WorkerFailure
from service.engine.worker import Worker
from service.http.orders import make_order
from service.http.render import grid_b64
from service.http.schemas import SampleRequest
from service.metrics import Metrics
from service.settings import Settings
from training.families import draw_samples
from training.runtime.checkpoint import atomic_write_bytes
from training.runtime.device import sampling_dtype
from training.runtime.load import load_model
from training.sampling.noise import chain_seeds

REPO = Path(__file__).resolve().parents[2]
KEY = {"Authorization": "Bearer secret"}
WATCH_INTERVAL_S = 0.25
SWAP_DEADLINE_S = 30  # generous: the target is 2 watch intervals, but CI shares its cores


def version_of(path: Path, *bundled: Path) -> str:
    """The version the server serves a file as: its SHA-256 prefix; a program's covers its sidecar and
    companions too, in that order."""
    return hashlib.sha256(b"".join(part.read_bytes() for part in (path, *bundled))).hexdigest()[:12]


class NaNCritic(TinyCritic):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * torch.nan


@dataclass
class Server:
    base: str
    models: Path
    process: subprocess.Popen

    def models_now(self) -> dict[str, dict]:
        return {model["name"]: model for model in httpx.get(f"{self.base}/models", timeout=10).json()}

    def refused(self) -> dict[str, str]:
        return httpx.get(f"{self.base}/readyz", timeout=10).json()["refused"]

    def scans(self) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        return float(re.search(r"^samplebay_model_scans_total (\S+)$", text, re.MULTILINE).group(1))

    def sample(self, model: str, **fields) -> httpx.Response:
        return httpx.post(f"{self.base}/sample", json={"model": model, **fields}, headers=KEY, timeout=120)

    def wait_for_version(self, model: str, version: str | None) -> None:
        """Until /models lists `model` at `version` (None: no longer lists it)."""
        wait_for(
            lambda: (
                self.models_now().get(model, {}).get("version") == version
                if version
                else model not in self.models_now()
            ),
            SWAP_DEADLINE_S,
            f"/models listing {model} at version {version}",
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models = tmp_path_factory.mktemp("models")
    write_tiny_ebm(models / "solo.safetensors", seed=0)
    write_tiny_gan(models / "keeper.safetensors", seed=0)
    write_tiny_ebm(models / "leaving.safetensors", seed=4)
    flags = ["--api-key", "secret", "--watch-interval-s", str(WATCH_INTERVAL_S)]
    log_path = tmp_path_factory.mktemp("log") / "server.log"
    with serve(models, tmp_path_factory.mktemp("state"), log_path, *flags, ready_within_s=90) as process:
        yield Server(process.base, models, process.process)


@dataclass
class StreamReader:
    """A stream read on a thread of its own, each event noted with the time it arrived."""

    server: Server
    body: dict
    status: int | None = None
    version: str | None = None
    events: list[tuple[float, str, dict]] = field(default_factory=list)
    first_frame: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> StreamReader:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        body = {**self.body, "stream": True}
        with httpx.stream("POST", f"{self.server.base}/sample", json=body, headers=KEY, timeout=120) as response:
            self.status, self.version = response.status_code, response.headers.get("x-model-version")
            name = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name:
                    self.events.append((time.monotonic(), name, json.loads(line[6:])))
                    if name == "frame":
                        self.first_frame.set()
        self.first_frame.set()  # an answer without frames must not leave the test waiting

    @property
    def finished(self) -> bool:
        return any(name in ("done", "error") for _, name, _ in self.events)

    def join(self) -> list[tuple[float, str, dict]]:
        assert self.thread is not None
        self.thread.join(timeout=120)
        return self.events


def test_a_checkpoint_copied_in_appears_and_serves(server: Server, tmp_path: Path) -> None:
    source = write_tiny_ebm(tmp_path / "fresh.safetensors", seed=5)
    shutil.copy2(source, server.models / "fresh.safetensors")  # written in place, then its times restored
    server.wait_for_version("fresh", version_of(source))
    listed = server.models_now()["fresh"]
    assert listed["loaded_at"] and listed["family"] == "ebm"
    reply = server.sample("fresh", steps=2)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-model-version"] == version_of(source)
    metrics = httpx.get(f"{server.base}/metrics", timeout=10).text
    assert f'samplebay_model_loaded_timestamp_seconds{{model="fresh",version="{version_of(source)}"}}' in metrics


def test_a_checkpoint_overwritten_mid_stream_finishes_the_stream_on_its_old_version(
    server: Server, tmp_path: Path
) -> None:
    old_copy = tmp_path / "solo.safetensors"
    shutil.copy2(server.models / "solo.safetensors", old_copy)
    old = version_of(old_copy)
    assert server.models_now()["solo"]["version"] == old
    next_epoch = write_tiny_ebm(tmp_path / "next.safetensors", seed=9)
    new = version_of(next_epoch)
    body = {"model": "solo", "n": 32, "steps": 160, "seed": 5, "init": "noise", "trajectory_every": 4}
    reader = StreamReader(server, body).start()
    assert reader.first_frame.wait(60) and reader.status == 200

    os.replace(next_epoch, server.models / "solo.safetensors")  # renamed into place, as training saves
    assert httpx.post(f"{server.base}/models/reload", headers=KEY, timeout=60).status_code == 200  # no poll wait
    server.wait_for_version("solo", new)
    swapped_at = time.monotonic()
    assert not reader.finished, "the stream ended before the new version was served: give it more steps"
    after = server.sample("solo", steps=2)
    assert after.status_code == 200 and after.headers["x-model-version"] == new

    events = reader.join()
    assert reader.version == old
    assert [name for _, name, _ in events][-1] == "done"
    assert any(at > swapped_at for at, name, _ in events if name == "frame")  # it ran on across the swap
    old_model = load_model(old_copy)  # on the old weights from its first step to its last, as the CLI draws them
    dtype = sampling_dtype("auto", torch.device("cpu"))  # the server's --sampling-dtype, its default
    expected = draw_samples(old_model, chain_seeds(5, 32)[:1], steps=160, init="noise", dtype=dtype)  # first chain
    assert events[-1][2]["images"][0] == grid_b64(expected, old_model.data_range)


def test_a_half_written_file_is_never_read(server: Server, tmp_path: Path) -> None:
    payload = write_tiny_ebm(tmp_path / "slow.safetensors", seed=6).read_bytes()
    target = server.models / "slow.safetensors"
    scanned_enough = threading.Event()

    def write_slowly() -> None:  # in place, a little at a time, as a slow copy over the network would
        with target.open("wb") as handle:
            written = 0
            while not scanned_enough.is_set() and written < len(payload) - 1:
                handle.write(payload[written : written + 64])
                handle.flush()
                written += 64
                time.sleep(0.01)  # the writer's pace: many writes between two scans
            handle.write(payload[written:])

    start = server.scans()
    writer = threading.Thread(target=write_slowly)
    writer.start()
    try:
        while server.scans() < start + 3:  # three scans saw it change: none may read it
            assert "slow.safetensors" not in server.refused() and "slow" not in server.models_now()
            assert writer.is_alive(), "the payload was written whole before three scans: make it larger"
            time.sleep(0.05)  # polling /metrics, as a deadline loop does
    finally:
        scanned_enough.set()
        writer.join()
    server.wait_for_version("slow", version_of(target))
    assert "slow.safetensors" not in server.refused()


def test_a_broken_replacement_keeps_the_old_version_serving(server: Server, tmp_path: Path) -> None:
    kept = server.models_now()["keeper"]["version"]
    atomic_write_bytes(server.models / "keeper.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    wait_for(lambda: "keeper.safetensors" in server.refused(), SWAP_DEADLINE_S, "/readyz naming the broken file")
    reason = server.refused()["keeper.safetensors"]
    assert "JSON" in reason and f"version {kept}" in reason and "still serves" in reason
    assert server.models_now()["keeper"]["version"] == kept
    reply = server.sample("keeper", n=2)
    assert reply.status_code == 200 and reply.headers["x-model-version"] == kept

    write_tiny_gan(server.models / "keeper.safetensors", seed=3)  # fixed: the new version is served
    server.wait_for_version("keeper", version_of(server.models / "keeper.safetensors"))
    assert "keeper.safetensors" not in server.refused()


def test_a_removed_model_ends_with_404_for_new_requests_only(server: Server) -> None:
    reader = StreamReader(server, {"model": "leaving", "n": 32, "steps": 120, "trajectory_every": 4}).start()
    assert reader.first_frame.wait(60) and reader.status == 200
    (server.models / "leaving.safetensors").unlink()
    assert httpx.post(f"{server.base}/models/reload", headers=KEY, timeout=60).status_code == 200
    server.wait_for_version("leaving", None)
    assert not reader.finished, "the stream ended before the model was removed: give it more steps"
    gone = server.sample("leaving", steps=2)
    assert gone.status_code == 404 and "unknown model 'leaving'" in gone.json()["detail"]
    events = reader.join()
    assert [name for _, name, _ in events][-1] == "done" and len(events[-1][2]["images"]) == 32


def test_with_no_polling_an_operator_reloads_and_ensembles_regroup(models_dir: Path, tmp_path: Path) -> None:
    """--watch-interval-s 0: nothing changes until POST /models/reload (key-protected), which answers once the
    new versions serve. A member replaced regroups its ensemble: a new buffer group digest, whose buffer starts
    from the checkpoints, while the old group's buffer stays on disk under its own digest."""
    state = tmp_path / "state"
    settings = Settings(models_dir=models_dir, state_dir=state, device="cpu", api_key="secret", watch_interval_s=0)
    with running_server(settings) as (base, app):
        before = {model["name"]: model["version"] for model in httpx.get(f"{base}/models").json()}
        reply = httpx.post(f"{base}/sample", json={"model": "pair", "n": 8, "steps": 10, "init": "noise"}, headers=KEY)
        assert reply.status_code == 200 and reply.headers["x-model-version"] == before["pair"]
        old_digest = app.state.served.registry.groups["pair"].digest

        write_tiny_ebm(models_dir / "pair_b.safetensors", seed=7, ensemble="pair")
        (models_dir / "solo.safetensors").unlink()
        assert {model["name"] for model in httpx.get(f"{base}/models").json()} == set(before)  # not polled
        assert httpx.post(f"{base}/models/reload").status_code == 401
        report = httpx.post(f"{base}/models/reload", headers=KEY, timeout=60).json()
        assert report["replaced"] == ["pair_b"] and report["removed"] == ["solo"] and report["applied"]
        after = {model["name"]: model["version"] for model in httpx.get(f"{base}/models").json()}
        assert set(after) == {"pair", "pair_a", "pair_b"} and report["versions"] == after
        assert after["pair_a"] == before["pair_a"]  # its file did not change
        assert after["pair_b"] == version_of(models_dir / "pair_b.safetensors") != before["pair_b"]
        assert after["pair"] != before["pair"]  # the ensemble regrouped
        request = {"model": "pair", "n": 2, "steps": 2, "init": "noise"}  # too short to go back into the buffer
        reply = httpx.post(f"{base}/sample", json=request, headers=KEY)
        assert reply.status_code == 200 and reply.headers["x-model-version"] == after["pair"]
        assert httpx.post(f"{base}/sample", json={"model": "solo"}, headers=KEY).status_code == 404
        new_digest = app.state.served.registry.groups["pair"].digest
        assert httpx.post(f"{base}/models/reload", headers=KEY).json()["replaced"] == []  # nothing changed
    assert (state / f"buffer-pair-{old_digest[:16]}.safetensors").is_file()  # the old version's chains kept
    assert not (state / f"buffer-pair-{new_digest[:16]}.safetensors").exists()  # it wrote none back


def test_a_replaced_version_finishes_its_requests_and_is_dropped_once_nobody_holds_it(tmp_path: Path) -> None:
    """The worker round by round, no threads: the swap happens between steps, an admitted request ends on its
    version, a request that leased the old version before the swap still reaches it, and then it goes."""
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_ebm(models / "solo.safetensors", seed=0)
    repository = ModelRepository(models, torch.device("cpu"), 1 << 30, 60)
    repository.scan(everything=True)
    served = ServedModels(repository.registry())
    worker = Worker(
        served.registry, BufferStore(tmp_path / "state"), torch.device("cpu"), Metrics(), 64, 16, 1e9, 0, served=served
    )

    def submit(model, steps: int) -> list:
        order = asyncio.run(make_order(SampleRequest(model="solo", steps=steps), model, Settings(), streaming=False))
        answers: list = []
        worker.submit(order, answers.append, deadline=1e9)
        return answers

    with served.lease("solo") as old:
        running = submit(old, steps=3)
        worker.run_once()  # admitted, one step taken
        write_tiny_ebm(models / "solo.safetensors", seed=1)
        assert repository.scan().replaced == ["solo"]
        swapped = worker.replace_registry(repository.registry())
        assert not swapped.is_set() and served.registry.models["solo"] is old  # not before the worker's next round
        worker.run_once()  # swapped in, then the old version's second step
        assert swapped.is_set() and served.registry.models["solo"].version != old.version
        late = submit(old, steps=1)  # leased the old version before the swap, submitted after it
        with served.lease("solo") as new:
            fresh = submit(new, steps=1)
            worker.run_once()
        assert all(len(answers) == 1 and isinstance(answers[0], SampleResult) for answers in (running, late, fresh))
        worker.run_once()
        retired = [pool for _, pool in worker._pools.retired]  # its chains' pool and its inputs' score pool
        assert len(retired) == 2 and {pool.name for pool in retired} == {"solo", "solo:score"}  # still held
    worker.run_once()
    assert worker._pools.retired == []  # answered and no longer held: dropped
    with pytest.raises(WorkerFailure, match="no longer served"):
        submit(old, steps=1)  # an order made for it without a lease comes too late: a 503 to retry


def test_a_critic_beside_a_served_generator_swaps_in_and_out_with_it_as_one_bundle(
    server: Server, tmp_path: Path
) -> None:
    """NAME.critic.pt2 added beside a served NAME.pt2 is a new version of the bundle (DDLS now applies); a bad one
    is refused with its reason while the version before serves on; removed, the generator serves alone again."""
    z, x = torch.zeros(2, 4), torch.zeros(2, *SHAPE)
    program = save_program(TinyGenerator(), (z,), tmp_path / "duo.pt2", GAN_SIDECAR)
    good = save_program(TinyCritic(), (x,), tmp_path / "good.critic.pt2", None)
    bad = save_program(NaNCritic(), (x,), tmp_path / "bad.critic.pt2", None)
    sidecar, critic = tmp_path / "duo.json", server.models / "duo.critic.pt2"
    for source in (sidecar, program):  # the sidecar first, renamed into place, as export writes them
        shutil.copy(source, tmp_path / "staged")
        os.replace(tmp_path / "staged", server.models / source.name)
    alone = version_of(program, sidecar)
    server.wait_for_version("duo", alone)
    assert not server.models_now()["duo"]["latent_langevin"]
    assert server.sample("duo", steps=3).status_code == 422  # no critic: no DDLS

    shutil.copy(good, tmp_path / "staged")
    os.replace(tmp_path / "staged", critic)
    judged = version_of(program, sidecar, good)
    server.wait_for_version("duo", judged)
    assert server.models_now()["duo"]["latent_langevin"]
    reply = server.sample("duo", n=2, seed=3, format="json")  # DDLS by default, as the sidecar says
    assert reply.status_code == 200 and reply.json()["steps"] == 5 and reply.headers["x-model-version"] == judged

    shutil.copy(bad, tmp_path / "staged")
    os.replace(tmp_path / "staged", critic)
    wait_for(lambda: "duo.pt2" in server.refused(), SWAP_DEADLINE_S, "/readyz naming the bundle with a bad critic")
    reason = server.refused()["duo.pt2"]
    assert "duo.critic.pt2: the critic's output is not finite" in reason and f"version {judged}" in reason
    assert server.models_now()["duo"]["version"] == judged  # the version before serves on
    again = server.sample("duo", n=2, seed=3, format="json")
    assert again.status_code == 200 and again.json()["images"] == reply.json()["images"]

    critic.unlink()
    server.wait_for_version("duo", alone)
    assert "duo.pt2" not in server.refused() and not server.models_now()["duo"]["latent_langevin"]
    assert server.sample("duo", n=2, seed=3).status_code == 200
