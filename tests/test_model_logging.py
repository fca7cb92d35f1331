"""The trained model in MLflow, logged at the end of training (``MLFLOW.LOG_MODEL``) as ``runs:/<run id>/model``.

In MLflow 3 a logged model is a LoggedModel entity of the experiment, linked to the run that made it. Ours is a
pyfunc (``engine/image_classifier.py``) that takes images and answers class names; the plain module is its
artifact ``pytorch_model``:

    mlflow.set_tracking_uri(tracking_uri)
    classifier = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    module = mlflow.pytorch.load_model(f"runs:/{run_id}/model/artifacts/pytorch_model")

One 1-epoch digits run (model logged, the default) is shared by the module.
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from conftest import isolated_training
from fault_utils import empty_store
from mlflow.entities import LoggedModelStatus
from PIL import Image

from engine.checkpoint import load_file
from engine.run import RUN_ID_FILE
from ptengine.config import load_config
from ptengine.datasets import build_datasets
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
    assert model.name == "model"  # runs:/<run id>/model
    assert model.model_type == "simple_cnn-digits"  # what it is: model type and dataset
    assert model.source_run_id == digits["run"].info.run_id
    assert model.status == LoggedModelStatus.READY


def test_the_run_is_finished_after_the_model_was_logged(digits):
    assert digits["run"].info.status == "FINISHED"


def test_the_logged_model_computes_what_model_final_computes(digits):
    cfg = digits["cfg"]
    with tracking_uri(cfg.MLFLOW.TRACKING_URI):
        logged = mlflow.pytorch.load_model(f"runs:/{digits['run'].info.run_id}/model/artifacts/pytorch_model")

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


def test_the_module_is_stored_in_pt2_format_inside_the_image_model(digits, tmp_path):
    network = model_files(digits, tmp_path) / "artifacts" / "pytorch_model"
    mlmodel = yaml.safe_load((network / "MLmodel").read_text())

    assert (network / "data" / "model.pt2").is_file()
    assert mlmodel["flavors"]["pytorch"]["model_data"] == "data"
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 1, 32, 32]}


def test_the_image_model_records_its_preprocessing_signature_and_a_png_input_example(digits, tmp_path):
    folder = model_files(digits, tmp_path)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    splits = build_datasets(digits["cfg"])

    config = mlmodel["flavors"]["python_function"]["config"]
    assert config["class_names"] == [str(digit) for digit in range(10)]
    assert (config["channels"], config["height"], config["width"]) == (1, 32, 32)
    assert config["mean"] == pytest.approx(splits.mean) and config["std"] == pytest.approx(splits.std)
    assert json.loads(mlmodel["signature"]["inputs"]) == [{"type": "binary", "name": "image", "required": True}]
    assert [column["name"] for column in json.loads(mlmodel["signature"]["outputs"])] == \
        ["class", "probability", "probabilities"]
    example = json.loads((folder / mlmodel["saved_input_example_info"]["artifact_path"]).read_text())
    png = base64.b64decode(example["data"][0][0])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), splits.val.images[0, 0].numpy())


def test_the_image_model_takes_arrays_and_files_and_answers_as_the_module_does(digits, tmp_path):
    cfg = digits["cfg"]
    run_id = digits["run"].info.run_id
    with tracking_uri(cfg.MLFLOW.TRACKING_URI):
        classifier = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        module = mlflow.pytorch.load_model(f"runs:/{run_id}/model/artifacts/pytorch_model")
    images = build_datasets(cfg).val.images[:8]
    png = io.BytesIO()
    Image.fromarray(images[0, 0].numpy()).save(png, format="PNG")
    batch = next(iter(build_data(cfg, torch.device("cpu")).val.epoch(0))).images[:8]

    answer = classifier.predict({"image": [png.getvalue()] + [image[0].numpy() for image in images]})
    with torch.no_grad():
        expected = torch.softmax(module(batch), dim=1)
    names = [cfg.DATA.CLASSES[index] for index in expected.argmax(1)]
    assert list(answer["class"]) == names[:1] + names  # the PNG of image 0, then the 8 arrays (H x W, grey)
    assert list(answer["probability"][1:]) == pytest.approx(expected.max(1).values.tolist(), abs=1e-5)


def test_a_served_model_answers_a_request_made_from_a_png(digits, tmp_path):
    cfg = digits["cfg"]
    run_id = digits["run"].info.run_id
    png = io.BytesIO()
    Image.fromarray(build_datasets(cfg).val.images[0, 0].numpy()).save(png, format="PNG")
    with tracking_uri(cfg.MLFLOW.TRACKING_URI):
        expected = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict({"image": [png.getvalue()]})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    venv_bin = Path(sys.executable).parent  # mlflow starts uvicorn from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.MLFLOW.TRACKING_URI,
           "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(venv_bin / "mlflow"), "models", "serve", "--env-manager",
                               "local", "-m", f"runs:/{run_id}/model", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    request = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png.getvalue()).decode()]]}}
    try:
        answer = post_when_up(f"http://127.0.0.1:{port}/invocations", request, server)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    [row] = answer["predictions"]
    assert row["class"] == expected["class"][0]
    assert row["probabilities"] == pytest.approx(expected["probabilities"][0])


def post_when_up(url: str, body: dict, server: subprocess.Popen, attempts: int = 600) -> dict:
    """POST ``body`` as JSON once the server answers (it starts in a few seconds; it may not die meanwhile)."""
    import urllib.error
    import urllib.request

    for _ in range(attempts):
        assert server.poll() is None, "mlflow models serve exited"
        try:
            request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise AssertionError(f"{url} never answered")


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
