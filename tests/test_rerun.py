"""``tools/train_net.py --rerun RUN_ID [KEY VALUE ...]``: train again from the config.yaml an MLflow run logged.

    python tools/train_net.py --rerun 0739612f26ce431ca9b7597387390a98 MLFLOW.TRACKING_URI sqlite:////path/mlflow.db

The new run is tagged ``rerun_of``; on the CPU (exact whatever TRAIN.DETERMINISTIC says) it computes the same
weights, bit for bit. The module shares one 1-epoch digits run and its re-run, both in-process.
"""

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import isolated_training
from fault_utils import empty_store

from engine.checkpoint import load_file
from engine.run import RUN_ID_FILE
from ptengine.config import load_config
from ptengine.tools.rerun import rerun_config
from ptengine.tools.train_net import main

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_YAML = str(REPO_ROOT / "config" / "digits.yaml")


def train_net(workdir: Path, *args: str) -> int:
    with isolated_training(workdir):
        return main(list(args))


def run_id_in(output_dir: Path) -> str:
    return (output_dir / RUN_ID_FILE).read_text().strip()


@pytest.fixture(scope="module")
def original_and_rerun(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rerun")
    tracking_uri = empty_store(workdir / "store")
    original_dir, rerun_dir = workdir / "original", workdir / "rerun"
    assert train_net(workdir, "--config-file", DIGITS_YAML, "TRAIN.MAX_EPOCHS", "1", "MLFLOW.LOG_MODEL", "False",
                     "LOG.PROGRESS_BAR", "False", "OUTPUT_DIR", str(original_dir),
                     "MLFLOW.TRACKING_URI", tracking_uri) == 0
    original_id = run_id_in(original_dir)

    # The store to fetch the run from is named on the command line (or by MLFLOW_TRACKING_URI).
    assert train_net(workdir, "--rerun", original_id, "MLFLOW.TRACKING_URI", tracking_uri,
                     "OUTPUT_DIR", str(rerun_dir)) == 0

    client = mlflow.MlflowClient(tracking_uri)
    return {"workdir": workdir, "tracking_uri": tracking_uri, "client": client,
            "original": client.get_run(original_id), "rerun": client.get_run(run_id_in(rerun_dir)),
            "original_dir": original_dir, "rerun_dir": rerun_dir}


def test_the_rerun_is_a_new_finished_run_tagged_with_its_source(original_and_rerun):
    original, rerun = original_and_rerun["original"], original_and_rerun["rerun"]
    assert rerun.info.run_id != original.info.run_id
    assert rerun.info.status == "FINISHED"
    assert rerun.data.tags["rerun_of"] == original.info.run_id
    assert "rerun_of" not in original.data.tags
    # Unique names (MLflow's) that say what the run is.
    assert rerun.info.run_name.startswith("rerun-") and not original.info.run_name.startswith("rerun-")
    assert rerun.info.experiment_id == original.info.experiment_id  # the config names the experiment


def test_the_rerun_uses_the_original_config_except_the_output_dir(original_and_rerun):
    original, rerun = original_and_rerun["original"].data.params, original_and_rerun["rerun"].data.params
    assert rerun["OUTPUT_DIR"] == str(original_and_rerun["rerun_dir"])
    assert {k: v for k, v in rerun.items() if k != "OUTPUT_DIR"} == {
        k: v for k, v in original.items() if k != "OUTPUT_DIR"}
    assert rerun["TRAIN.MAX_EPOCHS"] == "1"  # from the original's command line, not config/digits.yaml


def test_on_the_cpu_the_rerun_computes_the_same_weights_bit_for_bit(original_and_rerun):
    original = load_file(original_and_rerun["original_dir"] / "model_final.pth")
    rerun = load_file(original_and_rerun["rerun_dir"] / "model_final.pth")

    assert original.keys() == rerun.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, rerun[name]), name

    client = original_and_rerun["client"]
    histories = [[(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")]
                 for run in (original_and_rerun["original"], original_and_rerun["rerun"])]
    assert sorted(histories[0]) == sorted(histories[1])


def test_rerun_config_takes_command_line_overrides_and_a_fresh_output_dir(original_and_rerun, capfd):
    original_id = original_and_rerun["original"].info.run_id
    uri = original_and_rerun["tracking_uri"]
    capfd.readouterr()

    cfg, tags = rerun_config(original_id, ["MLFLOW.TRACKING_URI", uri, "TRAIN.LR", "0.05"])

    assert "Downloading" not in capfd.readouterr().err  # no MLflow progress bar for fetching config.yaml

    assert tags == {"rerun_of": original_id}
    assert cfg.TRAIN.LR == 0.05
    assert cfg.OUTPUT_DIR == ""  # a new output/<timestamp> folder, never the original's
    logged = load_config(str(original_and_rerun["original_dir"] / "config.yaml"))
    assert cfg.TRAIN.MAX_EPOCHS == logged.TRAIN.MAX_EPOCHS == 1
    assert cfg.DATA.DATASET_TYPE == "digits"


@pytest.mark.parametrize("run_id", ["0123456789abcdef0123456789abcdef", "not-a-run"])
def test_rerun_of_an_unknown_run_is_one_clear_error(original_and_rerun, capfd, run_id):
    workdir = original_and_rerun["workdir"]
    output_dir = workdir / f"rerun_of_{run_id}"
    exit_code = train_net(workdir, "--rerun", run_id, "MLFLOW.TRACKING_URI", original_and_rerun["tracking_uri"],
                          "OUTPUT_DIR", str(output_dir))

    assert exit_code == 2
    err = capfd.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert err.startswith(f"error: cannot fetch config.yaml of MLflow run {run_id}: ")
    assert "check the run id" in err
    assert not output_dir.exists()
