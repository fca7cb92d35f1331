"""Print where the MLflow UI shows the newest run's experiment's runs:
``http://127.0.0.1:PORT/#/experiments/<id>/runs?workflowType=machine_learning``.

    python tools/mlflow_ui_runs_url.py PORT

Started in the background by ``tools/mlflow_ui.sh`` just before the script becomes the server: it waits until
the server answers, asks its REST API (the standard library is enough) which experiment holds the newest run, and
prints the address of that experiment's runs list, the page a training run is read on. MLflow 3's UI otherwise
opens a new experiment on its GenAI pages; ``workflowType=machine_learning`` is what its "GenAI / Model training"
switch sets (MLflow 3.17's UI reads it from the address: its runs list, models and traces, seen in headless
Chromium). It gives up quietly when the server never comes up or goes away.
"""

import json
import os
import sys
import time
import urllib.request

ML = "?workflowType=machine_learning"  # the UI's "Model training" side, not GenAI's
WAIT_S = 120  # the server's start, imports and schema migrations included, on a slow machine


def api(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def newest_run_experiment(base: str) -> dict | None:
    """The experiment (``experiment_id``, ``name``) of the run that started last, or None without runs."""
    experiments = api(base, "experiments/search", {"max_results": 1000}).get("experiments", [])
    if not experiments:
        return None
    runs = api(base, "runs/search", {"experiment_ids": [e["experiment_id"] for e in experiments],
                                     "max_results": 1, "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    if not runs:
        return None
    return next(e for e in experiments if e["experiment_id"] == runs[0]["info"]["experiment_id"])


def wait_until_up(base: str, parent: int) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and os.getppid() == parent:  # the server is our parent (the shell, exec'd)
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return True
        except OSError:  # not listening yet
            time.sleep(0.5)
    return False


def main(port: str) -> int:
    base = f"http://127.0.0.1:{port}"
    if not wait_until_up(base, os.getppid()):
        return 0
    try:
        experiment = newest_run_experiment(base)
    except (OSError, ValueError, KeyError, StopIteration):
        return 0  # the UI works without this line
    if experiment is None:
        print(f"no runs yet; after a training, its runs are at {base}/#/experiments/<id>/runs{ML}", file=sys.stderr)
    else:
        print(f"runs of experiment '{experiment['name']}': {base}/#/experiments/{experiment['experiment_id']}/runs{ML}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
