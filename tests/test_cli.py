"""``tools/train_net.py`` on the command line: a user mistake is one line on stderr and a non-zero exit.

A real subprocess checks what a terminal shows (no traceback); the other mistakes go through ``main()``
in-process, which prints the same line.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptengine.tools.train_net import main

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"

# One config mistake through a real process (what a terminal shows); every class of config mistake is
# checked once in-process through main() by test_bad_input.py, and once at the unit level by test_config.py.
CASES = {
    "malformed yaml": (["--config-file", "broken.yaml"], "malformed YAML in broken.yaml at line"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Run every case at once (each process spends most of its time importing torch)."""
    workdir = tmp_path_factory.mktemp("cli")
    (workdir / "broken.yaml").write_text("TRAIN:\n  LR: [0.1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW")}
    processes = {
        name: subprocess.Popen([sys.executable, str(TRAIN_NET), *args, "OUTPUT_DIR", str(workdir / "output")],
                               cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (args, _) in CASES.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = (process.returncode, stdout, stderr)
    return workdir, results


@pytest.mark.parametrize("case", CASES)
def test_a_user_mistake_prints_one_line_and_exits_non_zero(cli_results, case):
    workdir, results = cli_results
    returncode, stdout, stderr = results[case]
    expected = CASES[case][1]

    assert returncode != 0
    assert stderr.strip().splitlines() == [stderr.strip()]  # one line
    assert stderr.startswith(f"error: {expected}")
    assert "Traceback" not in stderr + stdout
    assert not (workdir / "output").exists()  # nothing was started
    assert not (workdir / "mlruns").exists()


def test_asking_for_more_gpus_than_visible_is_a_clear_error(capfd, run_dir, small_run_opts):
    too_many = torch.cuda.device_count() + 1

    assert main([*small_run_opts, "TRAIN.GPUS", str(too_many)]) == 2

    err = capfd.readouterr().err  # the run's log tee writes to the real stderr, hence capfd
    assert err.strip().splitlines() == [
        f"error: TRAIN.GPUS {too_many} asks for more GPUs than the {too_many - 1} visible; "
        f"set TRAIN.GPUS to at most {too_many - 1} (-1 = all, 0 = CPU)"]
    assert "Traceback" not in err


def test_a_config_file_that_is_not_text_is_a_one_line_error(capsys, tmp_path):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"TRAIN:\n  LR: 0.1\n\xff\xfe\x00\n")  # e.g. a .pth passed by mistake

    assert main(["--config-file", str(binary), "OUTPUT_DIR", str(tmp_path / "output")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {binary} is not a text file")


def test_help_answers_before_the_heavy_libraries_are_imported():
    # -X importtime lists every module the process imported, on stderr.
    result = subprocess.run([sys.executable, "-X", "importtime", str(TRAIN_NET), "--help"], capture_output=True,
                            text=True, timeout=120)

    assert result.returncode == 0
    assert result.stdout.startswith("usage: train_net.py")
    assert "--config-file FILE" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "torchvision", "mlflow", "pandas", "sklearn"}
