"""A whole run through ``tools/train_net.py``: what lands in MLflow and in OUTPUT_DIR.

The digits run (``config/digits.yaml``, ~15 s) is trained once per session by ``trained_digits_run``
in conftest.py; each test below reads one aspect of it back.
"""

import json
import logging
import math
import os
import re
from pathlib import Path

import mlflow
import pytest
import torch

from engine.checkpoint import Checkpointer, load_file
from engine.evaluation import evaluate
from engine.logger import restore_streams, setup_logging
from ptengine.config import flatten_config, load_config
from ptengine.datasets import build_datasets
from ptengine.datasets.batches import build_batches
from ptengine.datasets.transforms import build_transform
from ptengine.networks import build_model
from ptengine.tools.dataset_inputs import split_digest
from ptengine.tools.train_net import main

DIGITS_YAML = str(Path(__file__).resolve().parent.parent / "config" / "digits.yaml")


@pytest.fixture(scope="module")
def digits(trained_digits_run):
    """The shared run, with its config, its MLflow run and the number of iterations it should have had."""
    assert trained_digits_run["exit_code"] == 0
    assert trained_digits_run["run_id"] is not None
    cfg = load_config(DIGITS_YAML, trained_digits_run["opts"])
    iters_per_epoch = math.ceil(len(build_datasets(cfg).train) / cfg.TRAIN.BATCH_SIZE)
    client = mlflow.MlflowClient(trained_digits_run["tracking_uri"])
    return {**trained_digits_run, "cfg": cfg, "client": client, "run": client.get_run(trained_digits_run["run_id"]),
            "iters_per_epoch": iters_per_epoch, "max_iter": iters_per_epoch * cfg.TRAIN.MAX_EPOCHS}


def history(digits, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in digits["client"].get_metric_history(digits["run_id"], key))


def test_the_run_finished_with_the_expected_metrics(digits):
    assert digits["run"].info.status == "FINISHED"
    assert {"train_loss", "lr", "epoch", "val_loss", "val_acc1"} <= set(digits["run"].data.metrics)


def test_train_loss_is_logged_once_per_step_at_the_global_iteration(digits):
    losses = history(digits, "train_loss")
    assert [step for step, _ in losses] == list(range(1, digits["max_iter"] + 1))
    assert all(math.isfinite(value) for _, value in losses)
    first_epoch, last_epoch = losses[: digits["iters_per_epoch"]], losses[-digits["iters_per_epoch"]:]
    assert sum(v for _, v in last_epoch) < 0.1 * sum(v for _, v in first_epoch)  # it learned


