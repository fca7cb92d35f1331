"""Every MLflow call in the project lives in this module.

``MLflowTracker`` owns one MLflow run. Nothing it does blocks the training step: metrics and artifact
uploads go into an ordered queue that a background thread delivers (metrics merged into ``log_batch``
requests of at most 1000). A request that fails is retried with back-off before anything newer is sent,
so nothing is dropped or reordered. When the store is unreachable at start, the run is created as soon as
it answers. What is still undelivered at a checkpoint or at the end is written to
``OUTPUT_DIR/mlflow_pending.jsonl``; ``tools/upload_pending.py OUTPUT_DIR`` delivers it later.
"""

import copy
import json
import logging
import os
import re
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from config import ConfigError
from config.defaults import REPO_ROOT
from engine.checkpoint import atomic_write_bytes

logger = logging.getLogger("engine")

LOCAL_STORE = REPO_ROOT / "mlruns" / "mlflow.db"
PENDING_FILE = "mlflow_pending.jsonl"
MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_REQUEST = 100
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
    if scheme == "sqlite":
        Path(_sqlite_path(uri)).parent.mkdir(parents=True, exist_ok=True)
    return uri


def redact_credentials(value):
    """``http://user:secret@host`` -> ``http://user:***@host``: passwords never reach MLflow or the log."""
    return re.sub(r"(://[^/:@\s]+):[^/@\s]+@", r"\1:***@", value) if isinstance(value, str) else value


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database instead of into ``./mlruns`` of the cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(_sqlite_path(uri)).resolve().parent / "artifacts").as_uri()
    return None


def make_client(uri: str):
    from mlflow import MlflowClient

    # MLflow's own HTTP retries can hold a request for minutes; we retry ourselves, in the background.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    root = artifact_root(uri)
    if root is None:
        return MlflowClient(tracking_uri=uri)
    # MLflow creates the "Default" experiment of a new database with the artifact root it reads from this
    # variable when it opens the store (in the constructor or the first request, after which the store is
    # cached); without it, that experiment's artifacts would land in ./mlruns of whatever the cwd is.
    with _environment("_MLFLOW_SERVER_ARTIFACT_ROOT", root):
        client = MlflowClient(tracking_uri=uri)
        client.get_experiment_by_name("Default")
    return client


def cpu_copy(model):
    """A copy of ``model`` on the CPU, made without a second copy of its weights on the GPU."""
    import torch

    memo = {id(p): torch.nn.Parameter(p.detach().to("cpu", copy=True), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.detach().to("cpu", copy=True) for b in model.buffers()})
    return copy.deepcopy(model, memo)


@contextmanager
def _environment(name: str, value: str | None):
    """Set (or, with None, unset) an environment variable for the duration of the block."""
    previous = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _sqlite_path(uri: str) -> str:
    return uri[len("sqlite:///"):]


