"""Our top-level package ``datasets`` shares its name with the Hugging Face library that MLflow knows.

Importing MLflow (including ``mlflow.data``, which has Hugging Face support) next to our package must
neither shadow it nor break MLflow logging.
"""

from pathlib import Path

import mlflow
import mlflow.data

from ptengine import datasets

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_datasets_is_our_package_even_after_importing_mlflow():
    assert Path(datasets.__file__).resolve().is_relative_to(REPO_ROOT)
    assert hasattr(datasets, "DATASET_REGISTRY") and "digits" in datasets.DATASET_REGISTRY
    assert hasattr(mlflow.data, "from_numpy")


def test_mlflow_logs_a_run_with_our_datasets_imported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in ./mlruns of the repository
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("name-clash", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    note = tmp_path / "note.txt"
    note.write_text("logged next to our datasets package\n")

    client.log_param(run_id, "DATA.DATASET_TYPE", "digits")
    client.log_metric(run_id, "val_acc1", 0.97, step=3)
    client.log_artifact(run_id, str(note))
    client.set_terminated(run_id)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"DATA.DATASET_TYPE": "digits"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_acc1")] == [(3, 0.97)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
    assert (tmp_path / "artifacts" / run_id / "artifacts" / "note.txt").is_file()
    assert Path(datasets.__file__).resolve().is_relative_to(REPO_ROOT)
