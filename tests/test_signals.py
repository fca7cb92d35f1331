"""Stopping a training on purpose: Ctrl+C (SIGINT), ``kill`` (SIGTERM), Ctrl+C twice, and tools/train_bg.sh.

SIGINT or SIGTERM lets the current step finish, writes a checkpoint, marks the MLflow run KILLED and exits
with 130; ``--resume`` then finishes the run as if nothing happened. A second Ctrl+C leaves at once.
``tools/train_bg.sh`` starts the training detached from the terminal and follows its log: Ctrl+C stops the
following, never the training.

The four stories run in parallel (each process mostly waits for its imports), each with its own MLflow store;
the tests then read what happened.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from fault_utils import (
    ITERS_PER_EPOCH,
    REPO_ROOT,
    TRAIN_BG,
    Training,
    assert_same_weights,
    empty_store,
    load_weights,
    log_text,
    metric_history,
    process_env,
    runs_of,
    shared_reference_run,
    small_run_args,
    wait_for,
    wait_for_log,
)

from ptengine.tools.train_net import python_command

A_VERY_LONG_STEP = 120.0  # seconds: a second Ctrl+C must not wait for it
# Starts a program with Ctrl+C's SIGINT (and SIGQUIT, SIGPIPE, SIGXFSZ) handled by default, as from a terminal.
# Run as a background job of a script, pytest and what it starts ignore SIGINT, and a shell cannot trap a signal
# that it was started ignoring: train_bg.sh would never see the Ctrl+C.
AS_FROM_A_TERMINAL = [sys.executable, "-c", "import os, signal, sys\nfor name in ('SIGINT', 'SIGQUIT', 'SIGPIPE', "
                      "'SIGXFSZ'): signal.signal(getattr(signal, name), signal.SIG_DFL)\nos.execvp(sys.argv[1], "
                      "sys.argv[1:])"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return shared_reference_run(tmp_path_factory)


class Story:
    """A run in ``workdir/<name>`` with its own MLflow store, and what the test saw happen to it."""

    def __init__(self, workdir, name, **faults):
        self.workdir, self.output_dir, self.store = workdir, workdir / name, workdir / f"{name}-store"
        self.tracking_uri = empty_store(self.store)
        self.args = small_run_args(self.output_dir, self.tracking_uri)
        self.first = Training(self.args, workdir, name, **faults)
        self.resumed = Training([*self.args, "--resume"], workdir, f"{name}-resumed")
        self.facts: dict = {}

    def mlflow_statuses(self) -> list[str]:
        return [run.info.status for run in runs_of(self.tracking_uri)]

    def note_the_aftermath(self) -> None:
        pointer = self.output_dir / "last_checkpoint"
        self.facts["last checkpoint"] = pointer.read_text() if pointer.is_file() else None
        if pointer.is_file():
            self.facts["its iteration"] = load_weights(self.output_dir / pointer.read_text())["iteration"]
        self.facts["checkpoints"] = sorted(path.name for path in self.output_dir.glob("checkpoint_*.pth"))
        self.facts["log"] = log_text(self.output_dir)
        self.facts["mlflow"] = self.mlflow_statuses()


def send_once(signum: int, group: bool, when: str):
    """One signal once ``when`` is logged, as Ctrl+C (to the whole foreground group) or `kill PID` sends it."""
    def story(run: Story) -> None:
        with run.first as training:
            wait_for_log(run.output_dir, when, training)
            training.send(signum, group=group)
            run.facts["exit code"] = training.wait(timeout=120)
        run.note_the_aftermath()
    return story


def press_ctrl_c_twice(run: Story) -> None:
    with run.first as training:
        # Once the MLflow run and its first artifacts arrived (so that marking it KILLED is quick) ...
        wait_for(lambda: list(run.store.rglob("requirements-freeze.txt")), "the first artifacts", process=training)
        wait_for_log(run.output_dir, "fault: step 1 starts", training)
        training.send(signal.SIGINT, group=True)  # ... ask to stop after this step, which lasts 2 minutes,
        wait_for_log(run.output_dir, "SIGINT received: stopping after this step", training)
        training.send(signal.SIGINT, group=True)  # ... and insist.
        run.facts["exit code"] = training.wait(timeout=A_VERY_LONG_STEP)
    run.note_the_aftermath()


def start_with_train_bg_and_press_ctrl_c(run: Story) -> None:
    terminal = run.workdir / "terminal.txt"  # what the user sees
    with open(terminal, "w") as screen:
        script = subprocess.Popen([*AS_FROM_A_TERMINAL, "sh", str(TRAIN_BG), *run.args], cwd=run.workdir,
                                  env=process_env(), stdin=subprocess.DEVNULL, stdout=screen,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    training_pid = None
    try:
        shown = wait_for(lambda: re.search(r"training started: PID (\d+)\nlog: (.*)\n", terminal.read_text()),
                         "the PID and the log path")
        training_pid, run.facts["log path shown"] = int(shown.group(1)), shown.group(2)
        # Ctrl+C at the followed log's first line: the run has all its set-up and training still ahead (its
        # last line could come before the signal does).
        wait_for(lambda: "output folder:" in terminal.read_text(), "the followed log's first line")
        run.facts["separate sessions"] = os.getsid(training_pid) != os.getsid(script.pid)

        os.killpg(script.pid, signal.SIGINT)  # Ctrl+C in the terminal that runs the script
        run.facts["finished before Ctrl+C"] = (run.output_dir / "model_final.pth").exists()
        run.facts["script exit code"] = script.wait(timeout=10)
        run.facts["terminal"] = terminal.read_text()

        wait_for(lambda: (run.output_dir / "model_final.pth").is_file(), "model_final.pth")
        wait_for(lambda: run.mlflow_statuses() == ["FINISHED"], "the MLflow run to be FINISHED", interval=0.5)
    finally:
        for group in (script.pid, training_pid):
            if group is not None and is_running(group):
                os.killpg(group, signal.SIGKILL)
        script.wait(timeout=30)
    run.note_the_aftermath()


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def stories(tmp_path_factory, reference):
    workdir = tmp_path_factory.mktemp("signals")
    runs = {"SIGINT": Story(workdir, "sigint"),
            "SIGTERM": Story(workdir, "sigterm", slow_step=3, slow_steps=[ITERS_PER_EPOCH]),
            "twice": Story(workdir, "twice", slow_step=A_VERY_LONG_STEP),
            "train_bg": Story(workdir, "train_bg")}
    plots = {
        "SIGINT": send_once(signal.SIGINT, group=True, when="saved checkpoint checkpoint_00000012.pth"),
        # During the last step of epoch 1: the checkpoint comes before that epoch's evaluation.
        "SIGTERM": send_once(signal.SIGTERM, group=False, when=f"fault: step {ITERS_PER_EPOCH} starts"),
        "twice": press_ctrl_c_twice,
        "train_bg": start_with_train_bg_and_press_ctrl_c,
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        for future in [pool.submit(plots[name], run) for name, run in runs.items()]:
            future.result()

    # After Ctrl+C the user pastes the command it printed, from the repository root.
    sigint = runs["SIGINT"]
    sigint.facts["printed command"] = sigint.first.stderr.strip().splitlines()[-1]
    sigint.resumed = Training(shlex.split(sigint.facts["printed command"])[2:], sigint.workdir, "sigint-resumed",
                              cwd=REPO_ROOT)  # Training runs the same interpreter the command names
    resumed = [runs["SIGINT"].resumed, runs["SIGTERM"].resumed]
    try:
        for training in resumed:
            training.start()
        for training, run in zip(resumed, (runs["SIGINT"], runs["SIGTERM"]), strict=True):
            run.facts["resume exit code"] = training.wait()
    finally:
        for training in resumed:
            training.kill()
    return runs


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_saves_a_checkpoint_and_exits_130(stories, name):
    run = stories[name]
    assert run.facts["exit code"] == 130
    stopped = re.search(rf"training interrupted: stopped by {name} at iteration (\d+); continue it with",
                        run.first.stderr)
    assert stopped, run.first.stderr
    iteration = int(stopped.group(1))
    if name == "SIGTERM":
        assert iteration == ITERS_PER_EPOCH  # the step under way, the last of epoch 1, was finished
    else:  # signalled once checkpoint 12 was on disk (logged by the writer thread, while training went on)
        assert iteration >= 12
    assert f"{name} received: stopping after this step with a checkpoint" in run.facts["log"]
    assert "Traceback" not in run.first.stderr
    assert run.facts["last checkpoint"] == f"checkpoint_{iteration:08d}.pth"
    assert run.facts["its iteration"] == iteration


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_the_interrupted_mlflow_run_is_killed_and_resume_finishes_it(stories, name, reference):
    run = stories[name]
    assert run.facts["mlflow"] == ["KILLED"]
    assert run.facts["resume exit code"] == 0, run.resumed.tail()
    stopped_at = run.facts["its iteration"]
    assert f"resumed from checkpoint_{stopped_at:08d}.pth at iteration {stopped_at}" in run.resumed.stdout
    (mlflow_run,) = runs_of(run.tracking_uri)  # the same run, re-attached
    assert mlflow_run.info.status == "FINISHED"
    assert_same_weights(run.output_dir / "model_final.pth", reference.model_final)
    for key in ("train_loss", "val_acc1", "epoch"):  # every step and every epoch-end evaluation, once
        assert metric_history(run.tracking_uri, mlflow_run.info.run_id, key) == reference.history(key), key


def test_the_printed_resume_command_continues_the_run_from_the_repository_root(stories):
    run = stories["SIGINT"]
    assert run.facts["printed command"].startswith(
        f"{python_command()} tools/train_net.py --config-file config/digits.yaml ")
    assert run.facts["printed command"].endswith(f"OUTPUT_DIR {run.output_dir} --resume")
    assert run.facts["resume exit code"] == 0
    assert f"resumed from checkpoint_{run.facts['its iteration']:08d}.pth" in run.resumed.stdout


def test_a_second_ctrl_c_leaves_at_once_without_a_checkpoint(stories):
    run = stories["twice"]
    assert run.facts["exit code"] == 130
    assert "fault: step 1 runs" not in run.facts["log"]  # it left during the long step, not after it
    goodbye, command = run.first.stderr.strip().splitlines()[-2:]
    assert goodbye == "interrupted at once; continue from the last checkpoint with (from the repository root):"
    assert command.endswith(f"OUTPUT_DIR {run.output_dir} --resume")
    assert "Traceback" not in run.first.stderr
    assert run.facts["checkpoints"] == []
    assert run.facts["mlflow"] == ["KILLED"]


# ---- tools/train_bg.sh ------------------------------------------------------------------------------------------
def test_train_bg_survives_ctrl_c_and_the_training_finishes(stories, reference):
    run = stories["train_bg"]
    assert run.facts["log path shown"] == str(run.output_dir / "log.txt")
    assert run.facts["separate sessions"]  # the training is detached from the script's terminal
    assert not run.facts["finished before Ctrl+C"]  # so Ctrl+C came while it was training
    assert run.facts["script exit code"] == 0
    assert "stopped following; the training goes on" in run.facts["terminal"]
    assert "SIGINT received" not in run.facts["log"]
    assert run.facts["mlflow"] == ["FINISHED"]
    assert_same_weights(run.output_dir / "model_final.pth", reference.model_final)


@pytest.fixture
def fake_repo(tmp_path):
    """A copy of train_bg.sh (and what it sources) in a repository whose python is a stub: it records how it was
    started, writes one log line and exits with $STUB_EXIT (after printing an error when not 0). No training."""
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(TRAIN_BG, repo / "tools" / "train_bg.sh")
    shutil.copy(TRAIN_BG.parent / "output_dir.sh", repo / "tools" / "output_dir.sh")  # which it sources
    stub = repo / ".venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    return repo


STUB_PYTHON = """#!/bin/sh
shift  # tools/train_net.py
output_dir=""; previous=""
for argument in "$@"; do [ "$previous" = OUTPUT_DIR ] && output_dir=$argument; previous=$argument; done
printf '%s\\n' "$@" > "$output_dir/args"
readlink /proc/$$/fd/0 > "$output_dir/stdin"
echo "$0" > "$output_dir/interpreter"
if [ "${STUB_EXIT:-0}" != 0 ]; then echo "error: something the user got wrong" >&2; exit "$STUB_EXIT"; fi
echo "a line of the training log" >> "$output_dir/log.txt"
sleep 1
"""


def run_script(repo, *args, cwd, **env):
    return subprocess.run(["sh", str(repo / "tools" / "train_bg.sh"), *args], cwd=cwd, env=process_env(**env),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_train_bg_picks_output_dir_under_the_repo_and_passes_every_argument(fake_repo, tmp_path):
    done = run_script(fake_repo, "--config-file", "my config.yaml", "TRAIN.LR", "0.1", "--resume", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    log_path = re.search(r"^log: (.*)$", done.stdout, re.MULTILINE).group(1)
    assert re.fullmatch(rf"{fake_repo}/output/\d{{8}}-\d{{6}}/log.txt", log_path)
    output_dir = log_path.rsplit("/", 1)[0]
    args = (tmp_path / output_dir / "args").read_text().splitlines()
    assert args == ["--config-file", "my config.yaml", "TRAIN.LR", "0.1", "--resume", "OUTPUT_DIR", output_dir]
    assert (tmp_path / output_dir / "stdin").read_text().strip() == "/dev/null"
    assert "a line of the training log" in done.stdout  # it followed the log
    assert re.search(r"training \(PID \d+\) exited with status 0", done.stdout)


def test_train_bg_uses_the_given_output_dir_and_falls_back_to_python3(fake_repo, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (fake_repo / ".venv" / "bin" / "python").rename(bin_dir / "python3")
    shutil.rmtree(fake_repo / ".venv")

    done = run_script(fake_repo, "OUTPUT_DIR", "runs/first", "SEED", "1", cwd=tmp_path,
                      PATH=f"{bin_dir}:{os.environ['PATH']}")

    assert done.returncode == 0, done.stderr
    assert "log: runs/first/log.txt" in done.stdout.splitlines()
    assert (tmp_path / "runs/first/args").read_text().splitlines() == ["OUTPUT_DIR", "runs/first", "SEED", "1"]
    assert (tmp_path / "runs/first/interpreter").read_text().strip() == str(bin_dir / "python3")


def test_train_bg_shows_why_a_training_stopped_before_writing_its_log(fake_repo, tmp_path):
    done = run_script(fake_repo, "OUTPUT_DIR", str(tmp_path / "out"), cwd=tmp_path, STUB_EXIT=2)

    assert done.returncode == 2
    assert "error: something the user got wrong" in done.stderr
    assert not (tmp_path / "out" / "log.txt").exists()
