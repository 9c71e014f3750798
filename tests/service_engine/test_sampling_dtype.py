"""--sampling-dtype: the steps of chains under bfloat16 autocast where the device computes it (2.7x a step of
eqm_mnist on an AVX512-BF16 CPU). A seeded chain still gives the same image alone, beside other requests and
in the CLI, within bfloat16's rounding; float32 is the sampler as it was, the same within 1e-5."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_cnf, write_tiny_ebm, write_tiny_eqm, write_tiny_gan
from engine_bench import Bench, worker_bench

from training.families import draw_samples
from training.runtime.device import sampling_dtype
from training.sampling.noise import chain_seeds

CPU = torch.device("cpu")


def test_auto_is_bfloat16_only_where_the_device_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert sampling_dtype("auto", CPU) == torch.float32  # emulated bfloat16 would be slower than float32
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert sampling_dtype("auto", CPU) == torch.bfloat16
    assert sampling_dtype("float32", CPU) == torch.float32 and sampling_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        sampling_dtype("float16", CPU)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    write_tiny_ebm(models / "solo.safetensors")
    write_tiny_eqm(models / "digits.safetensors")  # class-conditional, guided
    write_tiny_gan(models / "gan.safetensors")  # its critic refines the latents (DDLS chains)
    write_tiny_cnf(models / "cnf.safetensors")
    return models


def bench_at(models: Path, state: Path, dtype: torch.dtype) -> Bench:
    return worker_bench(models, state, sampling_dtype=dtype)


def answer(bench: Bench, crowd: dict | None = None, **fields) -> torch.Tensor:
    """The samples of one request, stepped alone or (`crowd`) beside a request admitted two steps earlier."""
    if crowd is not None:
        bench.submit(**crowd)
        for _ in range(2):
            bench.worker.run_once()
    answers = bench.submit(**fields)
    for _ in range(200):
        if answers:
            break
        bench.worker.run_once()
    return bench.result(answers).samples


@pytest.mark.parametrize(
    ("model", "fields", "crowd"),
    [
        ("solo", {"steps": 8, "init": "noise"}, {"n": 3, "steps": 30, "init": "noise", "step_size": 5.0}),
        ("digits", {"label": 3}, {"n": 5, "steps": 40, "guidance": 2.0}),
        ("gan", {"steps": 6, "step_size": 0.5}, {"n": 2, "steps": 30}),
        ("cnf", {"label": 2}, {"n": 3, "guidance": 1.0}),
    ],
)
def test_a_bfloat16_chain_is_the_same_alone_beside_others_and_in_the_cli(
    models: Path, tmp_path: Path, model: str, fields: dict, crowd: dict
) -> None:
    request = {"model": model, "n": 4, "seed": 11, **fields}
    bench = bench_at(models, tmp_path / "state", torch.bfloat16)
    alone = answer(bench, **request)
    beside = answer(bench, {"model": model, "seed": 3, **crowd}, **request)
    member = bench.registry.models[model].members[0]
    if "step_size" in fields:  # the CLI's loop reads it from the sampler (sample --step-size)
        member = dataclasses.replace(member, sampler=dataclasses.replace(member.sampler, step_size=fields["step_size"]))
    labels = torch.full((4,), fields["label"]) if "label" in fields else None
    cli = draw_samples(member, chain_seeds(11, 4), fields.get("steps"), "noise", labels=labels, dtype=torch.bfloat16)
    float32 = draw_samples(member, chain_seeds(11, 4), fields.get("steps"), "noise", labels=labels)
    for other in (beside, cli.clamp(*member.data_range)):  # exact for the shipped models on an AVX512-BF16 CPU;
        # a kernel may block a small model's bfloat16 batch differently (the tiny CNF: max 0.023, mean 0.0027)
        assert (other - alone).abs().max() <= 0.1 and (other - alone).abs().mean() <= 0.01
    assert (alone - float32).abs().max() > 1e-5  # the setting changes the arithmetic (float32's own spread: 1e-7)
    assert (alone - float32).abs().mean() < 0.05  # and not the samples

    as_before = bench_at(models, tmp_path / "state32", torch.float32)
    torch.testing.assert_close(answer(as_before, **request), float32.clamp(*member.data_range), atol=1e-5, rtol=0)
