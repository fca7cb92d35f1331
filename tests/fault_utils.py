"""Run ``tools/train_net.py`` the way a user does, then break it on purpose: kill it, signal it, take its
MLflow server away. Shared by test_resume, test_signals, test_mlflow_outage and test_bad_input.

Every process starts in its own session (so it and its children form one process group), every wait is
bounded, and ``Training`` / ``MlflowServer`` are context managers that kill their process group on the way
out, so a failing test leaves nothing running. Nothing is written inside the repository.

Run as a script, this file *is* ``train_net.py`` with slowness injected through the environment, so a
test can hit a moment that is otherwise too short to aim at (each slowed moment first logs a line that
starts with ``fault:``)::

    FAULT_SLOW_STEP=0.3                  # seconds added to every training step ...
    FAULT_SLOW_STEPS=22                  # ... or only to these (comma-separated step numbers)
    FAULT_SLOW_EVAL=2                    # seconds added to each epoch end, after the evaluation
    FAULT_SLOW_SAVE=checkpoint_00000020.pth FAULT_SLOW_SAVE_SECONDS=2   # that save sits in fsync
    FAULT_SLOW_MLFLOW=30                 # each MLflow delivery (a slow server) waits that long first
    python tests/fault_utils.py --config-file config/digits.yaml KEY VALUE ...

and with hooks passed to ``train_net.main(hooks=...)``, the public way a user adds a hook (also under
torchrun: each worker runs this file)::

    FAULT_NAN_ON_RANK=1 FAULT_NAN_AT_STEP=5   # that rank's weights become NaN just before that step
    FAULT_RANK_NOISE=FOLDER                   # each step, rank r draws r+1 numbers from torch's global
                                              # generator (as dropout would) and appends them to
                                              # FOLDER/noise_rank<r>.txt as "<iteration> <numbers>"

``kill -USR2 PID`` makes a process of this script print where every thread is (SIGUSR1 stops a training).
"""

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
UPLOAD_PENDING = REPO_ROOT / "tools" / "upload_pending.py"
TRAIN_BG = REPO_ROOT / "tools" / "train_bg.sh"
DIGITS_CONFIG = REPO_ROOT / "config" / "digits.yaml"
PYTHON = sys.executable
MLFLOW = str(Path(sys.executable).parent / "mlflow")

# config/digits.yaml for 3 epochs: 1,797 images, 25% held out, batches of 64 -> 22 iterations per epoch.
ITERS_PER_EPOCH = 22
MAX_ITER = 3 * ITERS_PER_EPOCH
# The recipe's per-step state (EMA of the weights, mixup and cutmix draws, label smoothing) is on in every
# fault test, so that each kill, signal and outage also proves that state survives.
RECIPE = ["TRAIN.EMA_DECAY", "0.99", "TRAIN.LABEL_SMOOTHING", "0.1", "TRAIN.MIXUP_ALPHA", "0.2",
          "TRAIN.CUTMIX_ALPHA", "1.0"]
SMALL_RUN = ["TRAIN.MAX_EPOCHS", "3", "CHECKPOINT.PERIOD", "4", "MLFLOW.LOG_MODEL", "False",
             "LOG.PROGRESS_BAR", "False", *RECIPE]
WAIT = 240  # seconds: the longest any single wait may take (a process start takes 10-30 s on 2 busy cores)


def small_run_args(output_dir, tracking_uri, *extra) -> list[str]:
    """``train_net.py`` arguments of the small digits run (with the recipe) every fault test uses."""
    return ["--config-file", str(DIGITS_CONFIG), *SMALL_RUN, "OUTPUT_DIR", str(output_dir),
            "MLFLOW.TRACKING_URI", str(tracking_uri), *extra]


def sqlite_uri(folder) -> str:
    return f"sqlite:///{Path(folder) / 'mlflow.db'}"


_empty_store_template: Path | None = None


def empty_store(folder) -> str:
    """``sqlite_uri(folder)`` after copying an empty MLflow store there: one that MLflow created once in this
    test process. Creating a store runs MLflow's schema migrations (about 1.3 s of CPU and 1-3 s of fsyncs) in
    the MLflow delivery process of every training that gets a new store; the tests test other things.

    The copy has MLflow's tables and no experiment: MLflow creates its "Default" experiment (id 0) when it opens
    a store that lacks it, as it does in a new store, so that experiment's artifact folder is the one the run
    that opens the store first chooses, beside the store, not the template's."""
    global _empty_store_template
    if _empty_store_template is None:
        import atexit
        import shutil
        import sqlite3
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="mlflow-empty-store-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        # Creates the tables, without MLflow's "Creating initial MLflow database tables" on the stderr of the test
        # that happens to ask first (tests compare what a command printed).
        mlflow_logger = logging.getLogger("mlflow")
        level = mlflow_logger.level
        mlflow_logger.setLevel(logging.WARNING)
        try:
            mlflow_client(sqlite_uri(root)).search_experiments(max_results=1)
        finally:
            mlflow_logger.setLevel(level)
        with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as db, db:
            db.execute("DELETE FROM experiments WHERE experiment_id = 0")
        _empty_store_template = root / "mlflow.db"
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "mlflow.db").write_bytes(_empty_store_template.read_bytes())
    return sqlite_uri(folder)


