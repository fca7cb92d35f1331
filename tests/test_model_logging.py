"""The trained model in MLflow: ``mlflow.pytorch.log_model`` at the end of training (``MLFLOW.LOG_MODEL``).

In MLflow 3 a logged model is a LoggedModel entity of the experiment, linked to the run that made it:

    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")

One 1-epoch digits run (model logged, the default) is shared by the module.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml
from conftest import isolated_training
from fault_utils import empty_store
from mlflow.entities import LoggedModelStatus

from engine.checkpoint import load_file
from engine.run import RUN_ID_FILE
from ptengine.config import load_config
from ptengine.networks import build_model
from ptengine.tools.build import build_data
from ptengine.tools.train_net import main

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_YAML = str(REPO_ROOT / "config" / "digits.yaml")


def train(workdir: Path, output_dir: Path, *opts: str) -> tuple[mlflow.entities.Run, str | None]:
    """Train in-process from ``workdir`` into ``output_dir`` and the store ``workdir/store``.

    Returns the run, and MLFLOW_TRACKING_URI as the training left it in the environment (unset before).
    """
    tracking_uri = empty_store(workdir / "store")
    with isolated_training(workdir):
        exit_code = main([*opts, "OUTPUT_DIR", str(output_dir), "MLFLOW.TRACKING_URI", tracking_uri,
                          "LOG.PROGRESS_BAR", "False"])
        uri_left_in_environment = os.environ.get("MLFLOW_TRACKING_URI")
    assert exit_code == 0
    run = mlflow.MlflowClient(tracking_uri).get_run((output_dir / RUN_ID_FILE).read_text().strip())
    return run, uri_left_in_environment


def logged_models(run) -> list:
    return mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                       filter_string=f"source_run_id = '{run.info.run_id}'")


@contextmanager
def tracking_uri(uri: str):
    """``mlflow.set_tracking_uri`` for the fluent API inside the block, then back as it was.

    ``set_tracking_uri`` also sets the MLFLOW_TRACKING_URI environment variable, which later runs would read.
    """
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if previous_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("model_logging")
    output_dir = workdir / "output"
    run, uri_left_in_environment = train(workdir, output_dir, "--config-file", DIGITS_YAML, "TRAIN.MAX_EPOCHS", "1")
    cfg = load_config(str(output_dir / "config.yaml"))
    with tracking_uri(cfg.MLFLOW.TRACKING_URI):
        models = logged_models(run)
    return {"workdir": workdir, "output_dir": output_dir, "run": run, "cfg": cfg, "models": models,
            "uri_left_in_environment": uri_left_in_environment}


def test_the_trained_model_is_logged_once_linked_to_its_run(digits):
    assert len(digits["models"]) == 1
    model = digits["models"][0]
    assert model.name == "simple_cnn-digits"  # what it is: model type and dataset
    assert model.source_run_id == digits["run"].info.run_id
    assert model.status == LoggedModelStatus.READY


def test_the_run_is_finished_after_the_model_was_logged(digits):
    assert digits["run"].info.status == "FINISHED"


def test_the_logged_model_computes_what_model_final_computes(digits):
    cfg = digits["cfg"]
    with tracking_uri(cfg.MLFLOW.TRACKING_URI):
        logged = mlflow.pytorch.load_model(f"models:/{digits['models'][0].model_id}")

    trained = build_model(cfg)
    trained.load_state_dict(load_file(digits["output_dir"] / "model_final.pth"))
    trained.eval()
    batch = next(iter(build_data(cfg, torch.device("cpu")).val.epoch(0)))  # 64 normalised validation images

    with torch.no_grad():
        expected, actual = trained(batch.images), logged(batch.images)
    assert actual.shape == (cfg.TRAIN.BATCH_SIZE, 10)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert torch.equal(actual.argmax(1), expected.argmax(1))


def model_files(digits, tmp_path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=digits["models"][0].artifact_location,
                                                    dst_path=str(tmp_path)))


def test_the_model_is_stored_in_pt2_format_with_an_input_example_and_a_signature(digits, tmp_path):
    folder = model_files(digits, tmp_path)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())

    assert (folder / "data" / "model.pt2").is_file()
    assert mlmodel["flavors"]["pytorch"]["model_data"] == "data"
    example = json.loads((folder / mlmodel["saved_input_example_info"]["artifact_path"]).read_text())
    assert torch.tensor(example).shape == (2, 1, 32, 32)  # two validation images
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 1, 32, 32]}


def test_the_model_requirements_pin_torch_and_do_not_mistake_our_datasets_package_for_hf_datasets(digits, tmp_path):
    requirements = (model_files(digits, tmp_path) / "requirements.txt").read_text().split()
    names = [line.split("==")[0].lower() for line in requirements]

    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert "datasets" not in names


def test_log_model_false_logs_no_model(digits):
    output_dir = digits["workdir"] / "no_model"
    run, uri_left_in_environment = train(digits["workdir"], output_dir, "DATA.DATASET_TYPE", "synthetic",
                                         "DATA.SYNTHETIC_SIZE", "128", "TRAIN.BATCH_SIZE", "32",
                                         "TRAIN.MAX_EPOCHS", "1", "MLFLOW.LOG_MODEL", "False")

    assert run.info.status == "FINISHED"
    with tracking_uri(digits["cfg"].MLFLOW.TRACKING_URI):
        assert logged_models(run) == []
    assert (output_dir / "model_final.pth").is_file()  # the weights are still saved
    assert uri_left_in_environment is None


def test_logging_the_model_leaves_the_environment_of_the_process_alone(digits):
    assert digits["uri_left_in_environment"] is None
