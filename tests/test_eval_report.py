"""The per-class table of a run: one MLflow table per split, rows appended by evaluation step, each step once."""

import json
from pathlib import Path

import mlflow
from fault_utils import empty_store

from engine.mlflow_delivery import RunDelivery


def rows(step: int) -> dict:
    return {"step": [step, step], "class": ["0", "1"], "accuracy": [0.1234567890123, 1.0], "images": [3, 4]}


def test_rows_are_appended_once_per_step_with_class_names_kept_as_text(tmp_path):
    tracking_uri = empty_store(tmp_path / "store")
    delivery = RunDelivery(tracking_uri, "tables", "", {}, {}, None)
    for step in (10, 20, 20, 10):  # a resume re-sends steps the run already holds
        delivery.deliver([("table", rows(step), "per_class_accuracy/val.json")])

    client = mlflow.MlflowClient(tracking_uri)
    path = client.download_artifacts(delivery.run_id, "per_class_accuracy/val.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["step", "class", "accuracy", "images"]
    assert table["data"] == [[10, "0", 0.1234567890123, 3], [10, "1", 1.0, 4],
                             [20, "0", 0.1234567890123, 3], [20, "1", 1.0, 4]]
    logged = json.loads(client.get_run(delivery.run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "per_class_accuracy/val.json", "type": "table"} in logged  # shown as a table in the UI
