"""Evaluation: what a training run logs after its final evaluation, and ``--eval-only MODEL.WEIGHTS <path>``.

One digits training (2 epochs, ~15 s) is shared by the module; every eval-only run below evaluates its
weights, in-process through ``tools.train_net.main`` (the same code path as the command line).

    python tools/train_net.py --config-file config/digits.yaml --eval-only MODEL.WEIGHTS output/run1/model_final.pth
"""

import pickle
from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pytest
import torch
from conftest import isolated_training
from fault_utils import empty_store

import ptengine.datasets.cifar10 as cifar10
from engine.figures import confusion_matrix_figure
from engine.run import RUN_ID_FILE
from ptengine.config import load_config
from ptengine.config.defaults import CIFAR10_CLASSES
from ptengine.datasets import build_datasets
from ptengine.networks import build_model
from ptengine.tools.train_net import main

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_YAML = str(REPO_ROOT / "config" / "digits.yaml")
DIGIT_NAMES = [str(digit) for digit in range(10)]


def train_net(workdir: Path, *args: str) -> int:
    """``python tools/train_net.py ARGS`` run in-process from ``workdir``; returns the exit code."""
    with isolated_training(workdir):
        return main(list(args))


def run_of(output_dir: Path, client) -> mlflow.entities.Run:
    """The MLflow run a training or evaluation wrote into ``output_dir`` (its id is saved there)."""
    return client.get_run((output_dir / RUN_ID_FILE).read_text().strip())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch digits run (no logged model: not the subject here) and the options to reuse its store."""
    workdir = tmp_path_factory.mktemp("evaluation")
    tracking_uri = empty_store(workdir / "store")
    common = ["MLFLOW.TRACKING_URI", tracking_uri, "LOG.PROGRESS_BAR", "False", "MLFLOW.LOG_MODEL", "False"]
    output_dir = workdir / "train"
    exit_code = train_net(workdir, "--config-file", DIGITS_YAML, "TRAIN.MAX_EPOCHS", "2",
                          "OUTPUT_DIR", str(output_dir), *common)
    assert exit_code == 0
    client = mlflow.MlflowClient(tracking_uri)
    run = run_of(output_dir, client)
    val_acc1 = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_acc1"))
    return {"workdir": workdir, "common": common, "output_dir": output_dir, "client": client, "run": run,
            "val_acc1": val_acc1, "cfg": load_config(DIGITS_YAML, ["TRAIN.MAX_EPOCHS", "2"])}


def eval_only(trained, weights, *opts: str, name: str = "eval") -> tuple[int, Path]:
    """``--eval-only MODEL.WEIGHTS weights`` on the digits config, into its own OUTPUT_DIR."""
    output_dir = trained["workdir"] / name
    exit_code = train_net(trained["workdir"], "--config-file", DIGITS_YAML, "--eval-only", "MODEL.WEIGHTS",
                          str(weights), "OUTPUT_DIR", str(output_dir), *trained["common"], *opts)
    return exit_code, output_dir


def per_class(client, run, split: str, step: int, folder: Path) -> dict[str, tuple[float, int]]:
    """The per-class table of one evaluation: class name -> (accuracy, number of images)."""
    import json

    table = f"per_class_accuracy/{split}_step_{step:08d}.json"
    data = json.loads(download(client, run, table, folder / run.info.run_id).read_text())
    assert data["columns"] == ["class", "accuracy", "images"]
    return {name: (accuracy, images) for name, accuracy, images in data["data"]}


def download(client, run, artifact: str, folder: Path) -> Path:
    return Path(client.download_artifacts(run.info.run_id, artifact, str(folder)))


# ---- the training run ----------------------------------------------------------------------------------------
def test_training_logs_a_per_class_accuracy_table_at_every_evaluation(trained, tmp_path):
    run = trained["run"]
    class_sizes = torch.bincount(build_datasets(trained["cfg"]).val.labels, minlength=10).tolist()
    for step, val_acc1 in trained["val_acc1"]:
        table = per_class(trained["client"], run, "val", step, tmp_path)
        assert list(table) == DIGIT_NAMES
        assert [images for _, images in table.values()] == class_sizes
        # Weighted by the number of validation images of each class they give back the overall accuracy.
        overall = sum(accuracy * images for accuracy, images in table.values()) / sum(class_sizes)
        assert overall == pytest.approx(val_acc1, abs=1e-9)
        assert all(0.0 <= accuracy <= 1.0 for accuracy, _ in table.values())


def test_training_logs_the_confusion_matrix_figure(trained, tmp_path):
    png = download(trained["client"], trained["run"], "confusion_matrix.png", tmp_path)
    height, width, _ = matplotlib.image.imread(png).shape
    assert height >= 400 and width >= 400


def test_the_confusion_matrix_figure_names_the_classes_and_shows_the_counts():
    confusion = torch.tensor([[5, 1, 0], [2, 7, 0], [0, 0, 9]])
    figure = confusion_matrix_figure(confusion, ["cat", "dog", "horse"])
    axes = figure.axes[0]

    assert [label.get_text() for label in axes.get_xticklabels()] == ["cat", "dog", "horse"]
    assert [label.get_text() for label in axes.get_yticklabels()] == ["cat", "dog", "horse"]
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("predicted", "true")
    assert [text.get_text() for text in axes.texts] == ["5", "1", "0", "2", "7", "0", "0", "0", "9"]
    assert "0.875" in axes.get_title()  # 21 of 24 on the diagonal


# ---- --eval-only ---------------------------------------------------------------------------------------------
def test_eval_only_of_model_final_gives_the_final_validation_accuracy_of_training(trained, tmp_path):
    exit_code, output_dir = eval_only(trained, trained["output_dir"] / "model_final.pth", name="eval_final")
    assert exit_code == 0

    evaluation = run_of(output_dir, trained["client"])
    training = trained["run"]
    assert evaluation.info.status == "FINISHED"
    assert evaluation.data.tags["mode"] == "eval-only"
    assert evaluation.data.metrics["val_acc1"] == training.data.metrics["val_acc1"]
    assert evaluation.data.metrics["val_loss"] == pytest.approx(training.data.metrics["val_loss"], rel=1e-9)
    assert per_class(trained["client"], evaluation, "val", 0, tmp_path) == \
        per_class(trained["client"], training, "val", trained["val_acc1"][-1][0], tmp_path)
    assert "train_loss" not in evaluation.data.metrics

    artifacts = {artifact.path for artifact in trained["client"].list_artifacts(evaluation.info.run_id)}
    assert {"confusion_matrix.png", "config.yaml", "log.txt"} <= artifacts
    figure = download(trained["client"], evaluation, "confusion_matrix.png", tmp_path)
    trained_figure = download(trained["client"], training, "confusion_matrix.png", tmp_path / "training")
    assert np.array_equal(matplotlib.image.imread(figure), matplotlib.image.imread(trained_figure))


def test_eval_only_of_a_checkpoint_gives_the_validation_accuracy_at_that_checkpoint(trained):
    first_epoch_step, first_epoch_acc1 = trained["val_acc1"][0]
    checkpoint = trained["output_dir"] / f"checkpoint_{first_epoch_step:08d}.pth"

    exit_code, output_dir = eval_only(trained, checkpoint, name="eval_checkpoint")

    assert exit_code == 0
    assert run_of(output_dir, trained["client"]).data.metrics["val_acc1"] == first_epoch_acc1
    assert first_epoch_acc1 != trained["val_acc1"][-1][1]  # a different model than model_final.pth


@pytest.mark.parametrize("dataset_opts", [
    ["DATA.DATASET_TYPE", "digits"],
    ["DATA.DATASET_TYPE", "synthetic", "DATA.SYNTHETIC_SIZE", "64"],
], ids=["digits", "synthetic"])
def test_eval_only_on_the_test_split_of_a_dataset_without_one_is_a_clear_error(trained, capfd, dataset_opts):
    exit_code, output_dir = eval_only(trained, trained["output_dir"] / "model_final.pth", "EVAL.SPLIT", "test",
                                      *dataset_opts, name=f"no_test_split_{dataset_opts[1]}")

    assert exit_code == 2
    err = capfd.readouterr().err.strip()
    assert err.splitlines() == [f"error: the {dataset_opts[1]} dataset has no test split; use EVAL.SPLIT val"]
    assert not (output_dir / RUN_ID_FILE).exists()  # no MLflow run was started


def corrupt_copies(trained, folder: Path) -> dict[str, Path]:
    final = trained["output_dir"] / "model_final.pth"
    truncated, garbage, other_model = folder / "truncated.pth", folder / "garbage.pth", folder / "rgb_model.pth"
    truncated.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    garbage.write_bytes(b"these are not weights\n" * 10)
    rgb_cfg = load_config(DIGITS_YAML, ["DATA.INPUT_DIM", "3"])
    torch.save(build_model(rgb_cfg).state_dict(), other_model)
    return {"missing": folder / "no_such_model.pth", "truncated": truncated, "garbage": garbage,
            "a model with other shapes": other_model, "a folder": folder}


@pytest.mark.parametrize("case", ["missing", "truncated", "garbage", "a model with other shapes", "a folder"])
def test_bad_weights_for_eval_only_are_one_clear_error(trained, tmp_path, capfd, case):
    weights = corrupt_copies(trained, tmp_path)[case]
    exit_code, output_dir = eval_only(trained, weights, name=f"bad_weights_{case.replace(' ', '_')}")

    assert exit_code == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert str(weights) in err
    assert "Traceback" not in err
    assert not (output_dir / RUN_ID_FILE).exists()


def test_eval_only_without_weights_says_to_set_model_weights(trained, capfd):
    exit_code = train_net(trained["workdir"], "--config-file", DIGITS_YAML, "--eval-only",
                          "OUTPUT_DIR", str(trained["workdir"] / "no_weights"), *trained["common"])

    assert exit_code == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "MODEL.WEIGHTS" in err


# ---- MODEL.WEIGHTS to start a training run -------------------------------------------------------------------
def test_training_from_trained_weights_starts_far_above_training_from_scratch(trained):
    output_dir = trained["workdir"] / "finetune"
    exit_code = train_net(trained["workdir"], "--config-file", DIGITS_YAML, "TRAIN.MAX_EPOCHS", "1",
                          "MODEL.WEIGHTS", str(trained["output_dir"] / "model_final.pth"),
                          "OUTPUT_DIR", str(output_dir), *trained["common"])
    assert exit_code == 0

    from_weights = run_of(output_dir, trained["client"]).data.metrics["val_acc1"]
    from_scratch = trained["val_acc1"][0][1]  # the shared run's first epoch
    assert from_weights > from_scratch + 0.25
    assert from_weights >= trained["val_acc1"][-1][1] - 0.05  # it kept what the weights had learned


def test_training_from_missing_weights_is_one_clear_error(trained, capfd):
    missing = trained["workdir"] / "no_such_model.pth"
    exit_code = train_net(trained["workdir"], "--config-file", DIGITS_YAML, "MODEL.WEIGHTS", str(missing),
                          "OUTPUT_DIR", str(trained["workdir"] / "finetune_missing"), *trained["common"])

    assert exit_code == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(missing) in err


# ---- a dataset with a test split -----------------------------------------------------------------------------
def write_tiny_cifar10(cache_dir: Path, images_per_batch: int = 20) -> None:
    """data_batch_1..5 and test_batch in the official pickle format, with random pixels and labels."""
    folder = cache_dir / cifar10.FOLDER_NAME
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH]:
        batch = {b"data": rng.integers(0, 256, size=(images_per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(label) for label in rng.integers(0, 10, size=images_per_batch)]}
        with (folder / name).open("wb") as file:
            pickle.dump(batch, file, protocol=2)


def test_cifar10_training_and_eval_only_of_the_test_split_agree(tmp_path):
    write_tiny_cifar10(tmp_path / "data")
    tracking_uri = empty_store(tmp_path / "store")
    common = ["DATA.DATASET_TYPE", "cifar10", "DATA.CACHE_DIR", str(tmp_path / "data"), "TRAIN.BATCH_SIZE", "32",
              "TRAIN.MAX_EPOCHS", "1", "MLFLOW.TRACKING_URI", tracking_uri, "LOG.PROGRESS_BAR", "False",
              "MLFLOW.LOG_MODEL", "False"]
    assert train_net(tmp_path, *common, "OUTPUT_DIR", str(tmp_path / "train")) == 0
    assert train_net(tmp_path, *common, "--eval-only", "EVAL.SPLIT", "test", "OUTPUT_DIR", str(tmp_path / "eval"),
                     "MODEL.WEIGHTS", str(tmp_path / "train" / "model_final.pth")) == 0

    client = mlflow.MlflowClient(tracking_uri)
    training, evaluation = run_of(tmp_path / "train", client), run_of(tmp_path / "eval", client)
    assert evaluation.data.metrics["test_acc1"] == training.data.metrics["test_acc1"]
    assert evaluation.data.metrics["test_loss"] == pytest.approx(training.data.metrics["test_loss"], rel=1e-9)
    final_step = max(m.step for m in client.get_metric_history(training.info.run_id, "test_acc1"))
    assert list(per_class(client, evaluation, "test", 0, tmp_path)) == CIFAR10_CLASSES
    assert per_class(client, evaluation, "test", 0, tmp_path) == per_class(client, training, "test", final_step,
                                                                             tmp_path)
    assert "val_acc1" not in evaluation.data.metrics
    assert 20 * evaluation.data.metrics["test_acc1"] == pytest.approx(round(20 * training.data.metrics["test_acc1"]))
    assert "confusion_matrix_test.png" in {a.path for a in client.list_artifacts(training.info.run_id)}
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(evaluation.info.run_id)}