class MLflowTracker:
    """One MLflow run: create or re-attach, params, tags, metrics and artifacts (queued), final status.

    ``on_run_id`` is called with the run id as soon as the run exists (possibly from the sender thread
    when the store was down at start).
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str = "", pending_dir=None,
                 on_run_id=None):
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.pending_dir = Path(pending_dir) if pending_dir else None
        self.on_run_id = on_run_id
        self.client = make_client(tracking_uri)
        self.run_id: str | None = None
        self._params: dict = {}
        self._tags: dict = {}
        self._logged_steps: dict[str, int] = {}  # per metric: last step already in the run (after a resume)
        self._queue = _DeliveryQueue(self._deliver)
        # Called on the delivery thread before each request to the store: a public seam for tests that need
        # a slow store (tests/fault_utils.py); None in normal runs.
        self.before_delivery = None

    # ---- run lifecycle -----------------------------------------------------------------------------------
    def start(self, params: dict, tags: dict | None = None, run_id: str | None = None) -> str | None:
        """Create the run (or re-attach ``run_id``) and log the params it lacks; never raises for an outage."""
        self._params, self._tags, self.run_id = dict(params), dict(tags or {}), run_id
        self._requeue_pending_file()
        try:
            self._ensure_run()
        except Exception as error:
            if not _is_unreachable(error):
                raise
            logger.warning(f"MLflow at {self.tracking_uri} is unreachable ({_short(error)}); training goes on "
                           "and the run is created, with everything logged so far, when it answers")
        self._queue.start()
        return self.run_id

    def end(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Deliver what is queued (waiting at most ``timeout``), then mark the run FINISHED, FAILED or KILLED.

        Returns False when something could not be delivered; it is then in ``mlflow_pending.jsonl``.
        """
        self._queue.put(("status", status))
        delivered = self._queue.close(timeout)
        self.save_pending(quiet=False)
        return delivered

    # ---- logging (all non-blocking) ----------------------------------------------------------------------
    def log_metrics(self, records) -> None:
        """Queue ``(name, value, step)`` records. Steps a re-attached run already holds are skipped."""
        now = int(time.time() * 1000)
        self._queue.extend([("metric", name, value, step, now) for name, value, step in records])

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", str(local_path), artifact_path))

    def log_figure(self, figure, artifact_file: str) -> None:
        """Render now (the figure may change later), upload in the background. ``artifact_file`` may name a
        folder of the run's artifacts (``per_class_accuracy/val.png``)."""
        path = self._artifact_path(artifact_file)
        figure.savefig(path)
        self._queue.put(("artifact", str(path), _folder_of(artifact_file)))

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self._artifact_path(artifact_file)
        path.write_text(text)
        self._queue.put(("artifact", str(path), _folder_of(artifact_file)))

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
            with _environment("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI")):
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
            self.client.update_run(self.run_id, status="RUNNING")  # end() sets the final status
            return info
        except Exception as error:
            logger.warning(f"could not log the model to MLflow: {_short(error)}")
            return None

    def _register(self, info, name: str) -> None:
        import mlflow

        version = mlflow.register_model(info.model_uri, name)
        # MLflow reserves the alias "latest" (models:/NAME/latest already means the newest version).
        logger.info(f"registered the model as '{name}' version {version.version} (models:/{name}/latest)")

    def set_tags(self, tags: dict) -> None:
        self._queue.put(("tags", dict(tags)))

    def log_table(self, data: dict, artifact_file: str) -> None:
        """``{"column": [values, ...]}`` as an MLflow table (shown in the run's artifacts and evaluation view)."""
        self._queue.put(("table", data, artifact_file))

    def log_inputs(self, datasets: list[dict]) -> None:
        """Dataset inputs of the run: dicts with ``name``, ``digest``, ``source_type``, ``source`` (JSON text),
        ``profile`` (JSON text) and ``context`` (``training``, ``validation``, ...)."""
        self._queue.put(("inputs", list(datasets)))

    def flush(self, timeout: float = 30.0) -> bool:
        return self._queue.flush(timeout)

    def save_pending(self, quiet: bool = True) -> None:
        """Write every undelivered item to ``mlflow_pending.jsonl`` (or remove the file when none is left).

        Runs on the checkpoint writer thread just before each checkpoint file is written (and at the end):
        whatever is older than that checkpoint is then either in MLflow or in the file. Items newer than the
        checkpoint may be in the file too; a resume skips the steps the run already holds.
        """
        if self.pending_dir is None:
            return
        path = self.pending_dir / PENDING_FILE
        pending = self._queue.pending()
        if not pending:
            path.unlink(missing_ok=True)
            return
        # Enough to create the run later (tools/upload_pending.py) if it never existed.
        header = {"tracking_uri": self.tracking_uri, "experiment": self.experiment_name, "run_id": self.run_id,
                  "run_name": self.run_name, "params": self._params or {}, "tags": dict(self._tags)}
        lines = [json.dumps(header)] + [json.dumps(item) for item in pending]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
        if not quiet:
            logger.warning(f"{len(pending)} MLflow records not yet delivered are saved in {path}")

    # ---- delivery (background thread) --------------------------------------------------------------------
    def _deliver(self, batch: list) -> None:
        if self.before_delivery is not None:
            self.before_delivery()
        self._ensure_run()
        kind = batch[0][0]
        if kind == "metric":
            from mlflow.entities import Metric

            # Exact resume recomputes the steps between the checkpoint and the crash with identical values;
            # the run already holds them, so they are not logged twice.
            metrics = [Metric(name, value, timestamp, step) for _, name, value, step, timestamp in batch
                       if step > self._logged_steps.get(name, -1)]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                for metric in metrics:  # a re-queued copy of a delivered step (after a resume) is skipped too
                    self._logged_steps[metric.key] = max(metric.step, self._logged_steps.get(metric.key, -1))
        elif kind == "artifact":
            _, path, artifact_path = batch[0]
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, path, artifact_path)
        elif kind == "tags":
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in batch[0][1].items()])
        elif kind == "status":
            self.client.set_terminated(self.run_id, status=batch[0][1])
        elif kind == "table":
            self.client.log_table(self.run_id, data=batch[0][1], artifact_file=batch[0][2])
        elif kind == "inputs":
            self._deliver_inputs(batch[0][1])

    def _deliver_inputs(self, datasets: list[dict]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], None, d["profile"]),
                               tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def _ensure_run(self) -> None:
        if self.run_id is not None and self._params is None:
            return
        if self.run_id is None:
            run = self.client.create_run(self._experiment_id(), run_name=self.run_name or None, tags=self._tags)
            self.run_id, already = run.info.run_id, {}
        else:
            run = self.client.get_run(self.run_id)
            if run.info.status != "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
            self._logged_steps = self._last_steps(run)
            already = run.data.params
        self._log_params({k: v for k, v in self._params.items() if k not in already})
        self._params = None  # logged: later calls only check the run exists
        if self.on_run_id:
            self.on_run_id(self.run_id)

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

    def _requeue_pending_file(self) -> None:
        """A resumed run first re-sends what an earlier process could not deliver (duplicates are skipped)."""
        if self.pending_dir is None or not (self.pending_dir / PENDING_FILE).is_file():
            return
        _, items = read_pending_file(self.pending_dir / PENDING_FILE)
        self._queue.extend([tuple(item) for item in items if item[0] in RESENDABLE])


