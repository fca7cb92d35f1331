"""The MLflow delivery process (engine/delivery_process.py, engine/mlflow_delivery.py) lives and dies with its
training: Ctrl+C and SIGTERM do not stop it (the training decides when the run ends), and it exits when the
training process is gone, even killed with SIGKILL."""

import os
import signal
import subprocess
import textwrap
import time

from fault_utils import PYTHON, REPO_ROOT, metric_history, process_env, runs_of, sqlite_uri, wait_for

TRAINING = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from engine.tracking import MLflowTracker

    tracker = MLflowTracker(sys.argv[2], "digits")
    tracker.start({"TRAIN.LR": 0.1})
    tracker.log_metrics([("train_loss", 1.0 / step, step) for step in range(1, 11)])
    assert tracker.flush(timeout=120)
    print(tracker.delivery_pid, flush=True)
    time.sleep(600)  # killed by the test
""")


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_the_delivery_process_ignores_stop_signals_and_exits_when_its_training_is_killed(tmp_path):
    tracking_uri = sqlite_uri(tmp_path)
    training = subprocess.Popen([PYTHON, "-c", TRAINING, str(REPO_ROOT), tracking_uri], stdout=subprocess.PIPE,
                                text=True, env=process_env(), start_new_session=True)
    try:
        delivery_pid = int(training.stdout.readline())
        (run,) = runs_of(tracking_uri)
        assert [step for step, _ in metric_history(tracking_uri, run.info.run_id, "train_loss")] == list(range(1, 11))

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # as from Ctrl+C, torchrun or Slurm
            os.kill(delivery_pid, signum)
        time.sleep(1)  # a process that did not ignore them has ended by now
        assert is_running(delivery_pid)

        training.kill()  # SIGKILL: no clean-up in the training process
        training.wait(timeout=30)
        wait_for(lambda: not is_running(delivery_pid), "the delivery process to exit", timeout=60)
    finally:
        if training.poll() is None:
            os.killpg(training.pid, signal.SIGKILL)
        training.wait(timeout=30)


def test_the_delivery_process_imports_mlflow_but_never_torch():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import engine.mlflow_delivery, mlflow; "
            "print('torch' in sys.modules)")
    result = subprocess.run([PYTHON, "-c", code, str(REPO_ROOT)], capture_output=True, text=True, timeout=120,
                            env=process_env())
    assert result.stdout.strip() == "False", result.stderr

