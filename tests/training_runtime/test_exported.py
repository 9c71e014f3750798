"""Models trained elsewhere, served from torch.export programs (NAME.pt2 beside NAME.json): a user's own
energy, generator and flow served over real HTTP; every refusal named in /readyz; archives that would run
code when unpickled or evaluated refused without running it; `python -m training export` gives the same
seeded samples as the checkpoint it came from."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import threading
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import restate, write_tiny_cnf, write_tiny_ebm, write_tiny_eqm, write_tiny_flow, write_tiny_gan
from payloads import png_array, png_b64, sse_events
from programs import DATA, GAN_SIDECAR, SHAPE, TinyCritic, TinyGenerator, WellEnergy, save_program, well_sidecar
from server import running_server
from torch import nn

from service.http.render import grid_b64
from service.settings import Settings
from training.commands.cli import main
from training.families import draw_samples
from training.runtime.checkpoint import CheckpointError
from training.runtime.device import sampling_dtype
from training.runtime.exported import load_exported, read_program
from training.runtime.load import load_model
from training.sampling.noise import chain_seeds


class ColumnEnergy(WellEnergy):
    """The energy as [B, 1]: the wrong shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).unsqueeze(1)


class DetachedEnergy(WellEnergy):
    """An energy that cuts the gradient: Langevin cannot move on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.detach())


class TallCritic(TinyCritic):
    """A critic returning [B, 1]: the wrong shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).unsqueeze(1)


class NumbCritic(TinyCritic):
    """A critic that cuts the gradient: DDLS cannot move on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.detach())


class DoubtfulCritic(TinyCritic):
    """A logit critic of a GAN whose fakes it mostly rejects: negative logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) - 4.0


class NaNCritic(TinyCritic):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * torch.nan


