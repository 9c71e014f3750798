"""The shared replay buffer survives restarts, never loads stale or broken state, and is never torn."""

from pathlib import Path

import httpx
import torch
from conftest import write_tiny_ebm
from server import running_server

from service.catalogue.buffer_store import BufferStore
from service.settings import Settings
from training.sampling.replay_buffer import ReplayBuffer


def settings_for(models_dir: Path, state_dir: Path) -> Settings:
    return Settings(models_dir=models_dir, state_dir=state_dir, device="cpu", buffer_save_interval_s=3600)


def buffer_files(state_dir: Path, group: str) -> list[Path]:
    return sorted(state_dir.glob(f"buffer-{group}-*.safetensors"))


def test_buffer_is_saved_at_shutdown_and_restored_on_restart(models_dir: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with running_server(settings_for(models_dir, state_dir)) as (base, app):
        reply = httpx.post(f"{base}/sample", json={"model": "solo", "n": 8, "steps": 3, "init": "noise"})
        assert reply.status_code == 200
        before = app.state.worker.pools["solo"].buffer
        assert len(before) == 32  # fresh chains ran fewer than the checkpoint's 10 steps: not written back
        httpx.post(f"{base}/sample", json={"model": "solo", "n": 8, "steps": 10, "init": "noise"})
        assert len(before) == 40
        saved_samples = before.samples[:40].clone()
    files = buffer_files(state_dir, "solo")
    assert len(files) == 1
    with running_server(settings_for(models_dir, state_dir)) as (base, app):
        restored = app.state.worker.pools["solo"].buffer
        assert len(restored) == 40 and torch.equal(restored.samples[:40], saved_samples)
        solo = next(model for model in httpx.get(f"{base}/models").json() if model["name"] == "solo")
        assert solo["buffer_size"] == 40 and solo["buffer_saved_at"] is not None


def test_ensemble_members_share_one_buffer(models_dir: Path, tmp_path: Path) -> None:
    with running_server(settings_for(models_dir, tmp_path / "state")) as (base, app):
        shared = app.state.worker.pools["pair"].buffer
        for model in ("pair", "pair_a", "pair_b"):
            reply = httpx.post(f"{base}/sample", json={"model": model, "n": 2, "steps": 10, "init": "noise"})
            assert reply.status_code == 200
        assert len(shared) == 64  # the members' 32 + 32 saved samples pooled; the buffer is full
        assert shared.next_replace == 6  # so each of the 6 finished chains replaced one of the oldest
        assert set(app.state.worker.langevin_pools) == {"solo", "pair"}  # score pools beside them hold no buffer


def test_corrupt_buffer_file_is_moved_aside_and_the_server_starts(models_dir: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with running_server(settings_for(models_dir, state_dir)) as (base, _):
        httpx.post(f"{base}/sample", json={"model": "solo", "n": 4, "steps": 10, "init": "noise"})
    (saved,) = buffer_files(state_dir, "solo")
    saved.write_bytes(saved.read_bytes()[:100])  # as a crash in the middle of a non-atomic write would
    with running_server(settings_for(models_dir, state_dir)) as (base, app):
        assert len(app.state.worker.pools["solo"].buffer) == 32  # back to the checkpoint's buffer
        assert httpx.post(f"{base}/sample", json={"model": "solo", "init": "buffer"}).status_code == 200
    assert len(list(state_dir.glob("buffer-solo-*.corrupt-*"))) == 1


def test_a_retrained_checkpoint_never_inherits_the_old_buffer(models_dir: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with running_server(settings_for(models_dir, state_dir)) as (base, _):
        httpx.post(f"{base}/sample", json={"model": "solo", "n": 4, "steps": 10, "init": "noise"})
    write_tiny_ebm(models_dir / "solo.safetensors", seed=99)  # new weights, same name
    with running_server(settings_for(models_dir, state_dir)) as (_, app):
        assert len(app.state.worker.pools["solo"].buffer) == 32
    assert len(buffer_files(state_dir, "solo")) == 1  # the new key was never saved: nothing changed


def test_a_crash_while_saving_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch) -> None:
    store = BufferStore(tmp_path)
    buffer = ReplayBuffer((2,), capacity=8)
    buffer.write_back(torch.full((3,), -1), torch.ones(3, 2))
    store.save("g", "abc", buffer)
    original = store.path("g", "abc").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated crash before the rename)")

    monkeypatch.setattr("os.replace", crash)
    buffer.write_back(torch.full((3,), -1), torch.zeros(3, 2))
    assert store.save("g", "abc", buffer) is False  # reported, not raised: the server goes on sampling
    assert store.path("g", "abc").read_bytes() == original
    assert [path.name for path in tmp_path.iterdir()] == [store.path("g", "abc").name]
    assert len(BufferStore(tmp_path).load("g", "abc", (2,))) == 3


def test_chains_run_with_non_default_settings_never_enter_the_shared_buffer(models_dir: Path, tmp_path: Path) -> None:
    with running_server(settings_for(models_dir, tmp_path / "state")) as (base, app):
        buffer = app.state.worker.pools["solo"].buffer
        before = buffer.samples[: len(buffer)].clone()
        for odd in ({"step_size": 1000.0}, {"temperature": 0.001}, {"noise": 0.5}):
            reply = httpx.post(f"{base}/sample", json={"model": "solo", "n": 4, "init": "buffer", **odd})
            assert reply.status_code == 200
        assert len(buffer) == 32 and torch.equal(buffer.samples[:32], before)
        assert not buffer.in_use.any()


def filled_buffer(value: float, size: int, capacity: int, label: int) -> ReplayBuffer:
    buffer = ReplayBuffer((1, 2, 2), capacity=capacity)
    buffer.write_back(torch.full((size,), -1), torch.full((size, 1, 2, 2), value), torch.full((size,), label))
    return buffer


def test_shards_of_one_group_are_pooled_at_start_thinned_to_the_capacity(tmp_path: Path) -> None:
    """Each replica saves its own shard; any server of the group starts from all of them, never larger."""
    digest = "ab" * 32
    BufferStore(tmp_path, shard="replica0").save("pair", digest, filled_buffer(0.5, 40, 64, label=1))
    BufferStore(tmp_path, shard="replica1").save("pair", digest, filled_buffer(-0.5, 40, 64, label=2))
    BufferStore(tmp_path).save("pair", digest, filled_buffer(0.0, 8, 32, label=3))  # a single server's file
    BufferStore(tmp_path, shard="replica0").save("pair", "cd" * 32, filled_buffer(0.9, 8, 64, label=4))  # other digest
    names = [path.name for path in buffer_files(tmp_path, "pair")]
    assert f"buffer-pair-{digest[:16]}-replica0.safetensors" in names
    assert f"buffer-pair-{digest[:16]}.safetensors" in names

    pooled = BufferStore(tmp_path, shard="replica1").load("pair", digest, (1, 2, 2))
    assert pooled is not None
    assert (pooled.capacity, len(pooled)) == (64, 64)  # 88 saved slots thinned evenly to the largest capacity
    values = pooled.samples[: len(pooled), 0, 0, 0]
    assert set(values.tolist()) == {0.5, -0.5, 0.0}  # every file of this digest contributes, the other none
    assert torch.equal(
        pooled.labels[: len(pooled)][values == 0.5], torch.ones(int((values == 0.5).sum()), dtype=torch.int64)
    )
    again = BufferStore(tmp_path, shard="replica0").load("pair", digest, (1, 2, 2))
    assert again is not None and torch.equal(again.samples[:64], pooled.samples[:64])  # every replica starts alike
