"""Clusters stop trainings: Slurm's SIGUSR1 warning before a time limit, and tools/slurm_train.sh, which
passes that warning on to torchrun and requeues the job.

SIGUSR1 is sent by a hook passed to ``train_net.main(hooks=...)``, in this process. The sbatch script runs
with ``sh`` against fake ``srun``, ``scancel``, ``scontrol`` and ``nvidia-smi`` that write down how they were
called: the script's own logic, without Slurm.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fault_utils import runs_of

from engine import HookBase
from ptengine.datasets.batches import dataloader_workers
from ptengine.tools.train_net import main

REPO = Path(__file__).resolve().parent.parent
SLURM_TRAIN = REPO / "tools" / "slurm_train.sh"


class SignalAt(HookBase):
    """Sends ``signum`` to this process after step ``step``, as ``kill -USR1 PID`` (or Slurm) would."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def after_step(self):
        if self.trainer.iter == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigusr1_saves_a_checkpoint_marks_the_run_killed_and_exits_130(small_run_opts, run_dir):
    not_taken = []  # the training must take SIGUSR1 over; if it does not, this handler sees it (no crash)
    previous = signal.signal(signal.SIGUSR1, lambda *_: not_taken.append(True))
    try:
        code = main(small_run_opts, hooks=[SignalAt(3, signal.SIGUSR1)])
    finally:
        signal.signal(signal.SIGUSR1, previous)

    assert code == 130 and not not_taken
    output_dir = run_dir / "output"
    log = (output_dir / "log.txt").read_text()  # what the run printed, stderr included
    assert "SIGUSR1 received: stopping after this step with a checkpoint" in log
    assert "training interrupted: stopped by SIGUSR1 at iteration 3; continue it with" in log
    assert log.rstrip().endswith(f"OUTPUT_DIR {output_dir} --resume")  # the command that continues it
    assert (output_dir / "last_checkpoint").read_text() == "checkpoint_00000003.pth"
    assert not (output_dir / "model_final.pth").exists()
    (run,) = runs_of(f"sqlite:///{run_dir / 'store' / 'mlflow.db'}", experiment="synthetic")
    assert run.info.status == "KILLED"


# ---- tools/slurm_train.sh --------------------------------------------------------------------------------------
FAKES = {
    # The training: writes down its arguments, runs until SIGUSR1 reaches it (then exits 1, as torchrun does
    # when its workers stopped), or exits at once with $FAKE_SRUN_EXIT.
    "srun": """printf '%s\\n' "$@" > "$CALLS/srun"; echo $$ > "$CALLS/srun.pid"
[ -n "${FAKE_SRUN_EXIT:-}" ] && exit "$FAKE_SRUN_EXIT"
trap 'exit 1' USR1
while :; do sleep 0.05; done""",
    "scancel": """printf '%s\\n' "$@" > "$CALLS/scancel"; kill -USR1 "$(cat "$CALLS/srun.pid")\"""",
    "scontrol": """if [ "$1" = show ]; then printf 'node-a\\nnode-b\\n'
else printf '%s\\n' "$@" > "$CALLS/scontrol"; fi""",
    "nvidia-smi": """printf 'GPU 0: A\\nGPU 1: B\\n'""",
}


@pytest.fixture
def slurm(tmp_path):
    """A repository folder to submit from, fake Slurm commands on PATH, and the folder of their records."""
    repo, fakes, calls = tmp_path / "repo", tmp_path / "bin", tmp_path / "calls"
    for folder in (repo / "tools", fakes, calls):
        folder.mkdir(parents=True)
    (repo / "tools" / "train_net.py").touch()
    shutil.copy(SLURM_TRAIN.parent / "output_dir.sh", repo / "tools")  # the script sources it from the repository
    for name, body in FAKES.items():
        (fakes / name).write_text(f"#!/bin/sh\n{body}\n")
        (fakes / name).chmod(0o755)
    env = {"PATH": f"{fakes}:/usr/bin:/bin", "CALLS": str(calls), "SLURM_SUBMIT_DIR": str(repo),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]"}
    return {"repo": repo, "calls": calls, "env": env, "output_dir": tmp_path / "shared" / "run"}


