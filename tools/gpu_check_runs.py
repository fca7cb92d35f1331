"""The trainings of ``make gpu-check``, run as a user runs them, and what they left behind.

Every training is tools/train_net.py (through tools/gpu_check_hooks.py, which adds recording hooks) in its own
process, or under torchrun, in its own session, into ``<root>/<name>`` with one MLflow store ``<root>/mlflow.db``
for them all. Its output goes to ``<root>/<name>.log``; every wait is bounded and a run still going at its limit is
killed with its whole process tree.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CHILD = str(REPO / "tools" / "gpu_check_hooks.py")
DIGITS = str(REPO / "config" / "digits.yaml")
# config/digits.yaml with ResNet-18 (BatchNorm): 1,348 training images, 22 batches of 64 per epoch.
ITERS_PER_EPOCH = 22
# Stop signals as tools/slurm_train.sh passes them to torchrun, which sends them on to its workers.
TORCHRUN_SIGNALS = ("--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "60")


class Finished:
    """One training that ended: its folder, exit code, output, MLflow run and record files."""

    def __init__(self, workspace: "Workspace", name: str, code: int | None, seconds: float):
        self.workspace, self.name, self.code, self.seconds = workspace, name, code, seconds
        self.output_dir = workspace.root / name
        self.records = workspace.root / f"{name}.records"

    @property
    def output(self) -> str:
        return (self.workspace.root / f"{self.name}.log").read_text(errors="replace")

    def summary(self) -> str:
        """Why a run failed, in one line: its exit code and its last lines."""
        if self.code is None:
            return f"{self.name}: still running at its time limit (killed)"
        tail = [line.strip() for line in self.output.strip().splitlines()[-3:]]
        return f"{self.name}: exit code {self.code}: " + " | ".join(tail)

    def mlflow_run(self):
        run_id = (self.output_dir / "mlflow_run_id").read_text().strip()
        return self.workspace.client().get_run(run_id)

    def metric(self, key: str) -> float:
        return self.mlflow_run().data.metrics[key]

    def history(self, key: str) -> list[float]:
        """Every logged value of ``key``, by step (the last value logged for a step)."""
        client = self.workspace.client()
        values = {m.step: m.value for m in sorted(client.get_metric_history(self.mlflow_run().info.run_id, key),
                                                   key=lambda m: m.timestamp)}
        return [values[step] for step in sorted(values)]

    def model_final(self) -> dict:
        return load(self.output_dir / "model_final.pth")

    def checkpoint(self, iteration: int | None = None) -> dict:
        """The checkpoint of ``iteration`` (default: the newest)."""
        found = sorted(self.output_dir.glob("checkpoint_*.pth"))
        if iteration is not None:
            found = [path for path in found if path.name == f"checkpoint_{iteration:08d}.pth"]
        if not found:
            raise FileNotFoundError(f"no checkpoint{'' if iteration is None else f' {iteration}'} in {self.output_dir}")
        return load(found[-1])

    def record(self, name: str, rank: int = 0):
        return json.loads((self.records / f"{name}_rank{rank}.json").read_text())

    def record_lines(self, name: str, rank: int = 0) -> list[dict]:
        path = self.records / f"{name}_rank{rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Workspace:
    """The check's temporary folder and MLflow store, and the way every training is started."""

    def __init__(self, root: Path, gpus: int):
        self.root, self.gpus = root, gpus
        self.store = f"sqlite:///{root / 'mlflow.db'}"
        self._client = None

    def client(self):
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(self.store)
        return self._client

    def train_args(self, name: str, opts) -> list[str]:
        """train_net.py's arguments: digits with ResNet-18, no model logged, TF32 left to the hooks."""
        return ["--config-file", DIGITS, "TRAIN.MODEL_TYPE", "resnet18", "TRAIN.DETERMINISTIC", "True",
                "LOG.PROGRESS_BAR", "False", "MLFLOW.LOG_MODEL", "False", "MLFLOW.SYSTEM_METRICS", "False",
                "MLFLOW.TRACKING_URI", self.store, "MLFLOW.EXPERIMENT_NAME", "gpu-check", "MLFLOW.RUN_NAME", name,
                "OUTPUT_DIR", str(self.root / name), *[str(opt) for opt in opts]]

    def command(self, name: str, opts, hooks=(), processes: int = 0, torchrun_options=()) -> list[str]:
        """The command of training ``name``: one process, or torchrun with ``processes`` workers (DDP)."""
        child = [CHILD, "--records", str(self.root / f"{name}.records"), *hooks, "--"]
        if processes:
            launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), *torchrun_options]
            opts = [*opts, "TRAIN.DISTRIBUTED_BACKEND", "ddp", "TRAIN.GPUS", "-1"]  # one GPU per process
        else:
            launcher = [PYTHON]
        return [*launcher, *child, *self.train_args(name, opts)]

    def start(self, name: str, opts, hooks=(), processes: int = 0, torchrun_options=(), resume=False) -> "Launch":
        command = self.command(name, opts, hooks, processes, torchrun_options) + (["--resume"] if resume else [])
        return Launch(command, self.root, self.root / f"{name}.log", append=resume)

    def train(self, name: str, opts, hooks=(), processes: int = 0, resume: bool = False,
              timeout: float = 300) -> Finished:
        """Run training ``name`` to its end (at most ``timeout`` seconds)."""
        launch = self.start(name, opts, hooks, processes, resume=resume)
        code = launch.wait(timeout)
        return Finished(self, name, code, launch.seconds)

    def run_command(self, name: str, command: list, timeout: float = 300, env: dict | None = None) -> Finished:
        """Any other command (a Python snippet, tools/benchmark.py), with its output in ``<root>/<name>.log``."""
        launch = Launch(command, self.root, self.root / f"{name}.log", env=env)
        return Finished(self, name, launch.wait(timeout), launch.seconds)


