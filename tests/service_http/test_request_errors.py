"""What a client is told about a request the server cannot take, through real HTTP to a server with a model of
every family: a field its model does not read names the families that do read it, /models lists only the
fields (and bounds) each model reads, a wrongly typed field is a 422 naming it, a body that is not JSON is a
400 that says where, and a body not sent as JSON is a 415 that says how to send it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import (
    write_gan_without_its_critic,
    write_tiny_cnf,
    write_tiny_ebm,
    write_tiny_eqm,
    write_tiny_flow,
    write_tiny_gan,
)
from payloads import png_b64
from server import running_server

from service.settings import Settings
from training.runtime.checkpoint import Checkpoint, ModelConfig, load_checkpoint, save_checkpoint

EBM = [
    "temperature",
    "steps",
    "step_size",
    "noise",
    "momentum",
    "tolerance",
    "init",
    "image",
    "mask",
    "trajectory_every",
]
CONDITIONAL_EBM = ["temperature", "label", "steps", "step_size", "noise", "momentum", "guidance", "tolerance",
                   "init", "image", "mask", "trajectory_every"]  # fmt: skip
CNF = ["temperature", "steps", "init", "image", "mask", "trajectory_every"]
CONDITIONAL_CNF = ["temperature", "label", "steps", "guidance", "init", "image", "mask", "trajectory_every"]
MODELS = {  # name -> what a refusal calls it, and the fields it reads beyond model, n, seed, format, stream
    "ebm": ("an unconditional EBM", EBM),
    "eqm": ("a class-conditional EBM", CONDITIONAL_EBM),
    "eqm_plain": ("an unconditional EBM", EBM),
    "gan": ("an unconditional GAN whose critic refines its latent by DDLS",
            ["temperature", "steps", "step_size", "noise", "trajectory_every"]),
    "gan_plain": ("an unconditional GAN saved without its critic, sampled by one generator pass", ["temperature"]),
    "nice": ("an unconditional flow sampled by one pass of its inverse", ["temperature"]),
    "glow": ("an unconditional flow sampled by one pass of its inverse", ["temperature"]),
    "iresnet": ("an unconditional flow sampled by one pass of its inverse", ["temperature"]),
    "cnf": ("a class-conditional CNF sampled by its ODE", CONDITIONAL_CNF),
    "cnf_plain": ("an unconditional CNF sampled by its ODE", CNF),
}  # fmt: skip
READERS = {  # field -> the families that read it, as the README's field table says
    "steps": "EBMs, CNFs and GANs with a critic",
    "step_size": "EBMs and GANs with a critic",
    "noise": "EBMs and GANs with a critic",
    "momentum": "EBMs",
    "guidance": "class-conditional EBMs and CNFs",
    "tolerance": "EBMs",
    "init": "EBMs and CNFs",
    "image": "EBMs and CNFs",
    "mask": "EBMs and CNFs",
    "trajectory_every": "EBMs, CNFs and GANs with a critic",
    "label": "class-conditional EBMs and CNFs",
}


GREY = png_b64(np.full((28, 28), 128))  # a flat grey 28x28 PNG
VALUES = {"steps": 2, "step_size": 0.01, "noise": 0.01, "momentum": 0.5, "guidance": 1.5, "tolerance": 0.01,
          "init": "noise", "image": GREY, "mask": GREY, "trajectory_every": 1, "label": 1}  # fmt: skip


def write_unconditional_cnf(path: Path) -> None:
    """write_tiny_cnf's field without classes: no label embedding, no guidance in its sampler."""
    from training.models import build_model

    conditional = load_checkpoint(write_tiny_cnf(path))
    arch = {**conditional.config.arch, "kwargs": {**conditional.config.arch["kwargs"], "num_classes": 0}}
    data = {key: value for key, value in conditional.config.data.items() if key != "classes"}
    sampler = {key: value for key, value in conditional.config.sampler.items() if key not in ("guidance", "unlabelled")}
    config = ModelConfig(family="flow", arch=arch, data=data, sampler=sampler, training={"seed": 0}, metrics={})
    save_checkpoint(path, Checkpoint(config, build_model(arch).state_dict()))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("families")
    models = root / "models"
    models.mkdir()
    write_tiny_ebm(models / "ebm.safetensors", steps=2)
    write_tiny_eqm(models / "eqm.safetensors")
    write_tiny_eqm(models / "eqm_plain.safetensors", conditional=False)
    write_tiny_gan(models / "gan.safetensors")
    write_gan_without_its_critic(models / "gan_plain.safetensors")
    for arch in ("nice", "glow", "iresnet"):
        write_tiny_flow(models / f"{arch}.safetensors", arch_name=arch)
    write_tiny_cnf(models / "cnf.safetensors")
    write_unconditional_cnf(models / "cnf_plain.safetensors")
    with running_server(Settings(models_dir=models, state_dir=root / "state", device="cpu")) as (base, _):
        yield base