def start_job(slurm, *extra_args, **env) -> subprocess.Popen:
    args = ["--config-file", "config/digits.yaml", "OUTPUT_DIR", str(slurm["output_dir"]), *extra_args]
    return subprocess.Popen(["sh", str(SLURM_TRAIN), *args], env={**slurm["env"], **env}, cwd=slurm["calls"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def recorded(slurm, command: str) -> list[str]:
    path = slurm["calls"] / command
    return path.read_text().splitlines() if path.is_file() else []


def test_slurm_train_runs_torchrun_on_every_node_and_requeues_the_job_on_sigusr1(slurm):
    job = start_job(slurm)
    deadline = time.monotonic() + 30
    while not (slurm["calls"] / "srun.pid").is_file():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.02)

    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 does 90 s before the time limit
    out, err = job.communicate(timeout=30)

    assert job.returncode == 1, err  # the training's exit status
    assert recorded(slurm, "srun") == [
        "--kill-on-bad-exit=1", str(slurm["repo"] / ".venv" / "bin" / "torchrun"),
        "--nnodes", "2", "--nproc_per_node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:19242", "--rdzv-id", "4242", "--max-restarts", "3",
        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "75",
        "tools/train_net.py", "--config-file", "config/digits.yaml", "OUTPUT_DIR", str(slurm["output_dir"]),
        "TRAIN.DISTRIBUTED_BACKEND", "ddp"]
    assert recorded(slurm, "scancel") == ["--signal=USR1", "4242"]  # passed on to the job's processes
    assert recorded(slurm, "scontrol") == ["requeue", "4242"]
    assert "the training checkpoints and stops; the job is requeued" in out


def test_a_requeued_job_resumes_and_a_finished_one_is_not_requeued(slurm):
    job = start_job(slurm, SLURM_RESTART_COUNT="1", FAKE_SRUN_EXIT="0")
    out, err = job.communicate(timeout=30)

    assert job.returncode == 0, err
    assert recorded(slurm, "srun")[-3:] == ["--resume", "TRAIN.DISTRIBUTED_BACKEND", "ddp"]
    assert recorded(slurm, "scancel") == [] and recorded(slurm, "scontrol") == []


def rendezvous_of(slurm, **env) -> list[str]:
    """The torchrun arguments between --nproc_per_node N and --max-restarts of a job that ends at once."""
    job = start_job(slurm, FAKE_SRUN_EXIT="0", **env)
    job.communicate(timeout=30)
    srun = recorded(slurm, "srun")
    return srun[srun.index("--nproc_per_node") + 2:srun.index("--max-restarts")]


def test_jobs_sharing_a_head_node_each_have_their_own_rendezvous(slurm):
    # A fixed port made the second job a client of the first one's store, torn down when the first ended.
    first, second = rendezvous_of(slurm), rendezvous_of(slurm, SLURM_JOB_ID="4243")
    assert first == ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:19242", "--rdzv-id", "4242"]
    assert second == ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:19243", "--rdzv-id", "4243"]
    assert rendezvous_of(slurm, RDZV_PORT="23456")[3] == "node-a:23456"


def test_a_one_node_job_rendezvous_on_a_free_port_of_its_own(slurm):
    assert rendezvous_of(slurm, SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node-a") == ["--standalone"]


def test_the_job_asks_for_cpus_for_its_dataloader_workers():
    assert "#SBATCH --cpus-per-gpu=8" in SLURM_TRAIN.read_text().splitlines()


def test_dataloader_workers_are_sized_from_the_cpus_this_process_may_use(monkeypatch):
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})  # as Slurm's --cpus-per-gpu or taskset confine a process
        assert dataloader_workers(8) == 1
    finally:
        os.sched_setaffinity(0, allowed)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(len(allowed)))  # torchrun's processes of this node share them
    assert dataloader_workers(8) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert dataloader_workers(8) == min(8, len(allowed)) and dataloader_workers(0) == 0


def test_slurm_train_without_output_dir_is_one_error_line(slurm):
    done = subprocess.run(["sh", str(SLURM_TRAIN), "--config-file", "config/digits.yaml"], env=slurm["env"],
                          capture_output=True, text=True, timeout=30)

    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: add OUTPUT_DIR <folder every node sees>: a requeued job continues the run found there"]
    assert recorded(slurm, "srun") == []
