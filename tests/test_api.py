"""The engine as a library: examples/own_model_and_data.py's model, dataset and hook trained through the run API,
from a folder outside the repository, twice in one Python process (as a notebook does), interrupted and resumed
bit for bit, and the same model by its registered name from the command line."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import isolated_training
from fault_utils import empty_store, metric_history, process_env, runs_of, stand_ins

import ptengine
from engine import HookBase, RunResult
from ptengine.tools.train_net import main

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "own_model_and_data.py"
DIGITS_CONFIG = REPO_ROOT / "config" / "digits.yaml"


def load_example():
    spec = importlib.util.spec_from_file_location("own_model_and_data", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SignalAt(HookBase):
    """Sends this process ``signum`` after iteration ``iteration``: Ctrl+C as a notebook's user presses it."""

    def __init__(self, iteration: int, signum: int = signal.SIGINT):
        self.iteration, self.signum = iteration, signum

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), self.signum)


def config_for(example, folder: Path, tracking_uri: str, epochs: int = 2):
    return ptengine.load_config(opts=[
        "OUTPUT_DIR", str(folder), "MLFLOW.TRACKING_URI", tracking_uri, "MLFLOW.EXPERIMENT_NAME", "shapes",
        "DATA.INPUT_DIM", "1", "DATA.NUM_WORKERS", "0", "TRAIN.MAX_EPOCHS", str(epochs), "TRAIN.BATCH_SIZE", "32",
        "TRAIN.LR", "0.05", "TRAIN.GPUS", "0", "LOG.PROGRESS_BAR", "False", "MLFLOW.LOG_MODEL", "False",
        "MLFLOW.SYSTEM_METRICS", "False",
    ])


def train(example, folder: Path, tracking_uri: str, resume: bool = False, hooks=()) -> RunResult:
    torch.manual_seed(0)  # the model's initial weights are made by our code, before the run seeds anything
    model = example.ShapesNet(channels=1, num_classes=2)
    runner = ptengine.Runner(config_for(example, folder, tracking_uri), model=model,
                             train_data=example.Shapes(192, seed=0), val_data=example.Shapes(64, seed=1),
                             hooks=[example.LowestLoss(), *hooks])
    return runner.train(resume=resume)


def process_state() -> dict:
    return {"stdout": sys.stdout, "stderr": sys.stderr, "environment": dict(os.environ),
            "signals": {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)},
            "engine handlers": list(__import__("logging").getLogger("engine").handlers),
            "deterministic": torch.are_deterministic_algorithms_enabled()}


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """Three API runs in this process, as notebook cells: one uninterrupted, one stopped by Ctrl+C, its resume."""
    folder = tmp_path_factory.mktemp("notebook")
    tracking_uri = empty_store(folder / "store")
    example, before, states = load_example(), process_state(), []
    previous_cwd = Path.cwd()
    os.chdir(folder)
    try:
        whole = train(example, folder / "whole", tracking_uri)
        states.append(process_state())
        stopped = train(example, folder / "stopped", tracking_uri, hooks=[SignalAt(9)])
        states.append(process_state())
        resumed = train(example, folder / "stopped", tracking_uri, resume=True)
        states.append(process_state())
    finally:
        os.chdir(previous_cwd)
    return {"whole": whole, "stopped": stopped, "resumed": resumed, "before": before, "after": states,
            "tracking_uri": tracking_uri}


def test_a_run_from_python_returns_its_folder_metrics_mlflow_run_and_model(notebook):
    whole = notebook["whole"]
    assert whole.status == "FINISHED"
    assert (whole.output_dir / "model_final.pth").is_file()
    assert 0.0 <= whole.final_metrics["val_acc1"] <= 1.0 and "val_loss" in whole.final_metrics
    assert whole.best_metrics["val_acc1"] == max(v for _, v in metric_history(
        notebook["tracking_uri"], whole.run_id, "val_acc1"))
    saved = torch.load(whole.output_dir / "model_final.pth", weights_only=True)
    assert all(torch.equal(saved[key], value) for key, value in whole.model.state_dict().items())
    assert len(metric_history(notebook["tracking_uri"], whole.run_id, "train_loss")) == 12  # every step


def test_each_run_leaves_the_process_as_it_found_it(notebook):
    for state in notebook["after"]:
        assert state == notebook["before"]


