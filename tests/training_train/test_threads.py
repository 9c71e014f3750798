"""Thread counts that hold up on a shared machine: training runs one thread unless told more, `auto` takes the
cores other processes leave idle, and a bad value is one line naming the flag."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from toy_runs import toy_command

from training.commands.cli import main
from training.runtime import cores
from training.runtime.cores import cpu_quota, idle_between, per_core_ticks, thread_count

REPO = Path(__file__).resolve().parents[2]


def stat_text(*cores: tuple[int, int, int]) -> str:
    """A /proc/stat with one line per core from (user, idle, steal) ticks, and the summary line above them."""
    lines = [f"cpu  {sum(c[0] for c in cores)} 0 0 {sum(c[1] for c in cores)} 0 0 0 0 0 0"]
    lines += [f"cpu{index} {user} 0 0 {idle} 0 0 0 {steal} 0 0" for index, (user, idle, steal) in enumerate(cores)]
    return "\n".join([*lines, "intr 12345 0", "ctxt 999"]) + "\n"


def test_idle_cores_are_what_other_processes_leave_over_the_window() -> None:
    before = per_core_ticks(stat_text((100, 100, 0), (100, 100, 0), (100, 100, 0)))
    # core 0 held by another process, core 1 idle, core 2 half busy; steal time is not ours to use
    after = per_core_ticks(stat_text((120, 100, 0), (100, 120, 0), (110, 110, 0)))
    assert idle_between(before, after, [0, 1, 2]) == pytest.approx(1.5)
    assert idle_between(before, after, [1]) == pytest.approx(1.0)  # a process pinned to core 1 sees it free
    stolen = per_core_ticks(stat_text((100, 100, 20)))  # the hypervisor ran someone else on core 0
    assert idle_between(before, stolen, [0]) == pytest.approx(0.0)


def test_auto_follows_omp_num_threads_and_a_number_is_taken_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    count, why = thread_count("auto")
    assert 1 <= count <= len(os.sched_getaffinity(0))
    assert why.startswith("auto: ") and "cores idle" in why
    assert thread_count(None) == (1, "the default: one run per core; --threads auto or N for more")
    assert thread_count("3") == (3, "--threads 3")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_count("auto") == (2, "auto: OMP_NUM_THREADS=2")
    assert thread_count(None) == (2, "OMP_NUM_THREADS=2")
    assert thread_count(4) == (4, "--threads 4")  # a number beats the environment
    for bad in ("0", "two", "-1", ""):
        with pytest.raises(ValueError, match="--threads must be auto or a whole number of 1 or more"):
            thread_count(bad)


def test_auto_keeps_within_a_containers_cpu_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    (v1 / "cpu").mkdir(parents=True)
    (v2 / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5
    assert cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's unlimited
    assert cpu_quota(v1) is None and cpu_quota(tmp_path / "none") is None

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cores, "usable_cores", lambda: list(range(16)))
    monkeypatch.setattr(cores, "idle_cores", lambda: (12, 16))
    monkeypatch.setattr(cores, "cpu_quota", lambda: 1.5)
    assert thread_count("auto") == (1, "auto: 12 of 16 cores idle, 1 allowed (cgroup CPU quota 1.5)")
    monkeypatch.setattr(cores, "cpu_quota", lambda: None)
    assert thread_count("auto") == (12, "auto: 12 of 16 cores idle")


@pytest.fixture
def restored_threads() -> Iterator[None]:
    """A command run in this process sets its torch threads; the tests after it keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def training_flags(out: Path, *flags: str) -> list[str]:
    command = toy_command("gan", out, *flags)
    at = command.index("--threads")
    return command[:at] + command[at + 2 :]  # this file's tests choose the threads themselves


def test_training_runs_one_thread_by_default_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, restored_threads: None
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    main(training_flags(tmp_path / "gan.safetensors"))
    assert torch.get_num_threads() == 1
    assert "torch threads: 1 (the default: one run per core; --threads auto or N for more)" in capsys.readouterr().out
    main(training_flags(tmp_path / "auto.safetensors", "--threads", "auto"))
    said = capsys.readouterr().out
    assert f"torch threads: {torch.get_num_threads()} (auto: " in said and "cores idle)" in said


def test_a_bad_threads_value_stops_training_and_the_server_with_one_line(tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    training = [sys.executable, "-m", "training", *training_flags(tmp_path / "gan.safetensors", "--threads", "0")]
    refused = subprocess.run(training, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--threads must be auto or a whole number of 1 or more, not '0'" in refused.stderr
    assert not (tmp_path / "gan.safetensors").exists()
    server = [sys.executable, "-m", "service", "--threads", "many"]
    stopped = subprocess.run(server, cwd=REPO, env=environment, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 2 and stopped.stderr.count("\n") == 1
    assert "--threads (or SAMPLEBAY_THREADS) 'many'" in stopped.stderr
    assert "must be auto or a whole number of 1 or more" in stopped.stderr