def process_env(**extra) -> dict:
    """The environment of a user's shell, minus any MLflow settings of ours, with one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW", "_MLFLOW", "FAULT_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def wait_for(condition, what: str, timeout: float = WAIT, process=None, interval: float = 0.02):
    """Poll ``condition()`` until it returns something truthy (returned); fail after ``timeout`` seconds,
    or as soon as ``process`` (a Training) exits."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.name} exited with {process.poll()} before {what}:\n{process.tail()}")
        if time.monotonic() > deadline:
            details = f":\n{process.tail()}" if process is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{details}")
        time.sleep(interval)


class Training:
    """One ``train_net.py`` process in its own session; stdout and stderr go to ``<workdir>/<name>.out|err``.

    ``slow_step`` / ``slow_eval`` / ``slow_save`` run it through this file's script mode (see the module
    docstring). Use it as a context manager: the process group is killed on the way out if still running.
    """

    def __init__(self, args, workdir, name="train", slow_step=0.0, slow_steps=(), slow_eval=0.0, slow_save="",
                 slow_save_seconds=2.0, slow_mlflow=0.0, env=None, cwd=None, program=None):
        self.args, self.workdir, self.name = [str(a) for a in args], Path(workdir), name
        self.program = program  # instead of train_net.py: that program with ``args`` (e.g. a shell around it)
        self.cwd = Path(cwd) if cwd else self.workdir  # where the command runs; its output files stay in workdir
        self.faults = {"FAULT_SLOW_STEP": slow_step, "FAULT_SLOW_STEPS": ",".join(map(str, slow_steps)),
                       "FAULT_SLOW_EVAL": slow_eval, "FAULT_SLOW_SAVE": slow_save,
                       "FAULT_SLOW_SAVE_SECONDS": slow_save_seconds, "FAULT_SLOW_MLFLOW": slow_mlflow}
        self.env = env
        self.process: subprocess.Popen | None = None
        self.started_at = self.ended_at = None

    def start(self) -> "Training":
        assert self.process is None, f"{self.name} was already started"
        faulty = any(self.faults[k] for k in ("FAULT_SLOW_STEP", "FAULT_SLOW_EVAL", "FAULT_SLOW_SAVE",
                                              "FAULT_SLOW_MLFLOW"))
        script = Path(__file__).resolve() if faulty else TRAIN_NET
        env = self.env or process_env(**(self.faults if faulty else {}))
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            command = [self.program] if self.program else [PYTHON, str(script)]
            self.process = subprocess.Popen([*command, *self.args], cwd=self.cwd, env=env,
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                            start_new_session=True)
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def out_path(self) -> Path:
        return self.workdir / f"{self.name}.out"

    @property
    def err_path(self) -> Path:
        return self.workdir / f"{self.name}.err"

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr.splitlines()[-lines:])

    def poll(self):
        code = self.process.poll()
        if code is not None and self.ended_at is None:
            self.ended_at = time.monotonic()
        return code

    def wait(self, timeout: float = WAIT) -> int:
        """The exit code; an AssertionError (and a killed process group) if it runs longer than ``timeout``."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} still running after {timeout:.0f} s:\n{self.tail()}") from None
        return self.poll()

    def send(self, signum: int, group: bool = False) -> None:
        """``signum`` to the process (``group``: to its whole process group, as a terminal's Ctrl+C does)."""
        if self.process.poll() is None:
            (os.killpg if group else os.kill)(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL to the process group (no chance to clean up), then reap it."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
        if self.process is not None:
            self.poll()

    def __enter__(self) -> "Training":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def log_text(output_dir) -> str:
    path = Path(output_dir) / "log.txt"
    return path.read_text(errors="replace") if path.is_file() else ""


def log_size(output_dir) -> int:
    """Where the next process's lines will start: every process appends to OUTPUT_DIR/log.txt."""
    return len(log_text(output_dir))


def wait_for_log(output_dir, text: str, process, start: int = 0, timeout: float = WAIT) -> None:
    """Wait until ``text`` appears in log.txt after character ``start`` (i.e. was logged by ``process``)."""
    wait_for(lambda: text in log_text(output_dir)[start:], f"'{text}' in the log", timeout, process)


class IterationClock:
    """Notes, from a background thread, when each ``iter N/M`` console line of a run first appears in its
    log.txt (needs LOG.PERIOD 1 for one line per step): how the test measures stalls from the outside."""

    def __init__(self, output_dir, interval: float = 0.02):
        import threading

        self.output_dir, self.interval = Path(output_dir), interval
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "IterationClock":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def _read(self) -> None:
        import re

        now = time.monotonic()
        for match in re.finditer(r"iter (\d+)/\d+", log_text(self.output_dir)):
            self.seen.setdefault(int(match.group(1)), now)

    def longest_gap(self, start: float = 0.0, end: float = float("inf")) -> float:
        """The longest time between two consecutive iterations, among those logged between start and end."""
        steps = sorted(self.seen)
        gaps = [self.seen[b] - self.seen[a] for a, b in zip(steps, steps[1:], strict=False)
                if start <= self.seen[b] and self.seen[a] <= end]
        return max(gaps, default=0.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite store in ``folder``, which can be stopped
    (SIGKILL: it vanishes) and started again on the same port with the same store."""

    def __init__(self, folder, port: int | None = None):
        self.folder, self.port = Path(folder), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = WAIT) -> "MlflowServer":
        """Launch the server and return once it answers (several seconds: it imports a lot)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.folder / 'srv.db'}",
                   "--artifacts-destination", str(self.folder / "art")]
        self.starts += 1
        with open(self.folder / f"server-{self.starts}.log", "w") as log:
            self.process = subprocess.Popen(command, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env=process_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        wait_for(self.is_up, f"mlflow server on port {self.port}", timeout, interval=0.25)
        return self

    def is_up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            log = (self.folder / f"server-{self.starts}.log").read_text()
            raise AssertionError(f"mlflow server exited with {self.process.poll()}:\n{log[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Take the server away at once, as a crash or a pulled cable would; connections are then refused."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        wait_for(lambda: not _port_open(self.port), f"port {self.port} to close", timeout=30)

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# ---- reading results back ----------------------------------------------------------------------------------
def mlflow_client(tracking_uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=str(tracking_uri))


def runs_of(tracking_uri, experiment: str = "digits") -> list:
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def metric_history(tracking_uri, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every logged value of ``key`` as (step, value), by step; a step logged twice appears twice."""
    return sorted((m.step, m.value) for m in mlflow_client(tracking_uri).get_metric_history(run_id, key))


def load_weights(path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(path, expected_path) -> None:
    """Every tensor of ``path`` equals (``torch.equal``, bit for bit) the one of ``expected_path``."""
    import torch

    got, expected = load_weights(path), load_weights(expected_path)
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, f"{path} differs from {expected_path} in {different}"


class ReferenceRun:
    """The small digits run, uninterrupted, started in the background as soon as a module asks for it.

    Every fault test compares its outcome with this one; ``result()`` waits for it. One run serves the whole
    test session, the pytest-xdist workers included: the first to ask starts it in ``workdir``, a folder they
    all see, and every worker waits for the exit code it leaves there (``exit_code``).
    """

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.output_dir, self.tracking_uri = workdir / "output", sqlite_uri(workdir / "store")
        self.exit_file = workdir / "exit_code"
        self.training: Training | None = None
        self._run_id = None
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(workdir / "started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another worker started it
        empty_store(workdir / "store")
        # Through a shell that writes the exit code where every worker can read it (only this one can wait()).
        script = f'"$0" "$@"; echo $? > {shlex.quote(str(self.exit_file))}'
        self.training = Training(["-c", script, PYTHON, TRAIN_NET, *small_run_args(self.output_dir, self.tracking_uri)],
                                 workdir, "reference", program="sh").start()

    def result(self) -> "ReferenceRun":
        if self._run_id is None:
            wait_for(lambda: self.exit_file.is_file() and self.exit_file.read_text().strip(),
                     "the reference run to end", WAIT, interval=0.1)
            code = int(self.exit_file.read_text())
            assert code == 0, f"the reference run failed:\n{log_text(self.output_dir)[-3000:]}"
            (run,) = runs_of(self.tracking_uri)
            self._run_id = run.info.run_id
        return self

    @property
    def run_id(self) -> str:
        return self.result()._run_id

    @property
    def model_final(self) -> Path:
        return self.result().output_dir / "model_final.pth"

    def history(self, key: str) -> list[tuple[int, float]]:
        return metric_history(self.tracking_uri, self.run_id, key)


_shared_reference: ReferenceRun | None = None


def shared_reference_run(tmp_path_factory) -> ReferenceRun:
    """One reference run per test session, whichever module (of whichever xdist worker) asks first."""
    global _shared_reference
    if _shared_reference is None:
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            root = root.parent  # the session's folder, above every worker's own
        _shared_reference = ReferenceRun(root / "shared-reference")
    return _shared_reference


# ---- script mode: train_net.py with faults injected through hooks -------------------------------------------
def _run_train_net_with_injected_faults() -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 PID` prints where it is stuck
    sys.path.insert(0, str(REPO_ROOT))
    slow_save = os.environ.get("FAULT_SLOW_SAVE", "")
    save_delay = float(os.environ.get("FAULT_SLOW_SAVE_SECONDS") or 0)
    if slow_save:
        real_fsync = os.fsync

        def fsync(descriptor):  # the temporary file of that checkpoint stays unrenamed for save_delay seconds
            if os.readlink(f"/proc/self/fd/{descriptor}").rsplit("/", 1)[-1].startswith(f".{slow_save}."):
                _announce(f"writing {slow_save} takes {save_delay:g} s more")
                time.sleep(save_delay)
            real_fsync(descriptor)

        os.fsync = fsync
    from ptengine.tools.train_net import exit_at_once, main

    sys.argv = [str(TRAIN_NET), *sys.argv[1:]]
    exit_at_once(main(hooks=_hooks_from_the_environment()))


def _announce(message: str) -> None:  # to stderr, which the engine copies into log.txt
    print(f"fault: {message}", file=sys.stderr, flush=True)


def _hooks_from_the_environment() -> list:
    import functools

    import torch

    from engine.distributed import get_rank
    from engine.hooks import HookBase, MetricWriter

    class SlowSteps(HookBase):
        """Steps (all, or those numbered in ``steps``) start ``seconds`` late: a moment long enough to aim at."""

        def __init__(self, seconds: float, steps: set[int]):
            self.seconds, self.steps = seconds, steps

        def before_step(self):
            step = self.trainer.iter + 1
            if not self.steps or step in self.steps:
                _announce(f"step {step} starts, {self.seconds:g} s slower")
                time.sleep(self.seconds)
                _announce(f"step {step} runs")

    class SlowEpochEnd(HookBase):
        """Each epoch end takes ``seconds`` more, after the evaluation and before the epoch-end checkpoint."""

        def __init__(self, seconds: float):
            self.seconds = seconds

        def after_epoch(self):
            _announce(f"the epoch end at iteration {self.trainer.iter} takes {self.seconds:g} s more")
            time.sleep(self.seconds)

    class SlowMLflow(HookBase):
        """Every MLflow delivery waits ``seconds`` first (a slow store), through the tracker's public seam."""

        def __init__(self, seconds: float):
            self.seconds = seconds

        def before_train(self):
            for hook in self.trainer.hooks:
                if isinstance(hook, MetricWriter) and hook.tracker is not None:
                    # Runs in the tracker's delivery process: a picklable call, not a lambda.
                    hook.tracker.before_delivery = functools.partial(time.sleep, self.seconds)

    class PoisonWeights(HookBase):
        """Just before step ``step``, the weights of rank ``rank`` become NaN: its loss there is NaN."""

        def __init__(self, rank: int, step: int):
            self.rank, self.step = rank, step

        def before_step(self):
            if get_rank() == self.rank and self.trainer.iter + 1 == self.step:
                with torch.no_grad():
                    for parameter in self.trainer.unwrapped_model.parameters():
                        parameter.fill_(float("nan"))

    class RankNoise(HookBase):
        """Each step, rank r draws r+1 numbers from torch's global generator and writes them down."""

        def __init__(self, folder: str):
            self.folder = Path(folder)

        def after_step(self):
            rank = get_rank()
            numbers = " ".join(f"{value:.8f}" for value in torch.rand(rank + 1).tolist())
            with open(self.folder / f"noise_rank{rank}.txt", "a") as file:
                file.write(f"{self.trainer.iter} {numbers}\n")

    env = os.environ.get
    hooks = []
    if float(env("FAULT_SLOW_STEP") or 0):
        steps = {int(step) for step in env("FAULT_SLOW_STEPS", "").split(",") if step}
        hooks.append(SlowSteps(float(env("FAULT_SLOW_STEP")), steps))
    if float(env("FAULT_SLOW_EVAL") or 0):
        hooks.append(SlowEpochEnd(float(env("FAULT_SLOW_EVAL"))))
    if float(env("FAULT_SLOW_MLFLOW") or 0):
        hooks.append(SlowMLflow(float(env("FAULT_SLOW_MLFLOW"))))
    if env("FAULT_NAN_AT_STEP"):
        hooks.append(PoisonWeights(int(env("FAULT_NAN_ON_RANK", "0")), int(env("FAULT_NAN_AT_STEP"))))
    if env("FAULT_RANK_NOISE"):
        hooks.append(RankNoise(env("FAULT_RANK_NOISE")))
    return hooks


if __name__ == "__main__":
    _run_train_net_with_injected_faults()