def read_pending_file(path: Path) -> tuple[dict, list]:
    lines = Path(path).read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:] if line.strip()]


class _DeliveryQueue:
    """An ordered queue drained by one background thread through ``deliver(batch)``.

    Consecutive metric records are merged into one batch; any other item goes alone. Metrics wait until a
    full request (1000) is queued, the oldest has waited ``max_delay`` seconds, or ``flush``/``close`` asks:
    each request costs the store a fixed amount of work (~8 ms of CPU for SQLite), which the delivery thread
    would otherwise take from training several times an epoch. A batch that fails is put back at the head and
    retried with back-off; ``flush``/``close`` wait at most their timeout.
    """

    def __init__(self, deliver, max_delay: float = 5.0):
        self._deliver, self.max_delay = deliver, max_delay
        self._items: deque = deque()
        self._oldest_since = 0.0  # when the queue last went from empty to non-empty
        self._in_flight: list = []
        self._condition = threading.Condition()
        self._closing = False
        self._waiting = 0  # flush() calls waiting for the queue to empty
        self._thread = threading.Thread(target=self._run, name="mlflow-delivery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item) -> None:
        self.extend([item])

    def extend(self, items) -> None:
        if not items:
            return
        with self._condition:
            was_empty = not self._items
            if was_empty:
                self._oldest_since = time.monotonic()
            self._items.extend(items)
            if was_empty or self._send_now():  # the sender sleeps until notified while the queue is empty
                self._condition.notify_all()

    def pending(self) -> list:
        with self._condition:
            return list(self._in_flight) + list(self._items)

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._condition:
            self._waiting += 1
            self._condition.notify_all()
            try:
                while (self._items or self._in_flight) and self._thread.is_alive():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._condition.wait(remaining)
                return not (self._items or self._in_flight)
            finally:
                self._waiting -= 1

    def close(self, timeout: float) -> bool:
        delivered = self.flush(timeout)
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)  # a request still hanging is abandoned (daemon thread)
        return delivered

    def _next_batch(self) -> list:
        if self._items[0][0] != "metric":
            return [self._items.popleft()]
        batch = []
        while self._items and self._items[0][0] == "metric" and len(batch) < MAX_METRICS_PER_REQUEST:
            batch.append(self._items.popleft())
        return batch

    def _send_now(self) -> bool:
        """Whether the head of the (non-empty) queue should go now rather than wait for more metrics."""
        return (self._waiting > 0 or self._items[0][0] != "metric" or len(self._items) >= MAX_METRICS_PER_REQUEST
                or time.monotonic() >= self._oldest_since + self.max_delay)

    def _due_in(self, retry_at: float) -> float | None:
        """0 when the head of the queue should be delivered now, else the seconds until it may be due
        (None: nothing queued, sleep until notified)."""
        if not self._items:
            return None
        now = time.monotonic()
        if now < retry_at:
            return retry_at - now
        return 0.0 if self._send_now() else self._oldest_since + self.max_delay - now

    def _run(self) -> None:
        failures, retry_at = 0, 0.0
        while True:
            with self._condition:
                while not self._closing and (due := self._due_in(retry_at)) != 0:
                    self._condition.wait(due)
                if self._closing:
                    return
                self._in_flight = self._next_batch()
            try:
                self._deliver(self._in_flight)
                failures = 0
            except Exception as error:
                failures += 1
                retry_at = time.monotonic() + min(10.0, 0.25 * 2 ** min(failures, 6))
                if failures == 1:
                    logger.warning(f"MLflow logging failed ({_short(error)}); retrying in the background")
                with self._condition:
                    self._items.extendleft(reversed(self._in_flight))  # retry these first, in order
            with self._condition:
                self._in_flight = []
                self._condition.notify_all()


def _folder_of(artifact_file: str) -> str | None:
    folder = str(Path(artifact_file).parent)
    return None if folder == "." else folder


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def _is_unreachable(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in ("connection", "max retries", "timed out", "timeout", "unreachable"))


def _short(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