def test_runs_from_one_process_are_distinct_mlflow_runs_and_ctrl_c_resumes_bit_for_bit(notebook):
    whole, stopped, resumed = notebook["whole"], notebook["stopped"], notebook["resumed"]
    assert stopped.status == "KILLED" and resumed.status == "FINISHED"
    assert resumed.run_id == stopped.run_id != whole.run_id  # the resume re-attaches its own run
    statuses = {run.info.run_id: run.info.status for run in runs_of(notebook["tracking_uri"], experiment="shapes")}
    assert statuses == {whole.run_id: "FINISHED", stopped.run_id: "FINISHED"}
    expected = torch.load(whole.output_dir / "model_final.pth", weights_only=True)
    got = torch.load(resumed.output_dir / "model_final.pth", weights_only=True)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # The example's hook keeps its state under its own state_key through the resume.
    checkpoint = torch.load(resumed.output_dir / "checkpoint_00000012.pth", weights_only=True)
    assert "lowest" in checkpoint["hooks"]["lowest_loss"]


BESIDE_STAND_INS = """
import sys
import datasets, config, tools                      # other packages of those names (tests/fault_utils.stand_ins)
import own_model_and_data
code = own_model_and_data.main(sys.argv[1:])
assert all(getattr(module, "STAND_IN", False) for module in (datasets, config, tools))
assert sys.modules["datasets"] is datasets and sys.modules["config"] is config and sys.modules["tools"] is tools
sys.exit(code)
"""


def test_the_example_trains_from_a_folder_outside_the_repository_beside_packages_of_its_folders_names(tmp_path):
    """As a user runs it after `pip install -e .`: the project found by its installed names, not the cwd, and
    packages named datasets, config and tools installed beside it neither shadowed nor in the way."""
    outside = tmp_path / "my_project"
    outside.mkdir()
    (outside / "own_model_and_data.py").write_text(EXAMPLE.read_text())
    (outside / "beside_stand_ins.py").write_text(BESIDE_STAND_INS)
    tracking_uri = empty_store(tmp_path / "store")
    done = subprocess.run([sys.executable, "beside_stand_ins.py", "--output-dir", "runs/shapes", "--epochs", "1",
                           "--tracking-uri", tracking_uri], cwd=outside,
                          env=process_env(PYTHONPATH=stand_ins(tmp_path)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FINISHED: val_acc1" in done.stdout
    (run,) = runs_of(tracking_uri, experiment="shapes")
    assert run.info.status == "FINISHED" and "val_acc1" in run.data.metrics
    assert run.data.params["TRAIN.MODEL_TYPE"] == "ShapesNet" and run.data.params["DATA.DATASET_TYPE"] == "Shapes"
    assert (outside / "runs" / "shapes" / "model_final.pth").is_file()


def test_a_model_registered_in_a_file_of_yours_trains_from_the_command_line(tmp_path):
    """... beside packages named datasets, config and tools, too."""
    output_dir = tmp_path / "output"
    done = subprocess.run(  # about the model and the saved config: no MLflow run (no delivery process to start)
        [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--import", str(EXAMPLE),
         "--config-file", str(REPO_ROOT / "config" / "digits.yaml"), "TRAIN.MODEL_TYPE", "shapes_net",
         "TRAIN.MAX_EPOCHS", "1", "OUTPUT_DIR", str(output_dir), "MLFLOW.ENABLED", "False"],
        cwd=tmp_path, env=process_env(PYTHONPATH=stand_ins(tmp_path)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved_config = ptengine.load_config(str(output_dir / "config.yaml"))
    assert saved_config.TRAIN.MODEL_TYPE == "shapes_net"
    assert saved_config.IMPORTS == [str(EXAMPLE)]  # a rerun of the run imports it again
    saved = torch.load(output_dir / "model_final.pth", weights_only=True)
    assert "features.0.weight" in saved  # ShapesNet's own layers

    # ... and its weights are evaluated by name with --eval-only (in this process: the same command line).
    evaluation = tmp_path / "evaluation"
    with isolated_training(tmp_path):
        code = main(["--eval-only", "--import", str(EXAMPLE), "--config-file", str(DIGITS_CONFIG),
                     "TRAIN.MODEL_TYPE", "shapes_net", "MODEL.WEIGHTS", str(output_dir / "model_final.pth"),
                     "OUTPUT_DIR", str(evaluation), "MLFLOW.ENABLED", "False", "TRAIN.GPUS", "0"])
    assert code == 0
    assert re.search(r"val_acc1 0\.\d{4}  \(449 images\)", (evaluation / "log.txt").read_text())


def test_an_unknown_import_is_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--import", "nope.py",
                           "--config-file", str(REPO_ROOT / "config" / "digits.yaml")],
                          cwd=tmp_path, env=process_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: IMPORTS: no file nope.py; give the path of a Python file (from {tmp_path}) or a module name"]
    assert not (tmp_path / "output").exists()