def test_lr_follows_step_lr_at_epoch_boundaries(digits):
    train = digits["cfg"].TRAIN
    lrs = history(digits, "lr")
    assert [step for step, _ in lrs] == list(range(1, digits["max_iter"] + 1))
    for step, lr in lrs:
        epoch = (step - 1) // digits["iters_per_epoch"]
        assert lr == pytest.approx(train.LR * train.GAMMA ** (epoch // train.STEP_SIZE)), step


def test_epoch_and_validation_metrics_are_logged_at_every_epoch_end(digits):
    epoch_ends = [digits["iters_per_epoch"] * (e + 1) for e in range(digits["cfg"].TRAIN.MAX_EPOCHS)]
    assert history(digits, "epoch") == [(step, float(e + 1)) for e, step in enumerate(epoch_ends)]  # 1-based
    assert [step for step, _ in history(digits, "val_loss")] == epoch_ends
    accuracies = history(digits, "val_acc1")
    assert [step for step, _ in accuracies] == epoch_ends
    assert accuracies[-1][1] >= 0.90


def test_params_are_the_flattened_config(digits):
    params = digits["run"].data.params
    assert params == {key: str(value) for key, value in flatten_config(digits["cfg"]).items()}
    assert params["TRAIN.LR"] == "0.02"


def test_config_and_log_are_artifacts_stored_beside_the_database(digits, tmp_path):
    client, run_id = digits["client"], digits["run_id"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "log.txt"}
    store_dir = Path(digits["tracking_uri"][len("sqlite:///"):]).parent
    assert digits["run"].info.artifact_uri.startswith(store_dir.as_uri())
    assert not (digits["workdir"] / "mlruns").exists()

    log = Path(client.download_artifacts(run_id, "log.txt", str(tmp_path))).read_text()
    assert f"iter {digits['max_iter']}/{digits['max_iter']}" in log


def test_the_logged_config_yaml_reproduces_the_same_config(digits, tmp_path):
    logged = digits["client"].download_artifacts(digits["run_id"], "config.yaml", str(tmp_path))
    assert load_config(logged, []) == digits["cfg"]


def test_model_final_is_a_plain_state_dict_that_scores_the_logged_accuracy(digits):
    cfg = digits["cfg"]
    state = torch.load(digits["output_dir"] / "model_final.pth", weights_only=True)
    assert isinstance(state, dict) and not any(key.startswith("module.") for key in state)

    model = build_model(cfg)
    model.load_state_dict(state)
    splits = build_datasets(cfg)
    transform = build_transform(cfg.DATA.TRANSFORM_LIST, splits.mean, splits.std, cfg.SEED, train=False)
    val = build_batches(splits.val, 256, transform, "cpu", shuffle=False, seed=cfg.SEED)
    result = evaluate(model, val, num_classes=10, device="cpu")
    assert result["acc1"] == history(digits, "val_acc1")[-1][1]


def test_the_newest_checkpoints_are_kept_and_hold_the_final_model(digits):
    checkpointer = Checkpointer(digits["output_dir"], keep=digits["cfg"].CHECKPOINT.KEEP)
    max_iter, per_epoch = digits["max_iter"], digits["iters_per_epoch"]
    expected = [f"checkpoint_{max_iter - k * per_epoch:08d}.pth" for k in (2, 1, 0)]  # KEEP 3, one per epoch
    assert [path.name for path in checkpointer.checkpoints()] == expected

    path, state = checkpointer.load_newest_valid()
    assert path.name == expected[-1] and state["iteration"] == max_iter
    final = load_file(digits["output_dir"] / "model_final.pth")
    assert all(torch.equal(final[key], state["model"][key]) for key in final)


# ---- where the files are, system metrics, the data as inputs, the model ---------------------------------
def test_the_run_says_where_its_files_are(digits, tmp_path):
    output_dir = str(digits["output_dir"].resolve())
    run = digits["run"]
    assert run.data.params["OUTPUT_DIR"] == output_dir
    assert run.data.tags["output_dir"] == output_dir
    logged = digits["client"].download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert load_config(logged).OUTPUT_DIR == output_dir
    assert load_config(str(digits["output_dir"] / "config.yaml")).OUTPUT_DIR == output_dir
    description = run.data.tags["mlflow.note.content"]
    assert "simple_cnn trained on digits" in description and output_dir in description


def test_system_metrics_are_recorded_even_for_a_short_run(digits):
    system = [key for key in digits["run"].data.metrics if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system
    assert "system/system_memory_usage_megabytes" in system
    assert any(key.startswith("system/disk_") for key in system)
    assert any(key.startswith("system/network_") for key in system)


def test_the_splits_are_dataset_inputs_with_a_digest_over_every_image(digits):
    cfg = load_config(DIGITS_YAML, digits["opts"])
    splits = build_datasets(cfg)
    inputs = {i.dataset.name: i for i in digits["run"].inputs.dataset_inputs}
    assert set(inputs) == {"digits-train", "digits-val"}
    train = inputs["digits-train"]
    assert [tag.value for tag in train.tags if tag.key == "mlflow.data.context"] == ["training"]
    assert train.dataset.digest == split_digest(splits.train)
    assert inputs["digits-val"].dataset.digest == split_digest(splits.val) != train.dataset.digest
    profile = json.loads(train.dataset.profile)
    assert profile["num_rows"] == len(splits.train)
    assert profile["class_counts"]["3"] == int((splits.train.labels == 3).sum())
    assert "load_digits" in train.dataset.source


def test_a_digest_changes_when_a_single_pixel_changes():
    cfg = load_config(DIGITS_YAML)
    split = build_datasets(cfg).val
    before = split_digest(split)
    split.images[-1, 0, -1, -1] ^= 1  # beyond the first 10,000 values MLflow's own digest would read
    assert split_digest(split) != before


def test_the_logged_model_is_named_for_what_it_is_and_carries_the_final_metrics(digits):
    run = digits["run"]
    mlflow.set_tracking_uri(digits["tracking_uri"])
    try:
        [model] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                              filter_string=f"source_run_id = '{run.info.run_id}'")
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert model.name == "simple_cnn-digits"
    on_model = {metric.key: metric for metric in model.metrics}
    # The metrics of the final step, evaluation included; not the system metrics (a step counter of their own).
    assert {"val_loss", "val_acc1", "train_loss"} <= set(on_model)
    assert not [key for key in on_model if key.startswith("system/")]
    assert on_model["val_acc1"].value == run.data.metrics["val_acc1"]
    assert on_model["val_loss"].value == run.data.metrics["val_loss"]
    steps = [m.step for m in digits["client"].get_metric_history(run.info.run_id, "val_acc1")]
    assert len(steps) == len(set(steps))  # linking the model logged no second point
    assert on_model["val_acc1"].step == steps[-1]


def test_per_class_accuracy_is_one_figure_and_one_table_per_evaluation(digits, tmp_path):
    client, run = digits["client"], digits["run"]
    eval_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc1")]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "per_class_accuracy")}
    expected = {f"per_class_accuracy/val_step_{step:08d}.{ext}" for step in eval_steps for ext in ("png", "json")}
    assert files == expected
    last_table = f"per_class_accuracy/val_step_{eval_steps[-1]:08d}.json"
    table = json.loads(Path(client.download_artifacts(run.info.run_id, last_table, str(tmp_path))).read_text())
    assert table["columns"] == ["class", "accuracy", "images"] and len(table["data"]) == 10
    # One chart per metric worth a curve: no per-class dots, no constant validation count.
    assert not [key for key in run.data.metrics if re.fullmatch(r"val_acc1_.+|val_count", key)]


def test_a_diverging_loss_fails_the_run_at_its_first_bad_iteration(capfd, run_dir, small_run_opts):
    output_dir = run_dir / "output"
    exit_code = main([*small_run_opts, "TRAIN.LR", "1e30", "CHECKPOINT.PERIOD", "1", "LOG.PERIOD", "1"])

    # Step 1 runs the untouched model; its update with LR 1e30 makes the loss of step 2 overflow.
    assert exit_code == 2
    error_lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "NaN or inf at iteration 2 (epoch 1)" in error_lines[0]

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'store' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.info.status == "FAILED"
    assert [(m.step, math.isfinite(m.value)) for m in client.get_metric_history(run.info.run_id, "train_loss")] \
        == [(1, True)]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "log.txt"}

    assert not (output_dir / "model_final.pth").exists()
    path, state = Checkpointer(output_dir).load_newest_valid()
    assert path.name == "checkpoint_00000001.pth" and state["iteration"] == 1
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())


