"""The bench scripts that produce README figures run on real (tiny) checkpoints."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_ebm, write_tiny_eqm, write_tiny_flow, write_tiny_gan

ROOT = Path(__file__).resolve().parents[1]


def bench_lines(script: str, *args: str, timeout: float) -> list[str]:
    """The lines bench/`script` prints to stdout when run with `args` (it must exit 0 within `timeout` seconds)."""
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=timeout).stdout.splitlines()


def test_models_table_prints_one_row_per_recorded_evaluation_and_each_ensemble_once(tmp_path: Path) -> None:
    for seed in (1, 2):
        write_tiny_ebm(tmp_path / f"pair_{seed}.safetensors", seed=seed, ensemble="pair")
    write_tiny_flow(tmp_path / "glow.safetensors", arch_name="glow")
    table = bench_lines("models_table.py", str(tmp_path), timeout=120)
    assert table[0].startswith("| model |") and len(table) == 2 + 4  # header, rule, 2 members, ensemble, glow
    ensemble = [line for line in table if line.startswith("| ensemble `pair`")]
    assert len(ensemble) == 1
    assert "| 10 steps (the ensemble's members in turn) from its replay buffer | 50.0 |" in ensemble[0]
    glow = next(line for line in table if line.startswith("| `glow`"))
    assert "multiscale (2 levels x 1 steps, 8 channels)" in glow and glow.endswith("| 5.00 |")


def test_ddls_sweep_prints_a_row_per_setting_and_its_zero_step_row_matches_evaluate(
    tmp_path: Path, idx_dir: Path
) -> None:
    import json

    gan = write_tiny_gan(tmp_path / "gan.safetensors")
    common = ["--data-dir", str(idx_dir), "--n", "64"]
    sweep = [str(gan), *common, "--steps", "0,3", "--step-sizes", "0.01,0.1", "--threads", "1"]
    printed = bench_lines("ddls_sweep.py", *sweep, timeout=240)
    rows = [line for line in printed if line.startswith("| ") and not line.startswith("| steps")]
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| 0", "", ""],
        ["| 3", "0.01", "0.1414"],
        ["| 3", "0.1", "0.4472"],
    ]
    evaluate = [sys.executable, "-m", "training", "evaluate", str(gan), *common, "--device", "cpu"]
    figures = json.loads(subprocess.run(evaluate, capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    assert rows[0].split(" | ")[3] == str(figures["model"]["frechet_distance"])


def test_serving_bench_drives_a_flow_and_prints_its_table(tmp_path: Path) -> None:
    write_tiny_flow(tmp_path / "nice.safetensors")
    printed = bench_lines(
        "serve.py",
        *("--models-dir", str(tmp_path), "--model", "nice", "--n", "2", "--levels", "1,2", "--requests", "2"),
        *("--device", "cpu"),
        timeout=240,
    )
    rows = [line for line in printed if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert "images/s served" in printed[1] and len(rows) == 2
    cells = [cell.strip() for cell in rows[1].split("|")]
    served, raw, ratio, per_cpu_second = float(cells[3]), float(cells[4].split()[0]), float(cells[5]), float(cells[8])
    assert served > 0 and raw > 0 and abs(ratio - served / raw) <= 0.01 + 0.01 * ratio  # cells are rounded
    assert per_cpu_second > 0 or math.isnan(per_cpu_second)  # nan: under one clock tick of server CPU
    assert cells[4].endswith("(4)")  # the raw batch: 2 requests x 2 samples


def test_serving_bench_times_a_short_request_alone_and_beside_long_ones(tmp_path: Path) -> None:
    write_tiny_ebm(tmp_path / "tiny.safetensors")
    printed = bench_lines(
        "serve.py",
        *("--models-dir", str(tmp_path), "--model", "tiny", "--device", "cpu", "--threads", "1"),
        *("--steps", "3", "--n", "1", "--levels", "2", "--requests", "2"),
        *("--beside-long", "2", "--long-steps", "40", "--sweep", "2,8"),
        timeout=240,
    )
    assert "| step budget |" in printed[1] and "beside/alone" in printed[1]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in printed[3:]}
    assert sorted(rows) == ["2", "8"]
    for cells in rows.values():
        served, per_cpu, _, alone, beside, ratio, slowest, fastest = (float(cell.rstrip("x")) for cell in cells[:8])
        assert served > 0 and alone > 0 and beside > 0 and ratio > 0
        assert per_cpu > 0 or math.isnan(per_cpu)  # nan: the server used under one clock tick of CPU (tiny run)
        assert slowest >= fastest >= 0  # seconds, one decimal


def test_latency_bench_serves_the_same_pngs_as_the_raw_loop_and_prints_both_figures(tmp_path: Path) -> None:
    eqm = write_tiny_eqm(tmp_path / "tiny_eqm.safetensors")
    printed = bench_lines(  # the script exits non-zero when a served PNG differs from the in-process one
        "latency.py",
        *("--checkpoint", str(eqm), "--requests", "2", "--repeats", "1", "--chains", "1,3", "--long-steps", "4"),
        timeout=240,
    )
    request = printed[printed.index(next(line for line in printed if line.startswith("| served s |"))) + 2]
    served, local, ratio = (float(cell.strip().rstrip("x")) for cell in request.split("|")[1:4])
    assert served > 0 and local > 0
    # The ratio is of the unrounded seconds, printed to 3 decimals: at tens of milliseconds that rounding moves it.
    assert (served - 5e-4) / (local + 5e-4) - 1e-3 <= ratio <= (served + 5e-4) / (local - 5e-4) + 1e-3
    rows = [line.split("|")[1:-1] for line in printed if line.startswith(("| 1 |", "| 3 |"))]
    assert [int(cells[0]) for cells in rows] == [1, 3]
    for cells in rows:
        served_step, local_step = float(cells[1]), float(cells[2])
        assert float(cells[3]) == pytest.approx(served_step - local_step, abs=0.01)  # ms: one median of each


def test_training_speed_bench_times_an_eqm_update_in_a_fresh_process() -> None:
    printed = bench_lines("train_speed.py", "--rows", "eqm-bf16-t1-batch64", "--updates", "1", timeout=240)
    row = next(line for line in printed if line.startswith("| eqm-bf16-t1-batch64 |"))
    updates_per_s, images_per_s = (float(cell) for cell in row.split("|")[2:4])
    assert updates_per_s > 0 and images_per_s == pytest.approx(64 * updates_per_s, rel=0.01)


def test_export_parity_serves_each_checkpoint_beside_its_export_and_finds_them_equal(tmp_path: Path) -> None:
    from training.commands.cli import main

    gan = write_tiny_gan(tmp_path / "gan.safetensors")
    main(["set-sampler", str(gan), "steps=3", "step_size=0.01"])  # DDLS by default: the exported critic drives it
    write_tiny_ebm(tmp_path / "ebm.safetensors")
    printed = bench_lines(
        "export_parity.py", str(tmp_path), *("--dtypes", "float32,bfloat16", "--n", "2", "--threads", "1"), timeout=300
    )
    rows = {
        (cells[0], cells[2]): cells
        for line in printed
        if line.startswith("| ") and not line.startswith("| model")
        for cells in [[cell.strip() for cell in line.split("|")[1:-1]]]
    }
    assert sorted(rows) == [(name, dtype) for name in ("ebm", "gan") for dtype in ("bfloat16", "float32")]
    for (name, dtype), cells in rows.items():
        assert cells[3].startswith("200") and cells[4] == cells[3]  # both served, the same steps
        assert cells[6] == "0, 0.00%", (name, dtype)  # the copy runs in float32: the checkpoint's float32 samples
    assert rows["gan", "float32"][3] == "200, 3 steps"


def test_gif_speed_bench_prints_a_row_per_encoder_and_the_grey_gif_is_exact() -> None:
    printed = bench_lines("gif_speed.py", "--rows", "1x8:4:3", "3x8:4:3", "--before", timeout=120)
    rows = [line.split(" | ") for line in printed if line.startswith("| ") and "x 4 chains" in line]
    assert [row[2] for row in rows] == ["gif_bytes", "Pillow per frame (before)"] * 2
    grey = [row for row in rows if "(L " in row[1]]
    assert len(grey) == 2 and grey[0][4] == grey[1][4] and all(row[5] == "0.00" for row in grey)  # the same bytes


def test_gan_step_speed_bench_times_a_step_in_each_precision() -> None:
    lines = bench_lines("gan_step_speed.py", "--repeats", "1", "--width", "4", timeout=120)
    timed = [line for line in lines if line.startswith("--autocast")]
    assert [line.split(":")[0] for line in timed] == ["--autocast none", "--autocast bfloat16"]
    assert all(float(line.split()[-4]) > 0 for line in timed)
