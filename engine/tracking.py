"""The MLflow tracker of a run: what the engine logs, and where it waits for the store.

``MLflowTracker`` owns one MLflow run. Nothing it does blocks the training step: metrics, tags and artifact
uploads are handed to a child process (``engine.delivery_process``, ``engine.mlflow_delivery``) that
delivers them in order (metrics merged into ``log_batch`` requests of at most 1000), so MLflow's own Python
never runs in the training process while it trains. A request that fails is retried with back-off before
anything newer is sent, so nothing is dropped or reordered. When the store is unreachable at start, the run
is created as soon as it answers. What is still undelivered at a checkpoint or at the end is written to
``OUTPUT_DIR/mlflow_pending.jsonl``; ``tools/upload_pending.py OUTPUT_DIR`` delivers it later. The model is
logged from the training process itself, at the end (``log_model``).
"""

import copy
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from engine.checkpoint import atomic_write_bytes
from engine.delivery_process import DeliveryProcess
from engine.mlflow_delivery import artifact_root, environment, make_client, short, sqlite_path  # noqa: F401 (re-exported)
from ptengine.config import ConfigError
from ptengine.config.defaults import REPO_ROOT

logger = logging.getLogger("engine")

LOCAL_STORE = REPO_ROOT / "mlruns" / "mlflow.db"
PENDING_FILE = "mlflow_pending.jsonl"
START_TIMEOUT = 300.0  # seconds for the delivery process to start and answer (it imports MLflow first)
# What a resumed run re-sends from the pending file (the status is its own, and a model link needs the model).
RESENDABLE = ("metric", "artifact", "tags", "table", "inputs")
KNOWN_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def resolve_tracking_uri(configured: str = "") -> str:
    """``MLFLOW.TRACKING_URI``, else ``$MLFLOW_TRACKING_URI``, else the project's local SQLite store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{LOCAL_STORE}"
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in KNOWN_SCHEMES or (scheme in ("http", "https") and not parsed.hostname):
        raise ConfigError(f"malformed MLflow tracking URI '{uri}'; use e.g. http://127.0.0.1:5000 or "
                          f"sqlite:////absolute/path/mlflow.db (set MLFLOW.TRACKING_URI or MLFLOW_TRACKING_URI)")
    return uri


def redact_credentials(value):
    """``http://user:secret@host`` -> ``http://user:***@host``: passwords never reach MLflow or the log."""
    return re.sub(r"(://[^/:@\s]+):[^/@\s]+@", r"\1:***@", value) if isinstance(value, str) else value


class TrackingError(ConfigError):
    """The MLflow store answered, and refused the run (a re-attached run that was deleted, say)."""


def cpu_copy(model):
    """A copy of ``model`` on the CPU, made without a second copy of its weights on the GPU."""
    import torch

    memo = {id(p): torch.nn.Parameter(p.detach().to("cpu", copy=True), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.detach().to("cpu", copy=True) for b in model.buffers()})
    return copy.deepcopy(model, memo)