class AffineFlow(nn.Module):
    """x = mu + exp(s) z with z ~ N(0, I): its exact log p(x) from the same pass."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Parameter(0.1 * torch.randn(SHAPE))
        self.log_scale = nn.Parameter(torch.full(SHAPE, -1.0))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.mu + self.log_scale.exp() * z
        base = -0.5 * (z.pow(2) + torch.log(torch.tensor(2 * torch.pi))).flatten(1).sum(1)
        return x, base - self.log_scale.sum()


class Marker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def rewrite(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """A copy of the archive with some records (named without the archive's root folder) replaced or added."""
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/")[0]
        records = {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}
    records.update(replace)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(f"{root}/{name}", data)
    return target


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A models directory of exported programs, good and bad, behind a running server."""
    directory = tmp_path_factory.mktemp("exported")
    x, z = torch.zeros(2, *SHAPE), torch.zeros(2, 4)
    save_program(WellEnergy(), (x,), directory / "well.pt2", well_sidecar(init="buffer"))
    save_program(WellEnergy(), (x,), directory / "bufferless.pt2", well_sidecar())
    save_program(
        TinyGenerator(), (z,), directory / "gen.pt2", {"family": "gan", "data": DATA, "sampler": {"latent_dim": 4}}
    )
    flow = {"family": "flow", "data": DATA, "sampler": {"temperature": 0.9}, "metrics": {"test_bits_per_dim": 3.0}}
    save_program(AffineFlow(), (torch.zeros(2, *SHAPE),), directory / "affine.pt2", flow)
    save_program(WellEnergy(), (x,), directory / "lonely.pt2", None)
    save_program(WellEnergy(), (x,), directory / "garbled.pt2", '{"family": "ebm", ')
    save_program(WellEnergy(), (x,), directory / "typo.pt2", well_sidecar(step_sise=0.1))
    save_program(ColumnEnergy(), (x,), directory / "column.pt2", well_sidecar())
    save_program(DetachedEnergy(), (x,), directory / "detached.pt2", well_sidecar())
    save_program(WellEnergy(), (x,), directory / "fixed.pt2", well_sidecar(), dynamic=False)
    save_program(TinyGenerator(), (z,), directory / "orphan.critic.pt2", None)  # a companion without its program
    save_program(WellEnergy(), (x,), directory / "judged.pt2", well_sidecar())  # with a companion energies do not take
    save_program(WellEnergy(), (x,), directory / "judged.forward.pt2", None)
    generator, image = TinyGenerator(), (torch.zeros(2, *SHAPE),)
    probability = {**GAN_SIDECAR, "sampler": {**GAN_SIDECAR["sampler"], "critic_output": "probability"}}
    for name, critic, sidecar in [
        ("judge", TinyCritic(), GAN_SIDECAR),  # a user's GAN with its discriminator's logit
        ("sure", TinyCritic(probability=True), probability),  # the same discriminator ending in its sigmoid
        ("tall", TallCritic(), GAN_SIDECAR),
        ("numb", NumbCritic(), GAN_SIDECAR),
        ("nan", NaNCritic(), GAN_SIDECAR),
        ("liar", DoubtfulCritic(), probability),  # says probability, returns logits
    ]:
        save_program(generator, (z,), directory / f"{name}.pt2", sidecar)
        save_program(critic, image, directory / f"{name}.critic.pt2", None)
    (directory / "broken.pt2").write_bytes(b"PK not really an archive")
    (directory / "broken.json").write_text(json.dumps(well_sidecar()))
    settings = Settings(models_dir=directory, state_dir=directory / "state", device="cpu")
    with running_server(settings) as (base, _):
        yield base, directory


def test_a_users_own_energy_is_served_with_seeded_samples_and_energies(served) -> None:
    base, _ = served
    models = {model["name"]: model for model in httpx.get(f"{base}/models").json()}
    assert models["well"]["family"] == "ebm" and models["well"]["shape"] == list(SHAPE)
    assert models["well"]["sampler"]["steps"] == 6  # the sidecar's, over the sampler's defaults
    request = {"model": "well", "n": 3, "seed": 11, "format": "json", "init": "noise"}
    first = httpx.post(f"{base}/sample", json=request).json()
    again = httpx.post(f"{base}/sample", json=request).json()
    assert first["images"] == again["images"] and len(first["energy"]) == 3
    assert all(isinstance(energy, float) for energy in first["energy"])
    buffered = httpx.post(f"{base}/sample", json={"model": "well", "n": 2, "init": "buffer", "format": "json"})
    assert buffered.status_code == 200  # init: buffer in its sidecar: the server keeps a replay buffer for it
    refused = httpx.post(f"{base}/sample", json={"model": "bufferless", "n": 2, "init": "buffer"})
    assert refused.status_code == 422 and "exported energy whose sidecar asks for none" in refused.text
    gif = httpx.post(f"{base}/sample", json={"model": "well", "n": 2, "format": "gif", "trajectory_every": 2})
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"


def test_a_users_generator_and_flow_are_served(served) -> None:
    base, _ = served
    gan = httpx.post(f"{base}/sample", json={"model": "gen", "n": 2, "seed": 3, "format": "json"}).json()
    assert (
        len(gan["images"]) == 2
        and gan["images"]
        == httpx.post(f"{base}/sample", json={"model": "gen", "n": 2, "seed": 3, "format": "json"}).json()["images"]
    )
    flow = httpx.post(f"{base}/sample", json={"model": "affine", "n": 2, "seed": 3, "format": "json"}).json()
    assert len(flow["images"]) == 2 and len(flow["bits_per_dim"]) == 2
    assert all(isinstance(bits, float) and bits == bits for bits in flow["bits_per_dim"])


def test_a_users_gan_runs_ddls_with_its_own_critic_and_a_probability_critic_as_its_logit(served) -> None:
    base, directory = served
    models = {model["name"]: model for model in httpx.get(f"{base}/models").json()}
    assert models["judge"]["latent_langevin"] and models["judge"]["sampler"]["steps"] == 5
    assert "weights" not in models["judge"]["sampler"]  # no EMA or raw weights to choose in a program
    assert not models["gen"]["latent_langevin"]
    assert not {"weights", "steps", "step_size", "noise", "critic_output"} & set(models["gen"]["sampler"])
    request = {"n": 3, "seed": 4, "format": "json"}
    judged = httpx.post(f"{base}/sample", json={"model": "judge", **request}).json()
    assert judged["steps"] == 5 and len(judged["energy"]) == 3  # DDLS by default, as its sidecar says
    model = load_exported(directory / "judge.pt2")
    expected = draw_samples(model, chain_seeds(4, 3), dtype=sampling_dtype("auto", torch.device("cpu")))
    assert judged["images"] == [grid_b64(expected[i : i + 1], model.data_range) for i in range(3)]
    plain = draw_samples(model, chain_seeds(4, 3), steps=0)
    assert judged["images"] != [grid_b64(plain[i : i + 1], model.data_range) for i in range(3)]  # it moved
    sure = httpx.post(f"{base}/sample", json={"model": "sure", **request}).json()
    for mine, theirs in zip(sure["images"], judged["images"], strict=True):  # within a level of 8-bit rounding
        assert np.abs(png_array(mine).astype(int) - png_array(theirs).astype(int)).max() <= 1
    with httpx.stream(
        "POST", f"{base}/sample", json={"model": "sure", "steps": 4, "trajectory_every": 2, "stream": True}
    ) as response:
        names = [name for name, _ in sse_events(response.iter_lines())]
    assert names == ["frame", "frame", "frame", "done"]  # steps 0, 2, 4, then the samples
    refused = httpx.post(f"{base}/sample", json={"model": "gen", "steps": 3})
    assert refused.status_code == 422
    assert "gen is an exported generator served without a critic program (gen.critic.pt2" in refused.json()["detail"]


def test_an_exported_gans_critic_scores_images_and_a_probabilitys_score_is_its_logit(served) -> None:
    base, _ = served
    pixels = np.random.default_rng(3).integers(0, 256, size=(2, 8, 8))
    images = [png_b64(image) for image in pixels]
    scores = {}
    for name in ("judge", "sure"):
        reply = httpx.post(f"{base}/score", json={"model": name, "images": images})
        assert reply.status_code == 200, reply.text
        scores[name] = [result["critic"] for result in reply.json()["results"]]
    x = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) / 127.5 - 1  # [2, 1, 8, 8] in [-1, 1]
    with torch.no_grad():
        logits = TinyCritic()(x)
    assert scores["judge"] == pytest.approx(logits.tolist(), abs=1e-4)
    assert scores["sure"] == pytest.approx(logits.tolist(), abs=1e-3)  # log(p / (1 - p)) of its sigmoid
    reply = httpx.post(f"{base}/score", json={"model": "gen", "images": images})
    assert reply.status_code == 422 and "without a critic program" in reply.json()["detail"]


def test_every_program_the_server_cannot_use_is_refused_with_its_reason_in_readyz(served) -> None:
    base, _ = served
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200  # the good ones load; the bad ones are listed
    refused = ready.json()["refused"]
    assert "lonely.json is missing" in refused["lonely.pt2"]
    assert "garbled.json is not valid JSON" in refused["garbled.pt2"]
    assert "['step_sise'] are not known to EBMSampler" in refused["typo.pt2"]
    assert "the energy has shape [2, 1], expected [2]" in refused["column.pt2"]
    assert "no gradient with respect to x" in refused["detached.pt2"]
    assert "batch dimension of input x is fixed at 2" in refused["fixed.pt2"]
    assert "the critic program of orphan.pt2, which is not there" in refused["orphan.critic.pt2"]
    assert "judged.forward.pt2: ebm programs take no forward program" in refused["judged.pt2"]  # the bundle, as one
    assert "not a torch.export archive" in refused["broken.pt2"]
    assert "tall.critic.pt2: the critic's output has shape [2, 1], expected [2]" in refused["tall.pt2"]
    assert "numb.critic.pt2: the critic has no gradient with respect to x" in refused["numb.pt2"]
    assert "nan.critic.pt2: the critic's output is not finite" in refused["nan.pt2"]
    assert 'says critic_output "probability", but the critic returns values outside [0, 1]' in refused["liar.pt2"]
    served_names = {model["name"] for model in httpx.get(f"{base}/models").json()}
    assert served_names == {"well", "bufferless", "gen", "affine", "judge", "sure"}


@pytest.fixture(scope="module")
def plain_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("crafted")
    return save_program(WellEnergy(), (torch.zeros(2, *SHAPE),), directory / "plain.pt2", well_sidecar())


def test_pickled_sample_inputs_are_refused_without_running_them(plain_archive: Path, tmp_path: Path) -> None:
    """torch.export.load reads data/sample_inputs with weights_only=True and, when that fails, unpickles it
    with weights_only=False: the crafted archive runs code under torch.export.load alone."""
    marker = tmp_path / "ran"
    payload = io.BytesIO()
    torch.save((Marker(marker),), payload)
    crafted = rewrite(plain_archive, tmp_path / "crafted.pt2", {"data/sample_inputs/model.pt": payload.getvalue()})
    with pytest.raises(CheckpointError, match=r"sample_inputs/model\.pt is not plain tensors"):
        read_program(crafted.read_bytes(), crafted.name)
    assert not marker.exists()
    with contextlib.suppress(Exception):
        torch.export.load(crafted)  # what the check stands in front of
    assert marker.exists()


def test_pickled_constants_and_code_in_the_graph_are_refused_without_running(
    plain_archive: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    opaque = {
        "config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}
    }
    with zipfile.ZipFile(plain_archive) as archive:
        root = archive.namelist()[0].split("/")[0]
        graph = json.loads(archive.read(f"{root}/models/model.json"))
    crafted = {
        "opaque": {
            "data/constants/model_constants_config.json": json.dumps(opaque).encode(),
            "data/constants/opaque_obj_0": pickle.dumps(Marker(marker)),
        },
        "pickled weight": {
            "data/weights/model_weights_config.json": json.dumps(
                {"config": {"net.1.weight": {"path_name": "weight_0", "is_param": True, "use_pickle": True}}}
            ).encode()
        },
        "guards": {"models/model.json": json.dumps({**graph, "guards_code": [f"open({str(marker)!r}, 'w')"]}).encode()},
        "compiled": {"data/aotinductor/model/model.so": b"\x7fELF"},
    }
    reasons = {
        "opaque": "opaque_obj_0: not part of a plain torch.export program",
        "pickled weight": "is a pickled object, not raw tensor bytes",
        "guards": "guards_code.*is not shape arithmetic",
        "compiled": "data/aotinductor/model/model.so: not part of a plain torch.export program",
    }
    for name, records in crafted.items():
        path = rewrite(plain_archive, tmp_path / f"{name.replace(' ', '_')}.pt2", records)
        with pytest.raises(CheckpointError, match=reasons[name]):
            read_program(path.read_bytes(), path.name)
        assert not marker.exists(), name


def test_programs_read_at_once_are_all_read(plain_archive: Path) -> None:
    """torch's deserializer keeps the program it reads in a global: a load abandoned at its timeout, still reading,
    refused the next model's program ("_CURRENT_DESERIALIZER is already set")."""
    payload, failures = plain_archive.read_bytes(), []

    def read() -> None:
        for _ in range(5):
            try:
                read_program(payload, plain_archive.name)
            except CheckpointError as error:
                failures.append(str(error))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


@pytest.mark.parametrize(
    "family", ["ebm", "eqm", "gan", "flow"]
)  # contrastive-divergence and conditional EqM energies, a DCGAN, NICE
def test_an_exported_checkpoint_gives_the_native_seeded_samples(family: str, tmp_path: Path) -> None:
    writers = {"ebm": write_tiny_ebm, "eqm": write_tiny_eqm, "gan": write_tiny_gan, "flow": write_tiny_flow}
    checkpoint = writers[family](tmp_path / f"{family}.safetensors")
    main(["export", str(checkpoint), "--out", str(tmp_path / "out" / f"{family}_copy.pt2")])
    native, exported = load_model(checkpoint), load_model(tmp_path / "out" / f"{family}_copy.pt2")
    assert exported.sampler == native.sampler and exported.config.metrics == native.config.metrics
    assert exported.classes == native.classes
    seeds = chain_seeds(5, 4)
    init = "noise" if family in ("ebm", "eqm") else None
    steps = 4 if family in ("ebm", "eqm", "gan") else None  # a GAN's: DDLS with the critic exported beside it
    expected = draw_samples(native, seeds, steps=steps, init=init)
    actual = draw_samples(exported, seeds, steps=steps, init=init)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    critic = tmp_path / "out" / f"{family}_copy.critic.pt2"
    assert critic.exists() == (family == "gan") == (exported.critic is not None)


@pytest.mark.parametrize("family", ["ebm", "eqm", "gan", "flow", "cnf"])
def test_an_exported_model_samples_under_bfloat16_chain_steps(family: str, tmp_path: Path) -> None:
    """torch.export keeps dtype assertions that autocast's bfloat16 tripped (every request to the exported
    eqm_mnist was a 503 where --sampling-dtype auto picks bfloat16): a program runs in its traced float32, and
    is differentiated in it, so its samples (Langevin chains, a GAN's DDLS under its exported critic, a CNF's
    field stepped by the ODE) are the checkpoint's float32 ones and the checkpoint's own bfloat16 ones within
    rounding."""
    writers = {
        "ebm": write_tiny_ebm, "eqm": write_tiny_eqm, "gan": write_tiny_gan, "flow": write_tiny_flow,
        "cnf": write_tiny_cnf,
    }  # fmt: skip
    checkpoint = writers[family](tmp_path / f"{family}.safetensors")
    main(["export", str(checkpoint), "--out", str(tmp_path / f"{family}_copy.pt2")])
    native, exported = load_model(checkpoint), load_model(tmp_path / f"{family}_copy.pt2")
    seeds = chain_seeds(5, 4)
    steps, init = {"ebm": (4, "noise"), "eqm": (4, "noise"), "gan": (4, None)}.get(family, (None, None))
    float32 = draw_samples(native, seeds, steps=steps, init=init)
    actual = draw_samples(exported, seeds, steps=steps, init=init, dtype=torch.bfloat16)
    torch.testing.assert_close(actual, float32, atol=0, rtol=0)  # bit for bit: no step of it ran in bfloat16
    bfloat16 = draw_samples(native, seeds, steps=steps, init=init, dtype=torch.bfloat16)
    torch.testing.assert_close(actual, bfloat16, atol=0.05, rtol=0.05)


def test_a_program_beside_a_checkpoint_of_the_same_name_is_refused(tmp_path: Path) -> None:
    write_tiny_gan(tmp_path / "twin.safetensors")
    main(["export", str(tmp_path / "twin.safetensors"), "--out", str(tmp_path / "twin.pt2")])
    from service.catalogue.registry import load_registry

    registry = load_registry(tmp_path, torch.device("cpu"))
    assert "twin" in registry.models and "same name" in registry.refused["twin.pt2"]
    assert load_exported(tmp_path / "twin.pt2").config.family == "gan"


def test_critic_output_describes_a_program_and_a_checkpoint_stating_it_is_refused(tmp_path: Path) -> None:
    """A checkpoint's critic is built from its arch and returns its logit: a file saying "probability" would turn
    it into the logit of a logit, so it is refused with the reason."""
    gan = write_tiny_gan(tmp_path / "gan.safetensors")
    restate(gan, lambda config: config["sampler"].update(critic_output="probability"))
    with pytest.raises(CheckpointError, match="a checkpoint's critic returns its logit"):
        load_model(gan)
