"""Shared fixtures: isolated in-process trainings and one real digits run reused by the end-to-end tests.

Every training here writes into a temporary folder and a temporary MLflow store
(``sqlite:///<tmp>/mlflow.db``, artifacts beside it), never into the repository.
"""

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch
from fault_utils import empty_store

from engine.logger import restore_streams

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_CONFIG = REPO_ROOT / "config" / "digits.yaml"
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "_MLFLOW_SERVER_ARTIFACT_ROOT")
# A developer's own MLFLOW_TRACKING_URI must not receive the suite's runs: every test names its own store.
for _name in MLFLOW_ENV:
    os.environ.pop(_name, None)
# One torch thread in the test processes, as in the trainings they start (fault_utils.process_env): two pytest
# workers and their subprocesses share the cores, and torch's OpenMP threads spin-waiting for a thread that
# has no core made an in-process training take 40 s instead of 4.
torch.set_num_threads(1)
# Temporary folders (pytest's tmp_path, and TMPDIR for the processes the tests start) in memory where the machine
# has a tmpfs: the trainings fsync every checkpoint and every MLflow transaction, and with the workers' processes
# writing at once those waits added up to tens of seconds of idle cores. The fsync calls are still made.
if "TMPDIR" not in os.environ and os.access("/dev/shm", os.W_OK) and os.statvfs("/dev/shm").f_bavail * \
        os.statvfs("/dev/shm").f_frsize > 4 << 30:
    os.environ["TMPDIR"] = "/dev/shm"
    tempfile.tempdir = None  # re-read on next use


@contextlib.contextmanager
def isolated_training(workdir: Path):
    """Run in-process trainings from ``workdir`` and undo what ``train()`` changes in the process.

    ``train()`` tees stdout/stderr into log.txt, points the ``engine`` logger at that tee, and sets the
    MLflow artifact-root variable of the first store it opens; all three are put back afterwards.
    """
    saved_env = {name: os.environ.pop(name, None) for name in MLFLOW_ENV}
    previous_cwd = Path.cwd()
    os.chdir(workdir)  # anything written to ./mlruns by mistake lands here, where tests look for it
    try:
        yield
    finally:
        os.chdir(previous_cwd)
        logging.getLogger("engine").handlers.clear()  # detach the logger first, then close the tee
        restore_streams()
        for name, value in saved_env.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


@pytest.fixture
def run_dir(tmp_path):
    """A scratch folder (the cwd during the test) with ``output/`` and an empty MLflow store ``store/mlflow.db``."""
    empty_store(tmp_path / "store")
    with isolated_training(tmp_path):
        yield tmp_path


@pytest.fixture
def small_run_opts(run_dir):
    """Command-line overrides for a quick run on 256 synthetic images (6 iterations per epoch)."""
    return [
        "DATA.DATASET_TYPE", "synthetic", "DATA.SYNTHETIC_SIZE", "256", "TRAIN.BATCH_SIZE", "32",
        "TRAIN.MAX_EPOCHS", "1", "LOG.PROGRESS_BAR", "False", "MLFLOW.LOG_MODEL", "False",
        "OUTPUT_DIR", str(run_dir / "output"),
        "MLFLOW.TRACKING_URI", f"sqlite:///{run_dir / 'store' / 'mlflow.db'}",
    ]


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory):
    """One full ``config/digits.yaml`` training, shared by every test that inspects a finished run.

    Returns a dict with ``opts`` (the command-line overrides used), ``output_dir``, ``tracking_uri``,
    ``run_id``, ``workdir`` (the cwd of the run) and ``exit_code``.
    """
    from ptengine.tools.train_net import main

    workdir = tmp_path_factory.mktemp("digits_run")
    output_dir = workdir / "output"
    tracking_uri = f"sqlite:///{workdir / 'store' / 'mlflow.db'}"
    opts = ["OUTPUT_DIR", str(output_dir), "MLFLOW.TRACKING_URI", tracking_uri, "LOG.PROGRESS_BAR", "False"]
    with isolated_training(workdir):
        exit_code = main(["--config-file", str(DIGITS_CONFIG), *opts])
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return {
        "opts": opts, "output_dir": output_dir, "tracking_uri": tracking_uri, "workdir": workdir,
        "run_id": runs[0].info.run_id if len(runs) == 1 else None, "exit_code": exit_code,
    }


# Longest first: pytest-xdist (--dist loadfile) hands each worker a whole module in collection order, so the
# modules that start many processes or wait on clocks go out first and the short ones fill the gaps at the end.
# The order is that of each module's measured wall time in a full run (--durations=0, summed by module):
# test_resume (~90 s, mostly waiting on its killed processes and the shared reference run) first, so that its
# waits overlap the CPU-bound torchrun launches of test_distributed on another worker.
LONGEST_MODULES = ["test_resume.py", "test_distributed.py", "test_mlflow_outage.py", "test_restart_commands.py",
                   "test_bad_input.py", "test_benchmark.py", "test_signals.py", "test_api.py", "test_ranks_agree.py",
                   "test_end_to_end.py", "test_model_logging.py", "test_recipe.py", "test_first_hour.py",
                   "test_evaluation.py", "test_second_hour.py", "test_run_record.py", "test_mlflow_ui.py",
                   "test_devices.py", "test_worker_signals.py", "test_recipe_faults.py"]


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