def test_models_list_only_the_fields_and_bounds_each_model_reads(server: str) -> None:
    listed = {model["name"]: model for model in httpx.get(f"{server}/models").json()}
    assert sorted(listed) == sorted(MODELS)
    for name, (_, fields) in MODELS.items():
        assert listed[name]["fields"] == fields, name
        numeric = {"steps", "step_size", "noise", "momentum", "guidance", "tolerance", "temperature", "label",
                   "trajectory_every"}  # fmt: skip
        assert set(listed[name]["limits"]["fields"]) == {"n", "seed"} | (numeric & set(fields)), name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_field_a_model_does_not_read_names_the_families_that_do(server: str, name: str) -> None:
    what, fields = MODELS[name]
    for field, value in VALUES.items():
        reply = httpx.post(f"{server}/sample", json={"model": name, field: value}, timeout=60)
        detail = reply.json()["detail"] if reply.status_code != 200 else ""
        if field in fields:
            assert "applies to" not in detail, (field, detail)
        elif name == "gan_plain" and field in ("steps", "step_size", "noise", "trajectory_every"):
            assert reply.status_code == 422 and "was saved without its critic" in detail, (field, detail)
        else:
            said = f"'{field}' applies to {READERS[field]}; {name} is {what}, which takes {', '.join(fields)}"
            assert reply.status_code == 422 and said in detail, (field, detail)


@pytest.mark.parametrize(
    ("field", "value"), [("n", "4"), ("seed", "1"), ("step_size", "0.1"), ("stream", "true"), ("n", True)]
)
def test_a_wrongly_typed_field_is_a_422_naming_it(server: str, field: str, value: object) -> None:
    reply = httpx.post(f"{server}/sample", json={"model": "ebm", field: value})
    assert reply.status_code == 422, reply.text
    assert [problem["field"] for problem in reply.json()["errors"]] == [field]


def test_a_whole_number_for_a_decimal_field_and_a_plain_request_still_sample(server: str) -> None:
    plain = {"model": "ebm", "n": 2, "seed": 1, "steps": 2, "format": "json", "init": "noise", "stream": False}
    assert httpx.post(f"{server}/sample", json={**plain, "step_size": 1, "temperature": 1}).status_code == 200
    reply = httpx.post(f"{server}/sample", json={**plain, "step_size": 0.5, "noise": 0.01})
    assert reply.status_code == 200 and len(reply.json()["images"]) == 2


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b'{"model": "ebm",', "Expecting property name enclosed in double quotes: line 1 column 17 (char 16)"),
        (b'{"n": 1} trailing', "Extra data: line 1 column 10 (char 9)"),
        (b'{"model": "ebm",\n "n": }', "Expecting value: line 2 column 7 (char 23)"),
    ],
)
def test_a_body_that_is_not_json_is_a_400_that_says_where(server: str, raw: bytes, where: str) -> None:
    reply = httpx.post(f"{server}/sample", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.json() == {"detail": f"the body is not valid JSON: {where}"}  # no field: there are none yet


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe{}"])
def test_an_empty_or_undecodable_body_is_a_400_that_says_what_to_send(server: str, raw: bytes) -> None:
    reply = httpx.post(f"{server}/sample", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 400
    detail = reply.json()["detail"]
    assert ("the body is empty" if not raw else "the body is not valid JSON") in detail


@pytest.mark.parametrize(("raw", "what"), [(b"null", "null"), (b"[1, 2]", "an array"), (b'"ebm"', "a string")])
def test_json_that_is_not_an_object_is_a_422_that_says_what_came(server: str, raw: bytes, what: str) -> None:
    reply = httpx.post(f"{server}/sample", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 422
    assert reply.json()["detail"] == f'the body must be a JSON object of fields such as {{"model": "NAME"}}, not {what}'


def test_the_schema_documents_the_400_and_the_415(server: str) -> None:
    responses = httpx.get(f"{server}/openapi.json").json()["paths"]["/sample"]["post"]["responses"]
    assert "not valid JSON" in responses["400"]["description"]
    assert "application/json" in responses["415"]["description"]


@pytest.mark.parametrize(
    ("headers", "came"),
    [
        ({"content-type": "application/x-www-form-urlencoded"}, "as application/x-www-form-urlencoded"),
        ({"content-type": "text/plain; charset=utf-8"}, "as text/plain"),
        ({}, "without a content-type"),
    ],
)
def test_a_body_not_sent_as_json_is_a_415_that_says_how(server: str, headers: dict, came: str) -> None:
    body = b'{"model": "ebm", "steps": 2}'  # curl -d sends form encoding unless told otherwise
    reply = httpx.post(f"{server}/sample", content=body, headers=headers)
    assert reply.status_code == 415
    detail = reply.json()["detail"]
    assert "send it with 'content-type: application/json'" in detail and f"this one came {came}" in detail


def test_json_with_a_charset_or_a_json_suffix_is_json(server: str) -> None:
    body = b'{"model": "ebm", "steps": 2}'
    for kind in ("application/json; charset=utf-8", "application/vnd.samplebay+json"):
        assert httpx.post(f"{server}/sample", content=body, headers={"content-type": kind}).status_code == 200
