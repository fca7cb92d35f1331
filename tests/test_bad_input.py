"""A mistake a user can make gets one line on stderr that starts with "error:", exit code 2, no traceback, and
leaves an earlier run (its checkpoints, its log and its MLflow run) exactly as it was.

Each case calls ``main()`` of ``tools/train_net.py`` in this process: the same code path as the command line
without the seconds of imports (test_cli.py checks the same lines from real processes). The earlier run is a
copy of the shared reference run; every attempt logs to the same MLflow store, in its own experiment.
"""

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from conftest import isolated_training
from fault_utils import (
    DIGITS_CONFIG,
    free_port,
    load_weights,
    mlflow_client,
    runs_of,
    shared_reference_run,
    sqlite_uri,
    wait_for,
)
from PIL import Image

import ptengine.datasets.cifar10 as cifar10
from ptengine.config import load_config
from ptengine.networks import build_model
from ptengine.tools.train_net import main

QUICK = ["--config-file", str(DIGITS_CONFIG), "TRAIN.MAX_EPOCHS", "1", "LOG.PROGRESS_BAR", "False",
         "MLFLOW.LOG_MODEL", "False", "MLFLOW.EXPERIMENT_NAME", "mistakes"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return shared_reference_run(tmp_path_factory)


class EarlierRun:
    """A finished run (OUTPUT_DIR and MLflow store) and a fingerprint of everything in both."""

    def __init__(self, folder: Path):
        self.output_dir, self.tracking_uri = folder / "output", sqlite_uri(folder / "store")
        self.fingerprint = self.take_fingerprint()

    def take_fingerprint(self) -> dict:
        files = {str(path.relative_to(self.output_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
                 for path in sorted(self.output_dir.rglob("*")) if path.is_file()}
        client = mlflow_client(self.tracking_uri)
        runs = {run.info.run_id: (run.info.status, run.info.end_time, run.data.metrics, run.data.params,
                                  run.data.tags, len(client.get_metric_history(run.info.run_id, "train_loss")))
                for run in runs_of(self.tracking_uri)}
        return {"files": files, "runs": runs}

    def untouched(self) -> bool:
        return self.take_fingerprint() == self.fingerprint


@pytest.fixture(scope="module")
def earlier_run(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("earlier")
    reference.result()
    shutil.copytree(reference.workdir / "output", folder / "output")
    shutil.copytree(reference.workdir / "store", folder / "store")
    return EarlierRun(folder)


@dataclass
class Attempt:
    code: int
    err: list[str]  # the lines on stderr
    output_dir: Path


@pytest.fixture
def train(earlier_run, tmp_path, capfd):
    """``train(*args)`` runs main() with the earlier run's MLflow store and (unless ``args`` names one) a new
    OUTPUT_DIR, and returns the exit code and what reached stderr."""
    def attempt(*args) -> Attempt:
        args = list(args)
        if "MLFLOW.TRACKING_URI" not in args:
            args += ["MLFLOW.TRACKING_URI", earlier_run.tracking_uri]
        if "OUTPUT_DIR" not in args:
            args += ["OUTPUT_DIR", str(tmp_path / "output")]
        output_dir = Path(args[args.index("OUTPUT_DIR") + 1])
        capfd.readouterr()
        with isolated_training(tmp_path):
            code = main(args)
        return Attempt(code, capfd.readouterr().err.splitlines(), output_dir)
    return attempt


def assert_one_error_line(attempt: Attempt, *expected: str) -> None:
    assert attempt.code == 2
    assert len(attempt.err) == 1, attempt.err  # one line, so no traceback either
    assert attempt.err[0].startswith("error: ")
    for text in expected:
        assert text in attempt.err[0]


# ---- the configuration ----------------------------------------------------------------------------------------
def test_a_missing_config_file(train, earlier_run):
    assert_one_error_line(train("--config-file", "configs/digit.yaml"), "config file not found: configs/digit.yaml")
    assert earlier_run.untouched()


def test_an_unknown_key_suggests_the_closest_one(train, earlier_run):
    assert_one_error_line(train(*QUICK, "TRAIN.LRR", "0.1"), "unknown config key TRAIN.LRR; did you mean TRAIN.LR?")
    assert earlier_run.untouched()


def test_a_value_of_the_wrong_type(train, earlier_run):
    assert_one_error_line(train(*QUICK, "TRAIN.BATCH_SIZE", "sixty-four"),
                          "TRAIN.BATCH_SIZE must be of type int (like 64), got 'sixty-four' (str)")
    assert earlier_run.untouched()


def test_a_batch_size_of_zero(train, earlier_run):
    assert_one_error_line(train(*QUICK, "TRAIN.BATCH_SIZE", "0"), "TRAIN.BATCH_SIZE must be a positive integer, got 0")
    assert earlier_run.untouched()


@pytest.mark.parametrize("size", ["0", "1", "1.5", "-0.25"])
def test_a_validation_size_outside_0_and_1(train, earlier_run, size):
    assert_one_error_line(train(*QUICK, "DATA.VALIDATION_SIZE", size),
                          f"DATA.VALIDATION_SIZE must be strictly between 0 and 1, got {float(size)}")
    assert earlier_run.untouched()


def test_a_negative_number_of_epochs(train, earlier_run):
    assert_one_error_line(train(*QUICK, "TRAIN.MAX_EPOCHS", "-3"),
                          "TRAIN.MAX_EPOCHS must be a positive integer, got -3")
    assert earlier_run.untouched()


def test_an_override_without_a_value(train, earlier_run, tmp_path):
    attempt = train("OUTPUT_DIR", str(tmp_path / "output"), "MLFLOW.TRACKING_URI", earlier_run.tracking_uri,
                    *QUICK, "TRAIN.LR")
    assert_one_error_line(attempt, "command-line overrides come in KEY VALUE pairs; 'TRAIN.LR' has no value")
    assert earlier_run.untouched()


@pytest.mark.parametrize("key, value, expected", [
    ("DATA.DATASET_TYPE", "mnist", "unknown DATA.DATASET_TYPE 'mnist'; choose one of "),
    ("TRAIN.MODEL_TYPE", "vgg16", "unknown TRAIN.MODEL_TYPE 'vgg16'; choose one of resnet18, simple_cnn"),
    ("TRAIN.OPTIMIZER_TYPE", "lion", "unknown TRAIN.OPTIMIZER_TYPE 'lion'"),
    ("DATA.CLASSES", "['cat','dog']", "the digits dataset has 10 classes but DATA.CLASSES names 2"),
])
def test_a_name_the_project_does_not_know(train, earlier_run, key, value, expected):
    assert_one_error_line(train(*QUICK, key, value), expected)
    assert earlier_run.untouched()


def test_a_malformed_tracking_uri(train, earlier_run):
    assert_one_error_line(train(*QUICK, "MLFLOW.TRACKING_URI", "not a uri"),
                          "malformed MLflow tracking URI 'not a uri'")
    assert earlier_run.untouched()


# ---- data ---------------------------------------------------------------------------------------------------------
def test_cifar10_missing_without_network_names_the_cache_folder(train, earlier_run, tmp_path, monkeypatch):
    # A port nobody listens on: the download fails at once, as it does offline (never the real internet).
    monkeypatch.setattr(cifar10, "CIFAR10_URL", f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz")
    cache = tmp_path / "empty-cache"
    attempt = train(*QUICK, "DATA.DATASET_TYPE", "cifar10", "DATA.INPUT_DIM", "3", "DATA.CACHE_DIR", str(cache),
                    "DATA.CLASSES", str([str(n) for n in range(10)]))

    assert_one_error_line(attempt, f"CIFAR-10 was not found in {cache / 'cifar-10-batches-py'}",
                          "Connection refused", f"extract it into {cache}")
    assert earlier_run.untouched()


def image_folder(root: Path, broken: str | None = None) -> Path:
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for number in range(4):
                Image.new("RGB", (12, 12), (40 * number, 90, 160)).save(root / split / name / f"{number}.png")
    if broken:
        (root / broken).write_bytes(b"\x89PNG not really")
    return root


FOLDER = ["DATA.DATASET_TYPE", "image_folder", "DATA.INPUT_DIM", "3", "DATA.CLASSES", "['cat','dog']",
          "TRAIN.BATCH_SIZE", "4"]


def test_an_image_folder_without_images(train, earlier_run, tmp_path):
    root = tmp_path / "photos"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    assert_one_error_line(train(*QUICK, *FOLDER, "DATA.ROOT", str(root)), f"no images found in {root / 'train'}")
    assert earlier_run.untouched()


def live_dataloader_workers() -> list[psutil.Process]:
    return [child for child in psutil.Process().children()
            if child.name() == "pt_data_worker" and child.status() != psutil.STATUS_ZOMBIE]


def test_an_unreadable_image_is_named_and_the_dataloader_workers_end_with_the_run(train, earlier_run, tmp_path):
    root = image_folder(tmp_path / "photos", broken="train/dog/2.png")
    assert_one_error_line(train(*QUICK, *FOLDER, "DATA.ROOT", str(root), "DATA.NUM_WORKERS", "2"),
                          f"cannot read the image {root / 'train/dog/2.png'}", "remove or replace the file")
    assert earlier_run.untouched()
    # As in a notebook, this process goes on: the workers must not wait for the error to be garbage-collected
    # (which took 5 s per worker, and left them running until then).
    wait_for(lambda: not live_dataloader_workers(), "the DataLoader workers to exit")


# ---- weights and checkpoints --------------------------------------------------------------------------------------
def test_a_truncated_checkpoint_as_weights(train, earlier_run, tmp_path):
    truncated = tmp_path / "model_final.pth"
    data = (earlier_run.output_dir / "model_final.pth").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    assert_one_error_line(train(*QUICK, "MODEL.WEIGHTS", str(truncated)), f"cannot read checkpoint {truncated}")
    assert earlier_run.untouched()


def test_the_weights_of_another_model(train, earlier_run, tmp_path):
    resnet = tmp_path / "resnet18.pth"
    torch.save(build_model(load_config(str(DIGITS_CONFIG), ["TRAIN.MODEL_TYPE", "resnet18"])).state_dict(), resnet)
    assert_one_error_line(train(*QUICK, "MODEL.WEIGHTS", str(resnet)),
                          f"MODEL.WEIGHTS {resnet} does not fit TRAIN.MODEL_TYPE 'SimpleCNN'")
    assert earlier_run.untouched()


class Payload:
    """Anything that is not tensors: torch.load(weights_only=True) must refuse to unpickle it."""


def test_weights_that_need_unpickling_code_are_refused(train, earlier_run, tmp_path):
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": Payload()}, unsafe)
    assert_one_error_line(train(*QUICK, "MODEL.WEIGHTS", str(unsafe)), f"cannot read checkpoint {unsafe}")
    assert earlier_run.untouched()


def test_weights_that_do_not_exist(train, earlier_run, tmp_path):
    assert_one_error_line(train(*QUICK, "MODEL.WEIGHTS", str(tmp_path / "nope.pth")),
                          f"checkpoint not found: {tmp_path / 'nope.pth'}")
    assert earlier_run.untouched()


def test_eval_only_without_weights(train, earlier_run):
    assert_one_error_line(train(*QUICK, "--eval-only"), "--eval-only needs the weights to evaluate: add MODEL.WEIGHTS")
    assert earlier_run.untouched()


# ---- the output folder and the run ---------------------------------------------------------------------------------
def test_an_output_dir_that_cannot_be_created(train, earlier_run, tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")  # (chmod would not stop root; a file does)
    attempt = train(*QUICK, "OUTPUT_DIR", str(tmp_path / "notes.txt" / "run1"))
    assert_one_error_line(attempt, f"cannot write to OUTPUT_DIR {tmp_path / 'notes.txt' / 'run1'}: Not a directory")
    assert earlier_run.untouched()


def test_a_new_run_into_a_folder_with_checkpoints_is_refused_and_changes_nothing(train, earlier_run):
    attempt = train(*QUICK, "OUTPUT_DIR", str(earlier_run.output_dir))
    assert_one_error_line(attempt, f"OUTPUT_DIR {earlier_run.output_dir} already holds checkpoints of an earlier run; "
                                   "continue it with --resume")
    assert earlier_run.untouched()  # log.txt and config.yaml included


def test_a_resume_with_a_mistake_changes_nothing(train, earlier_run):
    attempt = train("--config-file", str(DIGITS_CONFIG), "TRAIN.MAX_EPOCHS", "3", "TRAIN.BATCH_SIZE", "0",
                    "OUTPUT_DIR", str(earlier_run.output_dir), "--resume")
    assert_one_error_line(attempt, "TRAIN.BATCH_SIZE must be a positive integer, got 0")
    assert earlier_run.untouched()


def test_rerun_of_an_unknown_mlflow_run(train, earlier_run):
    attempt = train("--rerun", "0123456789abcdef0123456789abcdef", "MLFLOW.TRACKING_URI", earlier_run.tracking_uri)
    assert_one_error_line(attempt, "cannot fetch config.yaml of MLflow run 0123456789abcdef0123456789abcdef")
    assert earlier_run.untouched()


def test_a_loss_that_becomes_nan_names_the_iteration_and_keeps_the_checkpoints_before_it(train, earlier_run):
    attempt = train(*QUICK, "TRAIN.LR", "1e30", "CHECKPOINT.PERIOD", "1")

    assert_one_error_line(attempt, "the training loss became NaN or inf at iteration 2 (epoch 1); lower TRAIN.LR")
    checkpoints = sorted(path.name for path in attempt.output_dir.glob("checkpoint_*.pth"))
    assert checkpoints == ["checkpoint_00000001.pth"]  # nothing saved after the loss went bad
    weights = load_weights(attempt.output_dir / checkpoints[0])["model"]
    assert all(tensor.isfinite().all() for tensor in weights.values())
    (failed,) = [run for run in runs_of(earlier_run.tracking_uri, "mistakes")
                 if run.data.params["OUTPUT_DIR"] == str(attempt.output_dir)]
    assert failed.info.status == "FAILED"
    assert earlier_run.untouched()
