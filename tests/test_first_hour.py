"""What a new user meets in the first hour: a distinct name per run, a clean terminal with a run ETA, a
resume command that works, runs that fail early leave no folder, unreadable checkpoints kept.

The terminal check runs ``tools/train_net.py`` under a real pseudo-terminal 120 columns wide. What the MLflow
record says of a run (output folder, system metrics, inputs, per-class results, the model) is checked on the
shared digits run in test_end_to_end.py.
"""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import mlflow
import torch
from fault_utils import DIGITS_CONFIG, PYTHON, TRAIN_NET, empty_store, process_env

from engine.hooks import ProgressBar
from ptengine.tools.train_net import main, python_command, resume_command

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- the terminal ------------------------------------------------------------------------------------------------
def screen_lines(raw: str, width: int, keep_trailing_spaces: bool = False) -> list[str]:
    """Every line the terminal showed, after carriage returns, overwrites, wraps and cursor-up moves (with the
    spaces written at their ends, which a copy from the terminal takes along, if ``keep_trailing_spaces``)."""
    rows, row, column, position = [[]], 0, 0, 0
    while position < len(raw):
        escape = re.match(r"\x1b\[(\d*)([A-Za-z])", raw[position:])
        if escape:
            if escape.group(2) == "A":
                row = max(0, row - int(escape.group(1) or 1))
            elif escape.group(2) == "K" and escape.group(1) == "2" and row < len(rows):
                rows[row] = []
            position += escape.end()
            continue
        char = raw[position]
        position += 1
        if char == "\r":
            column = 0
            continue
        if char == "\n" or column >= width:
            row, column = row + 1, 0
            if char == "\n":
                continue
        while len(rows) <= row:
            rows.append([])
        line = rows[row]
        line.extend(" " * (column + 1 - len(line)))
        line[column] = char
        column += 1
    return ["".join(line) if keep_trailing_spaces else "".join(line).rstrip() for line in rows]


def run_in_terminal(args: list[str], cwd: Path, columns: int = 120, lines: int = 32) -> tuple[int, str]:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    env = {**process_env(), "COLUMNS": str(columns), "LINES": str(lines), "TERM": "xterm"}
    process = subprocess.Popen([PYTHON, str(TRAIN_NET), *args], cwd=cwd, env=env, stdin=follower,
                               stdout=follower, stderr=follower, start_new_session=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_in_a_terminal_the_bar_and_the_log_lines_never_share_a_line(tmp_path):
    output_dir = tmp_path / "output"
    code, raw = run_in_terminal(["--config-file", str(DIGITS_CONFIG), "TRAIN.MAX_EPOCHS", "3", "LOG.PERIOD", "11",
                                 "MLFLOW.LOG_MODEL", "False", "OUTPUT_DIR", str(output_dir),
                                 "MLFLOW.TRACKING_URI", empty_store(tmp_path / "store")], tmp_path)
    assert code == 0, raw[-3000:]
    assert "%|" in raw  # a bar was drawn ...
    screen = screen_lines(raw, width=120)
    log_line = re.compile(r"\[\d\d-\d\d \d\d:\d\d:\d\d\] ")
    for line in screen:
        assert not ("%|" in line and log_line.search(line)), line  # ... never on a log line's screen line
        if log_line.search(line):
            assert log_line.match(line), line  # a log line starts at the left edge
            assert len(line.replace(str(tmp_path), "<tmp>")) <= 100, line  # paths are as long as they are
    assert not [line for line in screen if "%|" in line]  # and it is gone at the end: no stale fragments
    iterations = [int(m.group(1)) for line in screen for m in re.finditer(r"iter (\d+)/66\b", line)]
    assert iterations == [11, 22, 33, 44, 55, 66]  # every period once, epoch ends and the last step included
    assert re.search(r"ETA \d+:\d\d:\d\d", "\n".join(screen))
    evaluations = [line for line in screen if "val_acc1" in line]
    assert len(evaluations) == 3 and not any("iter " in line for line in evaluations)
    mid_epoch = [line for line in screen if re.search(r"iter (11|33|55)/66", line)]
    assert not any("val_" in line for line in mid_epoch)  # no stale evaluation values between evaluations
    assert f"output folder: {output_dir}" in raw
    assert "%|" not in (output_dir / "log.txt").read_text()


def test_the_bar_is_drawn_only_on_a_terminal(tmp_path):
    with open(tmp_path / "console.txt", "w") as file:
        assert not ProgressBar(stream=file).enabled
    assert not ProgressBar(stream=None, enabled=False).enabled


# ---- runs, names and folders -------------------------------------------------------------------------------------
def test_two_runs_get_different_names_and_the_same_weights(run_dir, small_run_opts):
    store = f"sqlite:///{run_dir / 'store' / 'mlflow.db'}"
    outputs = [run_dir / "first", run_dir / "second"]
    assert main([*small_run_opts, "OUTPUT_DIR", str(outputs[0])]) == 0
    assert main([*small_run_opts, "OUTPUT_DIR", str(outputs[1]), "MLFLOW.SYSTEM_METRICS", "False",
                 "MLFLOW.LOG_MODEL", "True", "MLFLOW.REGISTER_MODEL", "noise-cnn"]) == 0

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id], order_by=["start_time"])
    assert len(runs) == 2 and runs[0].info.run_name != runs[1].info.run_name
    first, second = (torch.load(folder / "model_final.pth", weights_only=True) for folder in outputs)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(key.startswith("system/") for key in runs[0].data.metrics)
    assert not any(key.startswith("system/") for key in runs[1].data.metrics)  # MLFLOW.SYSTEM_METRICS False
    [version] = client.search_model_versions("name='noise-cnn'")
    assert version.run_id == runs[1].info.run_id