class MLflowTracker:
    """One MLflow run: create or re-attach, params, tags, metrics and artifacts (queued), final status.

    Delivery happens in a child process (``engine.delivery_process``), started with the tracker. ``on_run_id``
    is called with the run id as soon as the run exists (from a background thread when the store was down
    at start). ``before_delivery``, when set to a picklable callable (``functools.partial(time.sleep, 30)``),
    runs in that process before each request to the store: a public seam for tests that need a slow store.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str = "", pending_dir=None,
                 on_run_id=None, end_wait: float = 60.0):
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.end_wait = end_wait  # the longest ``end`` waits for delivery (MLFLOW.END_WAIT)
        self.pending_dir = Path(pending_dir) if pending_dir else None
        self.on_run_id = on_run_id
        self.run_id: str | None = None
        self._announced, self._lock = False, threading.Lock()
        self._before_delivery = None
        self._header: dict = {}  # what tools/upload_pending.py needs to create the run, if it never existed
        self._process = DeliveryProcess(on_run_id=self._learned_run_id)  # imports MLflow while the run is built
        database = sqlite_path(tracking_uri)
        if database is None or database.is_file():
            # ... and connects to the store, where one exists already (a run refused before it starts must
            # leave no new store behind).
            self._process.post("open", tracking_uri)

    @property
    def delivery_pid(self) -> int:
        """The process id of the delivery process (its CPU time is not the training's)."""
        return self._process.process.pid

    @property
    def before_delivery(self):
        return self._before_delivery

    @before_delivery.setter
    def before_delivery(self, call) -> None:
        self._before_delivery = call
        self._process.post("before_delivery", call)

    # ---- run lifecycle -----------------------------------------------------------------------------------
    def start(self, params: dict, tags: dict | None = None, run_id: str | None = None) -> str | None:
        """Create the run (or re-attach ``run_id``) and log the params it lacks; never raises for an outage."""
        self.run_id = run_id
        # Plain strings: a value such as torch.__version__ (a str subclass) would make the delivery process
        # import torch to unpickle it; MLflow stores strings anyway.
        params, tags = {k: str(v) for k, v in params.items()}, {k: str(v) for k, v in (tags or {}).items()}
        self._header = {"params": params, "tags": tags}
        start = {"tracking_uri": self.tracking_uri, "experiment_name": self.experiment_name,
                 "run_name": self.run_name, "params": params, "tags": tags, "run_id": run_id}
        answer = self._process.ask(("start", start), ("started", "failed"), timeout=START_TIMEOUT)
        if answer is None:
            raise RuntimeError("the MLflow delivery process did not start (see the lines above)")
        if len(answer) == 1:
            raise TrackingError(f"MLflow refused the run: {answer[0]}")
        if answer[0] is not None:
            self._learned_run_id(answer[0])
        else:
            logger.warning(answer[1])
        self._process.post_items(self._requeue_pending_file(), urgent=True)
        return self.run_id

    def sample_system_metrics(self, **options) -> "SystemMetricsInDelivery":
        """Sample this machine into the run from the delivery process (MLflow's monitor, options of
        ``engine.system_metrics.SystemMetrics``) until ``stop()`` is called on what this returns."""
        self._process.post("system_metrics", options)
        return SystemMetricsInDelivery(self._process)

    def end(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Deliver what is queued (waiting at most ``timeout``, and never longer than ``end_wait``), then mark
        the run FINISHED, FAILED or KILLED.

        Returns False when something could not be delivered; it is then in ``mlflow_pending.jsonl``.
        """
        self._process.post_items([("status", status)], urgent=True)
        delivered = self._process.wait_delivered(self.end_wait if timeout is None else min(timeout, self.end_wait))
        self._process.close()
        self.save_pending(quiet=False)
        return delivered

    def close(self) -> None:
        """End the delivery process (after ``end``, or for a run that failed while being built). With nothing
        left to deliver it is stopped at once instead of being left to finish importing MLflow first."""
        self._process.close(timeout=5.0 if self._process.pending() else 0.0)

    def _learned_run_id(self, run_id: str) -> None:
        with self._lock:  # the answer to start and the child's own report may both bring it
            first, self._announced = not self._announced, True
        self.run_id = run_id
        if first and self.on_run_id:
            self.on_run_id(run_id)

    # ---- logging (all non-blocking) ----------------------------------------------------------------------
    def log_metrics(self, records) -> None:
        """Queue ``(name, value, step)`` records. Steps a re-attached run already holds are skipped."""
        now = int(time.time() * 1000)
        self._process.post_items([("metric", name, float(value), int(step), now) for name, value, step in records])

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        self._queue_one(("artifact", str(local_path), artifact_path))

    def log_figure(self, figure, artifact_file: str) -> None:
        """Render now (the figure may change later), upload in the background. ``artifact_file`` may name a
        folder of the run's artifacts (``per_class_accuracy/val.png``)."""
        path = self._artifact_path(artifact_file)
        figure.savefig(path)
        self._queue_one(("artifact", str(path), _folder_of(artifact_file)))

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self._artifact_path(artifact_file)
        path.write_text(text)
        self._queue_one(("artifact", str(path), _folder_of(artifact_file)))

    def _artifact_path(self, name: str) -> Path:
        """Where a generated artifact waits for its upload: OUTPUT_DIR/mlflow_artifacts, so that it is still
        there for tools/upload_pending.py when MLflow was unreachable."""
        import tempfile

        folder = self.pending_dir / "mlflow_artifacts" if self.pending_dir else Path(tempfile.mkdtemp())
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def log_model(self, model, input_example, name: str = "model", step: int = 0, register_as: str = "",
                  timeout: float = 120.0):
        """``mlflow.pytorch.log_model`` of the plain module as ``name``, in torch.export's "pt2" format (loading
        it back does not unpickle code); with ``register_as``, also a new version of that registered model.
        MLflow attaches the run's metrics at ``step`` (the final evaluation's, when it is the last step) to it.

        Runs at the end of training and returns MLflow's ``ModelInfo`` (``model_id``, ``model_uri``), or None:
        a failure is a warning, model_final.pth stays."""
        if not self.flush(timeout) or self.run_id is None:
            logger.warning("MLflow is unreachable: the model is not logged (model_final.pth is in OUTPUT_DIR)")
            return None
        import mlflow
        import mlflow.pytorch

        model = cpu_copy(model).eval()  # the live model keeps its device and its training mode
        previous_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        try:
            # log_model only works through the fluent API, whose tracking URI is process-wide (and exported
            # to the environment): set it for this call only.
            with environment("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI")):
                mlflow.set_tracking_uri(self.tracking_uri)
                try:
                    with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
                        info = mlflow.pytorch.log_model(model, name=name, input_example=input_example.numpy(),
                                                        serialization_format="pt2", step=step,
                                                        pip_requirements=[f"torch=={_torch_version()}"])
                    if register_as:
                        self._register(info, register_as)
                finally:
                    # log_model makes the model the process's "active model", to which MLflow would attach every
                    # later metric (the last system metrics sample): only the final evaluation belongs to it.
                    logging.getLogger("mlflow.tracking.fluent").setLevel(logging.WARNING)  # no "cleared" line
                    mlflow.clear_active_model()
                    mlflow.set_tracking_uri(previous_uri)
            make_client(self.tracking_uri).update_run(self.run_id, status="RUNNING")  # end() sets the final status
            return info
        except Exception as error:
            logger.warning(f"could not log the model to MLflow: {short(error)}")
            return None

    def _register(self, info, name: str) -> None:
        import mlflow

        version = mlflow.register_model(info.model_uri, name)
        # MLflow reserves the alias "latest" (models:/NAME/latest already means the newest version).
        logger.info(f"registered the model as '{name}' version {version.version} (models:/{name}/latest)")

    def set_tags(self, tags: dict) -> None:
        self._queue_one(("tags", {k: str(v) for k, v in tags.items()}))

    def log_table(self, data: dict, artifact_file: str) -> None:
        """``{"column": [values, ...]}`` as an MLflow table (shown in the run's artifacts and evaluation view)."""
        self._queue_one(("table", data, artifact_file))

    def log_inputs(self, datasets: list[dict]) -> None:
        """Dataset inputs of the run: dicts with ``name``, ``digest``, ``source_type``, ``source`` (JSON text),
        ``profile`` (JSON text) and ``context`` (``training``, ``validation``, ...)."""
        self._queue_one(("inputs", list(datasets)))

    def _queue_one(self, item) -> None:
        self._process.post_items([item], urgent=True)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait (at most ``timeout``) until everything queued so far is in the store."""
        return self._process.wait_delivered(timeout)

    def save_pending(self, quiet: bool = True) -> None:
        """Write every undelivered item to ``mlflow_pending.jsonl`` (or remove the file when none is left).

        Runs on the checkpoint writer thread just before each checkpoint file is written (and at the end):
        whatever is older than that checkpoint is then either in MLflow or in the file. Items newer than the
        checkpoint may be in the file too; a resume skips the steps the run already holds.
        """
        if self.pending_dir is None:
            return
        path = self.pending_dir / PENDING_FILE
        pending = self._process.pending()
        if not pending:
            path.unlink(missing_ok=True)
            return
        # Enough to create the run later (tools/upload_pending.py) if it never existed.
        header = {"tracking_uri": self.tracking_uri, "experiment": self.experiment_name, "run_id": self.run_id,
                  "run_name": self.run_name, **self._header}
        lines = [json.dumps(header)] + [json.dumps(item) for item in pending]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
        if not quiet:
            logger.warning(f"{len(pending)} MLflow records not yet delivered are saved in {path}")

    def _requeue_pending_file(self) -> list:
        """A resumed run first re-sends what an earlier process could not deliver (duplicates are skipped)."""
        if self.pending_dir is None or not (self.pending_dir / PENDING_FILE).is_file():
            return []
        _, items = read_pending_file(self.pending_dir / PENDING_FILE)
        return [tuple(item) for item in items if item[0] in RESENDABLE]


class SystemMetricsInDelivery:
    """The delivery process's system-metrics sampler, seen from the training."""

    def __init__(self, process: DeliveryProcess):
        self._process = process

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sampling and publish a last sample (waits at most ``timeout``)."""
        self._process.ask(("stop_system_metrics",), ("system_metrics_stopped",), timeout)


def read_pending_file(path: Path) -> tuple[dict, list]:
    lines = Path(path).read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:] if line.strip()]


def _folder_of(artifact_file: str) -> str | None:
    folder = str(Path(artifact_file).parent)
    return None if folder == "." else folder


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


