"""The MLflow side of ``engine.tracking.MLflowTracker``: it runs in a child process of the training.

MLflow's SQLAlchemy store spends about 80 µs of Python per metric record in ``log_batch``; in the training
process that time would be taken from the step (the GIL) by a delivery thread, as MLflow's own asynchronous
logging does (``tools/bench_mlflow_logging.py`` measures both). Here it runs in its own process, on its own core
when there is one, and writes only through ``MlflowClient``'s public calls. ``serve`` is that process's main
loop: it receives the tracker's messages over a pipe, delivers the items in order through ``DeliveryQueue``
(retrying while the store is down), and answers with how many items it has delivered so far, the run id once
the run exists, and its log lines. It ignores SIGINT, SIGTERM and SIGUSR1 (the training decides when to stop)
and exits when the pipe closes: when the training ends, or is killed.

This module imports only the standard library and MLflow (never torch), so the process starts quickly.
"""

import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from pathlib import Path

logger = logging.getLogger("engine.mlflow")

MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_REQUEST = 100
# MLflow 3's UI opens an experiment on its GenAI pages (traces overview) unless this experiment tag says it is
# for training models: then it opens on the runs. The values are those of the UI's experiment-kind selector.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store (None for any other store)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database instead of into ``./mlruns`` of the cwd."""
    database = sqlite_path(uri)
    return (database.resolve().parent / "artifacts").as_uri() if database is not None else None


def make_client(uri: str):
    from mlflow import MlflowClient

    # MLflow's own HTTP retries can hold a request for minutes; we retry ourselves, in the background.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    root = artifact_root(uri)
    if root is None:
        return MlflowClient(tracking_uri=uri)
    sqlite_path(uri).parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates the "Default" experiment of a new database with the artifact root it reads from this
    # variable when it opens the store (in the constructor or the first request, after which the store is
    # cached); without it, that experiment's artifacts would land in ./mlruns of whatever the cwd is.
    with environment("_MLFLOW_SERVER_ARTIFACT_ROOT", root):
        client = MlflowClient(tracking_uri=uri)
        client.get_experiment_by_name("Default")
    return client


@contextmanager
def environment(name: str, value: str | None):
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


def artifact_folder(artifact_file: str) -> str | None:
    """The folder part of a run artifact's name (None at the top)."""
    folder = Path(artifact_file).parent.as_posix()
    return None if folder == "." else folder


def is_unreachable(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in ("connection", "max retries", "timed out", "timeout", "unreachable"))