def test_resume_without_output_dir_is_refused_with_the_folder_to_name(capfd, run_dir):
    assert main(["--config-file", str(DIGITS_CONFIG), "--resume"]) == 2
    [error] = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert "--resume needs the OUTPUT_DIR of the run to continue" in error and "add OUTPUT_DIR" in error


def test_the_resume_command_names_the_folder_and_paths_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT / "config")
    command = resume_command(["--config-file", "digits.yaml", "TRAIN.LR", "0.05", "--resume"],
                             REPO_ROOT / "output" / "20261129-190000")
    python = python_command()
    assert command == (f"{python} tools/train_net.py --config-file config/digits.yaml TRAIN.LR 0.05 "
                       "OUTPUT_DIR output/20261129-190000 --resume")
    elsewhere = resume_command(["OUTPUT_DIR", "old", "--config-file", str(tmp_path / "my run.yaml")], tmp_path)
    assert elsewhere == f"{python} tools/train_net.py --config-file '{tmp_path}/my run.yaml' OUTPUT_DIR {tmp_path} " \
                        "--resume"
    # The project's venv is named from the repository root, so the command works without activating it.
    assert python == ".venv/bin/python" or not Path(sys.executable).absolute().is_relative_to(REPO_ROOT)


def test_a_run_that_fails_before_its_first_step_leaves_no_new_folder(capfd, run_dir, small_run_opts):
    missing_data = ["DATA.DATASET_TYPE", "image_folder", "DATA.ROOT", str(run_dir / "no-such-folder")]
    new_folder = run_dir / "runs" / "new"
    assert main([*small_run_opts, *missing_data, "OUTPUT_DIR", str(new_folder)]) == 2
    assert not new_folder.exists()

    existing = run_dir / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    assert main([*small_run_opts, *missing_data, "OUTPUT_DIR", str(existing)]) == 2
    assert (existing / "notes.txt").read_text() == "keep me"  # a folder that existed is never removed

    evaluation = run_dir / "runs" / "eval"
    assert main([*small_run_opts, "--eval-only", "MODEL.WEIGHTS", str(run_dir / "missing.pth"),
                 "OUTPUT_DIR", str(evaluation)]) == 2
    assert not evaluation.exists()
    assert len([line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]) == 3


def test_resume_keeps_unreadable_checkpoints_under_another_name(run_dir, small_run_opts):
    output_dir = run_dir / "output"
    output_dir.mkdir()
    damaged = {f"checkpoint_{i:08d}.pth": f"not a checkpoint {i}".encode() for i in (2, 4)}
    for name, content in damaged.items():
        (output_dir / name).write_bytes(content)

    assert main([*small_run_opts, "MLFLOW.ENABLED", "False", "--resume"]) == 0  # about the files: no MLflow run
    for name, content in damaged.items():
        assert (output_dir / f"{name}.unreadable").read_bytes() == content
    assert "none of the 2 checkpoints" in (output_dir / "log.txt").read_text()
    assert (output_dir / "model_final.pth").is_file()


def test_a_fresh_run_never_reattaches_the_mlflow_run_named_in_its_folder(run_dir, small_run_opts):
    first, second = run_dir / "first", run_dir / "second"
    assert main([*small_run_opts, "OUTPUT_DIR", str(first)]) == 0
    second.mkdir()  # a folder left by a run that crashed before its first checkpoint
    (second / "mlflow_run_id").write_text((first / "mlflow_run_id").read_text())

    assert main([*small_run_opts, "OUTPUT_DIR", str(second)]) == 0  # no --resume: a new run

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'store' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    assert len(runs) == 2
    assert (second / "mlflow_run_id").read_text() != (first / "mlflow_run_id").read_text()