def child_env(**extra) -> dict:
    """The user's environment without MLflow settings, TF32 off in NVIDIA's libraries, output unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW", "_MLFLOW"))}
    env.update(NVIDIA_TF32_OVERRIDE="0", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Launch:
    """One process in a session of its own, output to ``log_path``."""

    def __init__(self, command: list, cwd: Path, log_path: Path, env: dict | None = None, append: bool = False):
        self.command = [str(part) for part in command]
        self.started = time.monotonic()
        with open(log_path, "a" if append else "w") as log:
            log.write(f"$ {' '.join(self.command)}\n")
            log.flush()
            self.process = subprocess.Popen(self.command, cwd=cwd, env=env or child_env(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.seconds = 0.0

    def wait(self, timeout: float) -> int | None:
        """The exit code; None (after killing the whole tree) when it runs past ``timeout`` seconds."""
        try:
            code = self.process.wait(timeout=max(0.1, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        self.seconds = time.monotonic() - self.started
        return code

    def tree(self) -> list[int]:
        """This process and every process below it (torchrun's workers are in sessions of their own)."""
        return [self.process.pid, *descendants(self.process.pid)]

    def signal_tree(self, signum: int) -> None:
        """``signum`` to every process of the tree, as Slurm's ``scancel --signal`` reaches every process."""
        for pid in self.tree():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal_tree(signal.SIGKILL)
        self.process.wait(timeout=30)


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread or the process ended meanwhile
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def wait_for(condition, what: str, launch: Launch, timeout: float = 180.0):
    """Poll ``condition()`` until it is truthy; an error once ``launch`` has exited or ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if launch.process.poll() is not None:
            raise RuntimeError(f"the training exited with {launch.process.poll()} before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.05)
    return result


def progress(records: Path, rank: int = 0) -> int:
    """The last iteration rank ``rank`` finished (the --progress hook), 0 before the first."""
    try:
        return int((records / f"progress_rank{rank}").read_text() or 0)
    except (OSError, ValueError):
        return 0