def short(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


class RunDelivery:
    """Delivers items into one MLflow run, creating it (or re-attaching ``run_id``) when first needed.

    Items: ``("metric", name, value, step, timestamp_ms)``, ``("artifact", path, folder)``, ``("tags", dict)``,
    ``("status", status)``, ``("table", data, file)``, ``("inputs", [dataset dicts])``.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str, params: dict, tags: dict,
                 run_id: str | None, on_run_id=None, client=None, name_prefix: str = ""):
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.name_prefix = name_prefix  # what the run is ("eval", "rerun"), before the name MLflow picks
        self.client = client or make_client(tracking_uri)
        self.run_id, self._params, self._tags = run_id, dict(params), dict(tags)
        self.on_run_id = on_run_id
        self._logged_steps: dict[str, int] = {}  # per metric: last step already in the run (after a resume)
        self.before_delivery = None  # called before each request: a seam for tests that need a slow store

    @property
    def exists(self) -> bool:
        """Whether the run exists in the store with its params (``ensure_run`` succeeded)."""
        return self.run_id is not None and self._params is None

    def deliver(self, batch: list) -> None:
        if self.before_delivery is not None:
            self.before_delivery()
        self.ensure_run()
        kind = batch[0][0]
        if kind == "metric":
            self._deliver_metrics(batch)
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
            self._deliver_table(*batch[0][1:])
        elif kind == "inputs":
            self._deliver_inputs(batch[0][1])

    def _deliver_metrics(self, batch: list) -> None:
        from mlflow.entities import Metric

        # Exact resume recomputes the steps between the checkpoint and the crash with identical values; the
        # run already holds them, so they are not logged twice.
        records = [(name, value, step, timestamp) for _, name, value, step, timestamp in batch
                   if step > self._logged_steps.get(name, -1)]
        if not records:
            return
        metrics = [Metric(name, value, timestamp, step) for name, value, step, timestamp in records]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        for name, _, step, _ in records:  # a re-queued copy of a delivered step (after a resume) is skipped too
            self._logged_steps[name] = max(step, self._logged_steps.get(name, -1))

    def _deliver_table(self, data: dict, artifact_file: str) -> None:
        """A new table goes through ``log_table`` (which makes it one in the UI); its rows are written here, as
        are later ones: ``log_table``'s own append re-reads the file with pandas, which turns class names such
        as "0" into numbers. Rows of a ``step`` the table holds already (re-sent after a resume) are left out."""
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            table = self._held_table(artifact_file, folder)
            if table is None:  # then rewritten below: log_table writes floats with 10 digits, the rest 17
                self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)
                table = {"columns": list(data), "data": []}
            columns, rows = table["columns"], table["data"]
            held = {row[columns.index("step")] for row in rows} if "step" in columns else set()
            new = [list(row) for row in zip(*(data[column] for column in columns), strict=True)
                   if "step" not in columns or row[columns.index("step")] not in held]
            if new:
                path = Path(folder) / "new" / Path(artifact_file).name
                path.parent.mkdir()
                path.write_text(json.dumps({"columns": columns, "data": rows + new}))
                self.client.log_artifact(self.run_id, str(path), artifact_folder(artifact_file))

    def _held_table(self, artifact_file: str, folder: str) -> dict | None:
        """The run's table ``artifact_file`` as MLflow wrote it ({"columns", "data"}), or None."""
        import json

        if not any(f.path == artifact_file for f in self.client.list_artifacts(self.run_id,
                                                                                artifact_folder(artifact_file))):
            return None
        with environment("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
            return json.loads(Path(self.client.download_artifacts(self.run_id, artifact_file, folder)).read_text())

    def _deliver_inputs(self, datasets: list[dict]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], None, d["profile"]),
                               tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def ensure_run(self) -> None:
        if self.exists:
            return
        if self.run_id is None:
            run = self.client.create_run(self._experiment_id(), run_name=self.run_name or None, tags=self._tags)
            self.run_id, already = run.info.run_id, {}
            if self.name_prefix and not self.run_name:  # MLflow's unique name, saying what the run is
                self.client.update_run(self.run_id, name=f"{self.name_prefix}-{run.info.run_name}")
        else:
            run = self.client.get_run(self.run_id)
            if run.info.status != "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
            self._logged_steps = {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                                  for key in run.data.metrics}
            already = run.data.params
        self._log_params({k: v for k, v in self._params.items() if k not in already})
        self._params = None  # logged: later calls only check the run exists
        if self.on_run_id:
            self.on_run_id(self.run_id)

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            root = artifact_root(self.tracking_uri)
            location = f"{root}/{self.experiment_name}" if root else None
            return self.client.create_experiment(self.experiment_name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # one made before, or "Default": a kind set by hand stays
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_REQUEST])


class LowPriorityThread:
    """Runs calls one at a time in a daemon thread at the lowest CPU priority (nice 19).

    MLflow's SQLAlchemy store spends ~50-60 µs of CPU per metric value; a LeNet at batch 16 on 2 CPU cores sends
    ~1,100 values a second, so this work took ~8 % of a core from torch's two threads, which then wait for each
    other. train_net.py against a bare loop, side by side (2026-12-06): 0.85-0.88 with the deliveries at normal
    priority, 0.94-0.95 with them here (0.96-0.97 without MLflow). Linux keeps a nice value per thread, so only
    this thread is lowered and the deliveries someone waits for still go at normal priority (``DeliveryQueue``).
    Elsewhere it runs at normal priority.
    """

    NICENESS = 19

    def __init__(self, name: str):
        self._calls: deque = deque()
        self._ready = threading.Condition()
        threading.Thread(target=self._serve, name=name, daemon=True).start()  # abandoned if a request hangs

    def run(self, function, *args):
        """``function(*args)`` in the thread; returns its result or raises its exception."""
        future = Future()
        with self._ready:
            self._calls.append((future, function, args))
            self._ready.notify()
        return future.result()

    def _serve(self) -> None:
        if sys.platform == "linux":
            with suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.NICENESS)
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._calls)
                future, function, args = self._calls.popleft()
            try:
                future.set_result(function(*args))
            except BaseException as error:
                future.set_exception(error)


