"""The command printed when a run is interrupted restarts what was running: a hook script of the user's with its
hooks, a torchrun job as the same number of processes; a resume on another number of processes says so and is
recorded; and a second process on a run folder in use is refused, while one left by a killed process is not."""

import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest
from fault_utils import (
    REPO_ROOT,
    Training,
    empty_store,
    process_env,
    runs_of,
    small_run_args,
    sqlite_uri,
    wait_for,
    wait_for_log,
)
from torchrun_utils import TORCHRUN, Launch

FAULT_SCRIPT = REPO_ROOT / "tests" / "fault_utils.py"
HOOK_SCRIPT = '''"""A user's training script with a hook of its own (as train_with_hook.py)."""
import os
import signal
import sys

from engine import HookBase
from ptengine.tools.train_net import main


class Mine(HookBase):
    def after_step(self):
        if self.trainer.iter == int(os.environ.get("STOP_AT", "0")):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C, at a known step

    def after_epoch(self):
        print(f"my hook: epoch {self.trainer.epoch + 1} ended at iteration {self.trainer.iter}")


if __name__ == "__main__":
    sys.exit(main(hooks=[Mine()]))
'''
DIGITS = ["--config-file", "config/digits.yaml", "TRAIN.MAX_EPOCHS", "2", "LOG.PROGRESS_BAR", "False",
          "MLFLOW.LOG_MODEL", "False", "MLFLOW.SYSTEM_METRICS", "False"]


def run_printed(command: str, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The printed command, pasted into a shell at the repository root."""
    return subprocess.run(shlex.split(command), cwd=REPO_ROOT, env=env or process_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_the_printed_command_of_a_hook_script_resumes_with_its_hooks(tmp_path):
    script = tmp_path / "my_training.py"
    script.write_text(HOOK_SCRIPT)
    tracking_uri = empty_store(tmp_path / "store")
    args = [*DIGITS, "OUTPUT_DIR", str(tmp_path / "run"), "MLFLOW.TRACKING_URI", tracking_uri]
    first = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), str(script), *args], cwd=REPO_ROOT,
                           env=process_env(STOP_AT=7), capture_output=True, text=True, timeout=600)
    assert first.returncode == 130, first.stderr[-2000:]
    command = first.stderr.strip().splitlines()[-1]
    assert command.startswith(f".venv/bin/python {script} --config-file config/digits.yaml ")
    assert command.endswith(f"OUTPUT_DIR {tmp_path / 'run'} --resume")

    resumed = run_printed(command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint_00000007.pth at iteration 7" in resumed.stdout
    assert "my hook: epoch 2 ended at iteration 44" in resumed.stdout  # the user's hook is back
    (run,) = runs_of(tracking_uri)
    assert run.info.status == "FINISHED"
    assert str(script) in run.data.tags["command"]


@pytest.fixture(scope="module")
def interrupted_torchrun(tmp_path_factory):
    """2 processes under torchrun, stopped by Slurm's SIGUSR1 to both at step 5 (slowed there to aim at)."""
    folder = tmp_path_factory.mktemp("torchrun")
    tracking_uri = empty_store(folder / "store")
    args = [*DIGITS, "TRAIN.DISTRIBUTED_BACKEND", "ddp", "TRAIN.BATCH_SIZE", "64", "LOG.PERIOD", "5",
            "OUTPUT_DIR", folder / "run",
            "MLFLOW.TRACKING_URI", tracking_uri]
    launch = Launch([TORCHRUN, "--standalone", "--nproc_per_node", "2", FAULT_SCRIPT, *args], REPO_ROOT,
                    folder / "torchrun.log", process_env(FAULT_SLOW_STEP=3, FAULT_SLOW_STEPS=5))
    try:
        wait_for(lambda: "step 5 starts" in launch.log_path.read_text(), "step 5", process=launch.process)
        for pid in launch.workers().values():  # Slurm signals every process of the step
            os.kill(pid, signal.SIGUSR1)
        launch.wait(time.monotonic() + 300)
    finally:
        launch.kill()
    return folder, launch


def test_the_printed_command_of_torchrun_resumes_as_the_same_processes(interrupted_torchrun):
    folder, launch = interrupted_torchrun
    output = launch.log_path.read_text()
    assert output.count("continue it with") == 1, output[-3000:]  # only rank 0 prints
    assert output.count("SIGUSR1 received: stopping after this step") == 1, output[-3000:]
    lines = output.splitlines()
    command = lines[lines.index(next(line for line in lines if "continue it with" in line)) + 1]
    assert command.startswith(".venv/bin/torchrun --standalone --nproc_per_node 2 tests/fault_utils.py "
                              "--config-file config/digits.yaml "), command
    assert command.endswith(f"OUTPUT_DIR {folder / 'run'} --resume")

    copy = folder / "copy"  # the same checkpoint, for the resume on one process below
    shutil.copytree(folder / "run", copy / "run")
    shutil.copytree(folder / "store", copy / "store")
    resumed = run_printed(command, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "resumed from checkpoint_00000005.pth at iteration 5" in resumed.stdout
    assert "process(es) with" not in resumed.stdout + resumed.stderr  # the same world size: no warning
    (run,) = runs_of(sqlite_uri(folder / "store"))
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"


def test_a_resume_on_another_number_of_processes_warns_and_is_recorded(interrupted_torchrun):
    folder, _ = interrupted_torchrun
    copy = folder / "copy"
    resumed = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "tools/train_net.py", *DIGITS,
                              "TRAIN.DISTRIBUTED_BACKEND", "ddp", "TRAIN.BATCH_SIZE", "64", "LOG.PERIOD", "5",
                              "OUTPUT_DIR", str(copy / "run"), "MLFLOW.TRACKING_URI", sqlite_uri(copy / "store"),
                              "--resume"], cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stdout.splitlines() if "resuming a run of 2 process(es) with 1" in line]
    assert len(warnings) == 1, resumed.stdout[-3000:]
    (run,) = runs_of(sqlite_uri(copy / "store"))
    assert run.data.tags["world_size"] == "1"
    assert run.data.tags["resumed_at_iteration_5"] == "world_size 2 -> 1"


def test_a_second_process_on_a_run_folder_in_use_is_refused_and_a_killed_ones_folder_and_run_are_not(tmp_path):
    tracking_uri = empty_store(tmp_path / "store")
    args = small_run_args(tmp_path / "run", tracking_uri, "TRAIN.MAX_EPOCHS", "2")
    with Training(args, tmp_path, name="first", slow_step=2.0, slow_steps=(3,)) as first:
        wait_for_log(tmp_path / "run", "step 3 starts", first.process)
        second = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "tools/train_net.py", *args,
                                 "--resume"], cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"error: OUTPUT_DIR {tmp_path / 'run'} is in use by process {first.pid} on ")
        assert "wait for that training to end (or stop it), or choose another OUTPUT_DIR" in line
        os.kill(first.pid, signal.SIGKILL)  # kill -9 of the training process alone (as the OOM killer does)
        first.wait()
        # Its lock goes with it, and its MLflow run does not stay RUNNING: the delivery process marks it FAILED.
        wait_for(lambda: [run.info.status for run in runs_of(tracking_uri)] == ["FAILED"], "the run FAILED")
    resumed = Training([*args, "--resume"], tmp_path, name="resumed").start()
    assert resumed.wait() == 0, resumed.tail()
    assert "in use by" not in resumed.stderr
    assert [run.info.status for run in runs_of(tracking_uri)] == ["FINISHED"]  # the killed run, re-attached