def runs_in(tracking_uri: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_mistake_found_while_building_the_run_leaves_no_run_running(capfd, run_dir, small_run_opts):
    assert main([*small_run_opts, "TRAIN.OPTIMIZER_TYPE", "lion"]) == 2
    assert "error: unknown TRAIN.OPTIMIZER_TYPE 'lion'" in capfd.readouterr().err

    statuses = [run.info.status for run in runs_in(f"sqlite:///{run_dir / 'store' / 'mlflow.db'}")]
    assert statuses == []  # the names are checked before the MLflow run starts


def test_two_runs_in_one_process_keep_artifacts_beside_their_own_store(run_dir, small_run_opts):
    uris = []
    for name in ("first", "second"):
        uri = f"sqlite:///{run_dir / name / 'mlflow.db'}"
        opts = [*small_run_opts, "OUTPUT_DIR", str(run_dir / name / "output"), "MLFLOW.TRACKING_URI", uri]
        assert main(opts) == 0
        uris.append(uri)

    for name, uri in zip(("first", "second"), uris, strict=True):
        [run] = runs_in(uri)  # each in its store's Default experiment
        assert run.info.artifact_uri.startswith((run_dir / name / "artifacts").as_uri() + "/"), name
    assert not (run_dir / "mlruns").exists()  # nothing in the cwd (the repository, for `make train`)


def test_engine_logging_keeps_working_after_restore_streams(tmp_path, capsys):
    setup_logging(tmp_path)
    restore_streams()
    try:
        logging.getLogger("engine").info("a line after the run")
    finally:
        logging.getLogger("engine").handlers.clear()
    assert "Logging error" not in capsys.readouterr().err
