"""Every MLflow call in the project lives in this module.

``MLflowTracker`` creates (or re-attaches) one run, logs params and artifacts, and sends metrics from a
background thread in batches (``log_batch``, at most 1000 metrics a request) so the training step never
waits for the tracking store. A failed request is retried with back-off, in order; whatever cannot be
delivered by the end is written to ``OUTPUT_DIR/mlflow_pending.jsonl`` instead of being lost.
"""

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlparse

from config import ConfigError
from config.defaults import REPO_ROOT

logger = logging.getLogger("engine")

LOCAL_STORE = REPO_ROOT / "mlruns" / "mlflow.db"
MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_REQUEST = 100
KNOWN_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def resolve_tracking_uri(configured: str = "") -> str:
    """``MLFLOW.TRACKING_URI``, else ``$MLFLOW_TRACKING_URI``, else the project's local SQLite store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{LOCAL_STORE}"
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in KNOWN_SCHEMES:
        raise ConfigError(f"malformed MLflow tracking URI '{uri}'; use e.g. http://127.0.0.1:5000 or "
                          f"sqlite:////absolute/path/mlflow.db (set MLFLOW.TRACKING_URI or MLFLOW_TRACKING_URI)")
    if scheme == "sqlite":
        Path(_sqlite_path(uri)).parent.mkdir(parents=True, exist_ok=True)
    return uri


def _sqlite_path(uri: str) -> str:
    return uri[len("sqlite:///"):]


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database instead of into ``./mlruns`` of the cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(_sqlite_path(uri)).resolve().parent / "artifacts").as_uri()
    return None


def _client(uri: str):
    from mlflow import MlflowClient

    root = artifact_root(uri)
    if root and "_MLFLOW_SERVER_ARTIFACT_ROOT" not in os.environ:
        # MLflow creates the "Default" experiment with this root when it initialises a new database;
        # without it, that experiment's artifacts would land in ./mlruns of whatever cwd ran first.
        os.environ["_MLFLOW_SERVER_ARTIFACT_ROOT"] = root
    return MlflowClient(tracking_uri=uri)


class MLflowTracker:
    """One MLflow run: start or re-attach, params, metrics (async), artifacts, final status."""

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str = "", pending_dir=None):
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.pending_dir = Path(pending_dir) if pending_dir else None
        self.client = _client(tracking_uri)
        self.run_id: str | None = None
        self._logged_steps: dict[str, int] = {}  # per metric: last step already in the run (after a resume)
        self._sender: _MetricSender | None = None

    # ---- run lifecycle -----------------------------------------------------------------------------------
    def start(self, params: dict, tags: dict | None = None, run_id: str | None = None) -> str:
        """Create a run (or re-attach ``run_id``), log params not already there, start the metric sender."""
        if run_id:
            run = self.client.get_run(run_id)
            self.client.update_run(run_id, status="RUNNING")
            self._logged_steps = self._last_steps(run)
            already = run.data.params
        else:
            run = self.client.create_run(self._experiment_id(), run_name=self.run_name or None, tags=tags or {})
            already = {}
        self.run_id = run.info.run_id
        self._log_params({k: v for k, v in params.items() if k not in already})
        self._sender = _MetricSender(self.client, self.run_id)
        return self.run_id

    def end(self, status: str = "FINISHED", timeout: float = 60.0) -> None:
        """Deliver what is queued (bounded wait), then mark the run FINISHED, FAILED or KILLED."""
        if self._sender is None:
            return
        delivered = self._sender.close(timeout)
        if not delivered:
            self._spill(self._sender.pending())
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as error:  # the store is unreachable: the pending file above keeps the metrics
            logger.warning(f"could not mark MLflow run {self.run_id} {status}: {_short(error)}")

    # ---- logging -----------------------------------------------------------------------------------------
    def log_metrics(self, records) -> None:
        """Queue ``(name, value, step)`` records; returns at once. Steps a resumed run already has are skipped."""
        now = int(time.time() * 1000)
        fresh = [(n, v, s, now) for n, v, s in records if s > self._logged_steps.get(n, -1)]
        if fresh:
            self._sender.put(fresh)

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        try:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)
        except Exception as error:
            logger.warning(f"could not upload {local_path} to MLflow: {_short(error)}")

    def flush(self, timeout: float = 30.0) -> bool:
        return self._sender.flush(timeout) if self._sender else True

    # ---- helpers -----------------------------------------------------------------------------------------
    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        root = artifact_root(self.tracking_uri)
        location = f"{root}/{self.experiment_name}" if root else None
        return self.client.create_experiment(self.experiment_name, artifact_location=location)

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_REQUEST])

    def _last_steps(self, run) -> dict[str, int]:
        return {key: max(m.step for m in self.client.get_metric_history(run.info.run_id, key))
                for key in run.data.metrics}

    def _spill(self, records) -> None:
        if not records or self.pending_dir is None:
            return
        path = self.pending_dir / "mlflow_pending.jsonl"
        with open(path, "a") as file:
            for name, value, step, timestamp in records:
                file.write(json.dumps({"run_id": self.run_id, "key": name, "value": value, "step": step,
                                       "timestamp": timestamp}) + "\n")
        logger.warning(f"MLflow was unreachable: {len(records)} metric values saved to {path}")


class _MetricSender:
    """A background thread that drains a queue of metric records into ``log_batch`` requests, in order.

    A request that fails is retried (with back-off) before anything newer is sent, so a merged batch is
    never silently dropped; ``flush``/``close`` wait at most their timeout.
    """

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._queue: deque = deque()
        self._in_flight: list = []
        self._condition = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mlflow-metric-sender", daemon=True)
        self._thread.start()

    def put(self, records) -> None:
        with self._condition:
            self._queue.extend(records)
            self._condition.notify_all()

    def pending(self) -> list:
        with self._condition:
            return list(self._in_flight) + list(self._queue)

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._condition:
            while self._queue or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def close(self, timeout: float) -> bool:
        delivered = self.flush(timeout)
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout=1.0)
        return delivered

    def _run(self) -> None:
        failures, retry_at = 0, 0.0
        while True:
            with self._condition:
                while not self._closing and (not self._queue or time.monotonic() < retry_at):
                    self._condition.wait(None if not self._queue else retry_at - time.monotonic())
                if self._closing:
                    return
                count = min(len(self._queue), MAX_METRICS_PER_REQUEST)
                self._in_flight = [self._queue.popleft() for _ in range(count)]
            try:
                self._send(self._in_flight)
                failures = 0
            except Exception as error:
                failures += 1
                retry_at = time.monotonic() + min(30.0, 0.5 * 2 ** min(failures, 6))
                if failures == 1:
                    logger.warning(f"MLflow logging failed ({_short(error)}); retrying in the background")
                with self._condition:
                    self._queue.extendleft(reversed(self._in_flight))  # retry these first, in order
            with self._condition:
                self._in_flight = []
                self._condition.notify_all()

    def _send(self, records) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(name, value, timestamp, step) for name, value, step, timestamp in records]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)


def _short(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
