"""What a new user meets in the first hour: a distinct name per run, a clean terminal with a run ETA, a
resume command that works, runs that fail early leave no folder, and an MLflow record that says where
everything is (output folder, system metrics, the data as inputs, per-class results, a named model with its
metrics).

The MLflow checks read the shared digits run (``trained_digits_run`` in conftest.py); the terminal check runs
``tools/train_net.py`` under a real pseudo-terminal 120 columns wide.
"""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import mlflow
import pytest
import torch
from fault_utils import DIGITS_CONFIG, PYTHON, TRAIN_NET, process_env

from config import load_config
from datasets import build_datasets
from engine.hooks import ProgressBar
from tools.dataset_inputs import split_digest
from tools.train_net import main, python_command, resume_command

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- the shared digits run in MLflow ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(trained_digits_run):
    assert trained_digits_run["exit_code"] == 0
    client = mlflow.MlflowClient(trained_digits_run["tracking_uri"])
    run = client.get_run(trained_digits_run["run_id"])
    return {**trained_digits_run, "client": client, "run": run}


def test_the_run_says_where_its_files_are(digits, tmp_path):
    output_dir = str(digits["output_dir"].resolve())
    run = digits["run"]
    assert run.data.params["OUTPUT_DIR"] == output_dir
    assert run.data.tags["output_dir"] == output_dir
    logged = digits["client"].download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert load_config(logged).OUTPUT_DIR == output_dir
    assert load_config(str(digits["output_dir"] / "config.yaml")).OUTPUT_DIR == output_dir
    description = run.data.tags["mlflow.note.content"]
    assert "simple_cnn trained on digits" in description and output_dir in description


def test_system_metrics_are_recorded_even_for_a_short_run(digits):
    system = [key for key in digits["run"].data.metrics if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system
    assert "system/system_memory_usage_megabytes" in system
    assert any(key.startswith("system/disk_") for key in system)
    assert any(key.startswith("system/network_") for key in system)


def test_the_splits_are_dataset_inputs_with_a_digest_over_every_image(digits):
    cfg = load_config(str(DIGITS_CONFIG), digits["opts"])
    splits = build_datasets(cfg)
    inputs = {i.dataset.name: i for i in digits["run"].inputs.dataset_inputs}
    assert set(inputs) == {"digits-train", "digits-val"}
    train = inputs["digits-train"]
    assert [tag.value for tag in train.tags if tag.key == "mlflow.data.context"] == ["training"]
    assert train.dataset.digest == split_digest(splits.train)
    assert inputs["digits-val"].dataset.digest == split_digest(splits.val) != train.dataset.digest
    profile = json.loads(train.dataset.profile)
    assert profile["num_rows"] == len(splits.train)
    assert profile["class_counts"]["3"] == int((splits.train.labels == 3).sum())
    assert "load_digits" in train.dataset.source


def test_a_digest_changes_when_a_single_pixel_changes():
    cfg = load_config(str(DIGITS_CONFIG))
    split = build_datasets(cfg).val
    before = split_digest(split)
    split.images[-1, 0, -1, -1] ^= 1  # beyond the first 10,000 values MLflow's own digest would read
    assert split_digest(split) != before


def test_the_logged_model_is_named_for_what_it_is_and_carries_the_final_metrics(digits):
    run = digits["run"]
    mlflow.set_tracking_uri(digits["tracking_uri"])
    try:
        [model] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                              filter_string=f"source_run_id = '{run.info.run_id}'")
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert model.name == "simple_cnn-digits"
    on_model = {metric.key: metric for metric in model.metrics}
    # The metrics of the final step, evaluation included; not the system metrics (a step counter of their own).
    assert {"val_loss", "val_acc1", "train_loss"} <= set(on_model)
    assert not [key for key in on_model if key.startswith("system/")]
    assert on_model["val_acc1"].value == run.data.metrics["val_acc1"]
    assert on_model["val_loss"].value == run.data.metrics["val_loss"]
    steps = [m.step for m in digits["client"].get_metric_history(run.info.run_id, "val_acc1")]
    assert len(steps) == len(set(steps))  # linking the model logged no second point
    assert on_model["val_acc1"].step == steps[-1]


def test_per_class_accuracy_is_one_figure_and_one_table_per_evaluation(digits, tmp_path):
    client, run = digits["client"], digits["run"]
    eval_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc1")]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "per_class_accuracy")}
    expected = {f"per_class_accuracy/val_step_{step:08d}.{ext}" for step in eval_steps for ext in ("png", "json")}
    assert files == expected
    last_table = f"per_class_accuracy/val_step_{eval_steps[-1]:08d}.json"
    table = json.loads(Path(client.download_artifacts(run.info.run_id, last_table, str(tmp_path))).read_text())
    assert table["columns"] == ["class", "accuracy", "images"] and len(table["data"]) == 10
    # One chart per metric worth a curve: no per-class dots, no constant validation count.
    assert not [key for key in run.data.metrics if re.fullmatch(r"val_acc1_.+|val_count", key)]


# ---- the terminal ------------------------------------------------------------------------------------------------
def screen_lines(raw: str, width: int) -> list[str]:
    """Every line the terminal showed, after carriage returns, overwrites, wraps and cursor-up moves."""
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
    return ["".join(line).rstrip() for line in rows]


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
                                 "MLFLOW.TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"], tmp_path)
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
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id], order_by=["start_time"])
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

    assert main([*small_run_opts, "--resume"]) == 0
    for name, content in damaged.items():
        assert (output_dir / f"{name}.unreadable").read_bytes() == content
    assert "none of the 2 checkpoints" in (output_dir / "log.txt").read_text()
    assert (output_dir / "model_final.pth").is_file()
