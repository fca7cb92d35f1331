"""``tools/benchmark.py`` (``make bench``) on a tiny workload: every mode runs and the report keeps its shape.

Nothing is timed here: the numbers belong to the machine. The benchmark runs as a subprocess, as ``make bench``
runs it, with its temporary folder under the test's own.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ptengine.tools.benchmark import MODES, TINY_MODES, Workspace, parse_args, run_mode
from ptengine.tools.benchmark import main as benchmark_main

BENCHMARK = Path(__file__).resolve().parent.parent / "tools" / "benchmark.py"
# --workers 0: the folder modes read in the main process (four worker processes, each importing torch, saved)
TINY = ["--images", "512", "--epochs", "1", "--repeats", "1", "--threads", "1", "--tiny-steps", "64", "--workers", "0"]


def run_benchmark(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the benchmark must use its own store whatever the shell says
    return subprocess.run([sys.executable, str(BENCHMARK), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=540)


def test_every_mode_is_in_the_table_and_the_last_line_is_the_engine_bare_ratio(tmp_path):
    result = run_benchmark(tmp_path, *TINY)

    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    for mode in MODES:  # mode, images/s, ratio to bare, median epoch seconds, ...
        assert any(re.match(rf"^{mode}\s+\d+\.\d\s+\d+\.\d\d\s+\d+\.\d\d\s", line) for line in lines), mode
    for ratio in ("engine/engine_no_mlflow", "engine_augment/engine", "engine_recipe/engine",
                  "dataloader/torchvision_folder"):
        assert any(re.match(rf"^\s+{ratio}\s+\d+\.\d\d\s", line) for line in lines), ratio
    assert any("checkpoint at the epoch end" in line for line in lines)
    assert any("metric flush" in line for line in lines)
    assert "final weights engine == engine_no_mlflow (torch.equal): True" in result.stdout
    for mode in TINY_MODES:  # the engine's own cost per step: mode, us/step, over bare, ...
        assert any(re.match(rf"^{mode}\s+\d+\.\d\s+-?\d+\.\d\s", line) for line in lines), mode
    for mode in ("tiny_engine", "tiny_engine_no_mlflow"):
        assert any(re.match(rf"^\s+{mode} - tiny_bare\s+-?\d+\.\d\s+\(<= \d+\)", line) for line in lines), mode
    assert "final weights tiny_engine == tiny_engine_no_mlflow (torch.equal): True" in result.stdout
    assert re.fullmatch(r"engine/bare \d+\.\d\d", lines[-1])
    # The benchmark's temporary folder (MLflow store, checkpoints, PNG files) is gone; importing torchvision
    # leaves torch's compile cache folder in TMPDIR, which is not the benchmark's.
    assert [path.name for path in tmp_path.iterdir() if not path.name.startswith("torchinductor_")] == []


# The two mistakes are refused by the argument parser before any work: main() in this process exits as the
# command does (SystemExit 2, the reason on stderr), without a subprocess's seconds of imports.
def test_a_mistyped_mode_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as exited:
        benchmark_main(["--modes", "bare,engnie"])

    assert exited.value.code == 2
    assert "unknown mode 'engnie'" in capsys.readouterr().err


def test_amp_on_the_cpu_is_refused_with_the_reason(capsys):
    with pytest.raises(SystemExit) as exited:
        benchmark_main(["--amp"])

    assert exited.value.code == 2
    assert "--amp and --channels-last are for --device cuda" in capsys.readouterr().err


def test_the_tiny_modes_alone_print_the_per_step_table(tmp_path):
    result = run_benchmark(tmp_path, "--modes", ",".join(TINY_MODES), "--tiny-steps", "32", "--repeats", "1",
                           "--epochs", "1")

    assert result.returncode == 0, result.stderr[-4000:]
    assert "per-step cost on a model of negligible compute" in result.stdout
    assert re.search(r"^tiny_engine\s+\d+\.\d\s+-?\d+\.\d\s", result.stdout, re.MULTILINE)
    assert result.stdout.splitlines()[-1] == "engine/bare n/a"


def test_the_mode_without_mlflow_trains_through_the_api_and_leaves_no_mlflow_store(tmp_path):
    args = parse_args([*TINY, "--modes", "tiny_engine_no_mlflow", "--tiny-steps", "8"])
    workspace = Workspace(tmp_path, args)
    try:
        result = run_mode(workspace, "tiny_engine_no_mlflow", with_costs=False)
    finally:
        workspace.close()

    assert len(result.times.wall) == 1 + args.epochs  # the benchmark's hook timed every epoch of the run
    assert [path.name for path in (tmp_path / "runs").glob("*/model_final.pth")] == ["model_final.pth"]
    assert not (tmp_path / "store").exists()  # MLFLOW.ENABLED False: no tracker, so no store was created