class DeliveryQueue:
    """An ordered queue drained by one background thread through ``deliver(batch)``.

    Consecutive metric records are merged into one batch; any other item goes alone. Metrics wait until a full
    request (``max_metrics``) is queued, the oldest has waited ``max_delay`` seconds, or
    ``flush``/``hurry``/``close`` asks: each request costs the store a fixed amount of work (~8 ms of CPU for
    SQLite). A batch that fails is put back at the head and retried with back-off; ``flush``/``close`` wait at
    most their timeout. ``delivered`` counts the items delivered so far (skipped duplicates included).

    With ``background``, metrics that nobody waits for are delivered at the lowest CPU priority
    (``LowPriorityThread``); a flush, anything but metrics, and metrics logged more than ``max_lag`` seconds ago
    go at normal priority, so that on a machine busy with other work the metrics still arrive.
    """

    def __init__(self, deliver, max_delay: float = 5.0, on_delivered=None,
                 max_metrics: int = MAX_METRICS_PER_REQUEST, background: bool = False, max_lag: float = 20.0):
        self._deliver, self.max_delay, self.on_delivered = deliver, max_delay, on_delivered
        self.max_metrics = max_metrics  # per request
        self.max_lag = max_lag
        self._background = LowPriorityThread("mlflow-background") if background else None
        self._items: deque = deque()
        self._oldest_since = 0.0  # when the queue last went from empty to non-empty
        self._in_flight: list = []
        self._condition = threading.Condition()
        self._closing = False
        self._waiting = 0  # flush() calls waiting for the queue to empty
        self._hurry = False  # send without waiting for more metrics until the queue is empty
        self.delivered = 0
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

    def hurry(self) -> None:
        """Send what is queued now, without waiting for more metrics (``flush`` without the wait)."""
        with self._condition:
            self._hurry = True
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
        delivered = self.flush(timeout) if timeout > 0 else not self.pending()
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
        while self._items and self._items[0][0] == "metric" and len(batch) < self.max_metrics:
            batch.append(self._items.popleft())
        return batch

    def _send_now(self) -> bool:
        """Whether the head of the (non-empty) queue should go now rather than wait for more metrics."""
        return (self._waiting > 0 or self._hurry or self._items[0][0] != "metric"
                or len(self._items) >= self.max_metrics
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

    def _deliver_batch(self, batch: list) -> None:
        if self._background is None or self._waited_for(batch):
            self._deliver(batch)
        else:
            self._background.run(self._deliver, batch)

    def _waited_for(self, batch: list) -> bool:
        """Whether ``batch`` should go at normal priority: asked for, not metrics, or late (a metric item's
        last field is when it was logged, in ms)."""
        return (self._waiting > 0 or self._hurry or batch[0][0] != "metric"
                or time.time() - batch[0][-1] / 1000 > self.max_lag)

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
                self._deliver_batch(self._in_flight)
                failures = 0
                self.delivered += len(self._in_flight)
                if self.on_delivered is not None:
                    self.on_delivered(self.delivered)
            except Exception as error:
                failures += 1
                retry_at = time.monotonic() + min(10.0, 0.25 * 2 ** min(failures, 6))
                if failures == 1:
                    logger.warning(f"MLflow logging failed ({short(error)}); retrying in the background")
                with self._condition:
                    self._items.extendleft(reversed(self._in_flight))  # retry these first, in order
            with self._condition:
                self._in_flight = []
                self._hurry = self._hurry and bool(self._items)
                self._condition.notify_all()


class DeliveryServer:
    """The child process's state: the run, its queue and its system-metrics sampler, driven by messages."""

    def __init__(self, tell):
        self.tell = tell  # sends a message back to the training process
        self.run: RunDelivery | None = None
        self.queue: DeliveryQueue | None = None
        self.sampler = None
        self._sampler_options: dict | None = None
        self._lock = threading.Lock()
        self._client = None  # opened early ("open"), while the training process is still being built
        self.status_asked = False  # the training process asked for the run's final status

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "open":
            self._open(message[1])
        elif kind == "start":
            self._start(**message[1])
        elif kind == "items":
            self.status_asked = self.status_asked or any(item[0] == "status" for item in message[1])
            self.queue.extend(message[1])
        elif kind == "flush":
            self.queue.hurry()
        elif kind == "before_delivery":
            self.run.before_delivery = message[1]
        elif kind == "system_metrics":
            self._sampler_options = message[1]
            if self.run.exists:
                self._start_sampler(self.run.run_id)
        elif kind == "stop_system_metrics":
            self._stop_sampler()
            self.tell("system_metrics_stopped")

    def _open(self, tracking_uri: str) -> None:
        """Connect to an existing store before the run starts (nothing is written to it)."""
        try:
            self._client = make_client(tracking_uri)
            self._client.search_experiments(max_results=1)  # SQLite: the engine and its tables; HTTP: a request
        except Exception:  # unreachable, or worse: "start" tries again and reports it
            self._client = None

    def _start(self, **run) -> None:
        early = self._client if self._client is not None and self._client.tracking_uri == run["tracking_uri"] else None
        self.run = RunDelivery(**run, on_run_id=self._on_run_id, client=early)
        self.queue = DeliveryQueue(self.run.deliver, on_delivered=lambda count: self.tell("delivered", count),
                                   background=True)
        try:
            self.run.ensure_run()
            self.tell("started", self.run.run_id, None)
        except Exception as error:
            if not is_unreachable(error):
                self.tell("failed", short(error))
                return
            self.tell("started", None, f"MLflow at {self.run.tracking_uri} is unreachable ({short(error)}); "
                                       "training goes on and the run is created, with everything logged so far, "
                                       "when it answers")
        # Only the background deliveries run at nice 19 (DeliveryQueue). The whole process at nice 19 starved on a
        # busy machine: beside two CPU-bound processes a 4-epoch digits run took 31.7 s instead of 14.1 s, its end
        # waiting ~13 s for the last deliveries. nice 5 or 10 and SCHED_BATCH gave no gain.
        self.queue.start()

    def _on_run_id(self, run_id: str) -> None:
        self.tell("run_id", run_id)
        if self._sampler_options is not None:
            self._start_sampler(run_id)

    def _start_sampler(self, run_id: str) -> None:
        from engine.system_metrics import SystemMetrics

        with self._lock:
            if self.sampler is None and self._sampler_options is not None:
                self.sampler = SystemMetrics(run_id, self.run.tracking_uri, **self._sampler_options)

    def _stop_sampler(self) -> None:
        with self._lock:
            sampler, self.sampler, self._sampler_options = self.sampler, None, None
        if sampler is not None:
            sampler.stop()

    def close(self) -> None:
        self._stop_sampler()
        if self.queue is not None:
            self.queue.close(timeout=0)  # the training process saved what is undelivered
        if self.run is not None and self.run.exists and not self.status_asked:
            self._mark_failed()

    def _mark_failed(self) -> None:
        """The training process is gone without a final status (kill -9, out of memory, a lost node): the run
        must not stay RUNNING. FAILED, until a --resume re-attaches it."""
        try:
            self.run.client.set_terminated(self.run.run_id, status="FAILED")
            logger.warning(f"the training process ended without a final status: MLflow run {self.run.run_id} "
                           "marked FAILED (a --resume continues it)")
        except Exception as error:  # the store is unreachable: nothing more can be done from here
            logger.warning(f"MLflow run {self.run.run_id} could not be marked FAILED ({short(error)})")


class _ForwardToParent(logging.Handler):
    def __init__(self, tell):
        super().__init__()
        self.tell = tell

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.tell("log", record.levelno, record.getMessage())
        except Exception:  # the training process is gone
            pass


def serve(read_fd: int, write_fd: int) -> None:
    """The child process: deliver what arrives on ``read_fd`` until it closes; answer on ``write_fd``."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)  # Ctrl+C reaches the whole process group; the training decides
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    lock = threading.Lock()

    def tell(*message) -> None:
        with lock:
            outbox.send(message)

    # Our own lines (retries, outages) go to the training's log; MLflow's chatter ("Creating initial MLflow
    # database tables") not at all, its warnings and errors too. MLflow gives its logger a handler of its own
    # when it is imported: replaced here.
    import mlflow  # noqa: F401 - now, while the training process builds the run (it touches no store yet)

    forward = _ForwardToParent(tell)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).handlers = [forward]
        logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(name).propagate = False
    logging.getLogger().addHandler(forward)
    logging.getLogger().setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    logging.captureWarnings(True)
    server = DeliveryServer(tell)
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            break
        try:
            server.handle(message)
        except Exception as error:  # a bug here must not leave the training waiting
            logger.warning(f"MLflow delivery: {message[0]} failed ({short(error)})")
    server.close()
    sys.stdout.flush()
    os._exit(0)  # a request still hanging in a daemon thread is abandoned


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
