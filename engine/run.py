"""The pieces of a run's life that ``engine.runner.Runner`` puts in order: the run folder, the resume point,
reproducibility, and ``TrainingRun`` (training under signal handling, the final steps, and an MLflow run that
always ends FINISHED, FAILED or KILLED).

Why the order (enforced by the Runner's code): the folder, log.txt and config.yaml exist before anything can
fail; the MLflow run starts only once the config and the checkpoint have passed every check, and its id is
written to the folder as soon as it exists; whatever happens, it ends with a final status after everything
queued was delivered or saved to the folder.
"""

import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import Checkpointer, CheckpointError, atomic_write_bytes
from engine.distributed import all_gather_objects, broadcast_object, get_world_size, is_main_process
from engine.eval_report import log_per_class_accuracy
from engine.figures import confusion_matrix_figure
from engine.hooks import MetricWriter, TrainingInterrupted
from engine.logger import restore_streams, setup_logging
from engine.system_metrics import SystemMetrics, node_id, samples_this_process
from engine.tracking import ModelCard, redact_credentials
from ptengine.config import ConfigError

logger = logging.getLogger("engine")

RUN_ID_FILE = "mlflow_run_id"
# Raised by every rank at the same iteration: the ranks leave together (see engine.distributed.process_group).
AGREED_STOPS = (TrainingInterrupted, FloatingPointError, CheckpointError)
# The run's tags a resume brings up to date (the others say how the run began).
RESUME_UPDATES = ("world_size", "distributed_backend", "device", "amp_dtype", "host")
# Ctrl+C, `kill`, and Slurm's warning before a time limit or preemption (sbatch --signal=USR1@90).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class RunFolder:
    """OUTPUT_DIR of this run (the same path on every rank), created and checked on the main process.

    A run that fails before its first step leaves no new folder behind: ``discard_if_unused`` removes it if
    this run created it and it holds nothing worth keeping. A folder that existed is never removed.
    """

    KEEP = ("checkpoint_*.pth", "model_*.pth", "mlflow_pending.jsonl")  # never discarded with these inside

    def __init__(self, path):
        self.path = Path(broadcast_object(str(path))).resolve()
        self.created = False
        if is_main_process():
            self._create()

    def _create(self) -> None:
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path / ".write_test", b"")
            (self.path / ".write_test").unlink()
        except OSError as error:
            raise ConfigError(f"cannot write to OUTPUT_DIR {self.path}: {error.strerror}; "
                              "choose a writable folder with OUTPUT_DIR <path>") from None

    def start_log(self, tee_streams: bool = False) -> None:
        """log.txt, from here on: the engine's lines, or (``tee_streams``) all the process prints."""
        setup_logging(self.path, is_main_process(), tee_streams)
        logger.info(f"output folder: {self.path}")

    def write_config(self, text: str) -> None:
        if is_main_process():
            atomic_write_bytes(self.path / "config.yaml", text.encode())

    def remember_run_id(self, run_id: str) -> None:
        """Written as soon as the MLflow run exists, so that --resume finds it even before a checkpoint."""
        atomic_write_bytes(self.path / RUN_ID_FILE, run_id.encode())

    def previous_run_id(self, resumed) -> str | None:
        """The run to re-attach: the checkpoint's, else the one written at start (a crash before a checkpoint)."""
        saved = resumed[1] if resumed else {}
        from_checkpoint = saved.get("hooks", {}).get(MetricWriter.state_key, {}).get("mlflow_run_id")
        path = self.path / RUN_ID_FILE
        return from_checkpoint or (path.read_text().strip() if path.is_file() else None)

    def discard_if_unused(self, started: bool) -> None:
        if started or not self.created or any(any(self.path.glob(p)) for p in self.KEEP):
            return
        restore_streams()  # log.txt is open in the folder; what follows goes to the terminal only
        shutil.rmtree(self.path, ignore_errors=True)


def newest_run_folder(root: Path) -> str | None:
    """The newest folder under ``root``/output holding a checkpoint, as a path relative to ``root``."""
    found = sorted((root / "output").glob("*/checkpoint_*.pth"), key=lambda p: p.stat().st_mtime)
    return str(found[-1].parent.relative_to(root)) if found else None


def configure_reproducibility(seed: int, deterministic: bool, device=None) -> str:
    """Seed the generators and choose between exact and fast kernels; return the mode for the run's record.

    ``deterministic`` (TRAIN.DETERMINISTIC), or a run on the CPU (whose kernels are exact at no cost): "exact",
    deterministic algorithms, no cuDNN autotuning, float32 matmuls and convolutions in full precision; the same
    run gives the same bits, resumed or not. Else, on a GPU: "fast", cuDNN times its algorithms for each new input
    shape and picks the fastest (cudnn.benchmark), and float32 matmuls and convolutions run in TF32 on GPUs that
    have it (Ampere and newer: several times the float32 matmul throughput, a 10-bit mantissa).
    """
    # Not Python's global random: MLflow draws run names from it, and seeding it named every run alike.
    np.random.seed(seed)
    torch.manual_seed(seed)  # identical model initialisation in every process
    mode = reproducibility_mode(deterministic, device)
    exact = mode == "exact"
    if exact:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.backends.cudnn.benchmark = not exact
    torch.backends.cudnn.deterministic = exact
    set_deterministic(exact)
    # The allow_tf32 flags, not torch 2.14's newer fp32_precision settings: after setting those (cudnn.conv's alone,
    # or matmul's to tf32), reading the flags or torch.get_float32_matmul_precision() raises, and torch.export
    # reads them: logging the model failed.
    torch.backends.cuda.matmul.allow_tf32 = not exact
    torch.backends.cudnn.allow_tf32 = not exact
    return mode


def reproducibility_mode(deterministic: bool, device=None) -> str:
    """"exact" or "fast" (see ``configure_reproducibility``); ``device`` None: as if on a GPU."""
    on_cpu = device is not None and torch.device(device).type == "cpu"
    return "exact" if deterministic or on_cpu else "fast"


def set_deterministic(mode: bool, warn_only: bool = True) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=True)`` without importing ``torch._inductor`` (~1 s
    of every start): that function imports it only to copy ``mode`` into inductor's config, which matters to
    torch.compile alone, and engine.compile.compile_model sets it there before compiling."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def find_resume_point(checkpointer: Checkpointer, check_config: Callable[[str, Path], None]):
    """The newest checkpoint that loads, as ``(path, state)``, after ``check_config(saved_yaml, path)`` accepted
    the config it was written with; None starts fresh (unreadable checkpoints are kept under another name)."""
    found = checkpointer.load_newest_valid()
    chosen = all_gather_objects(found[0].name if found else None)
    if len(set(chosen)) > 1:  # e.g. a node that sees another folder, or an older copy of it
        raise CheckpointError(f"--resume: the ranks found different checkpoints in {checkpointer.output_dir} "
                              f"({', '.join(f'rank {rank}: {name}' for rank, name in enumerate(chosen))}); "
                              "give every node the same OUTPUT_DIR on a shared filesystem")
    if found is None:
        unreadable = checkpointer.set_aside_unreadable()
        if unreadable:
            logger.warning(f"--resume: none of the {len(unreadable)} checkpoints in {checkpointer.output_dir} "
                           f"could be read; they are kept as {unreadable[0].name}, ...; starting from scratch")
        else:
            logger.info(f"--resume: no checkpoint in {checkpointer.output_dir}, starting from scratch")
        return None
    path, state = found
    check_config(state.get("config", ""), path)
    return found


@dataclass
class RunRecord:
    """What the MLflow run records besides the metrics: given by the builder, logged when the run starts."""

    params: dict
    tags: dict
    artifacts: list[Path] = field(default_factory=list)  # files, e.g. config.yaml
    texts: dict[str, str] = field(default_factory=dict)  # artifact name -> content (package list, diff)
    background: list[threading.Thread] = field(default_factory=list)  # started with the run, joined at its end
    system_metrics: bool = True
    tracking_uri: str = ""  # where system metrics go (each node's first process samples)


@dataclass
class FinalSteps:
    """What happens after the last epoch, besides model_final.pth."""

    class_names: list[str]
    model: torch.nn.Module | None = None  # saved as model_final.pth and logged (default: the trainer's module)
    evaluate_test: Callable[[], dict] | None = None  # the test split's evaluation, where there is one
    example_input: torch.Tensor | None = None  # a batch of two as the module takes it (for torch.export)
    card: ModelCard | None = None  # how the logged model takes a user's images, and its description
    # Metric-name prefix ("val_", "test_") -> its dataset ({"name", "digest"}), asked for when the model is logged.
    metric_datasets: Callable[[], dict[str, dict]] = dict
    log_model: bool = True
    register_as: str = ""  # also a new version of this registered model (empty: not registered)


class TrainingRun:
    """Resume, train under signal handling, finish, and give the MLflow run its final status."""

    def __init__(self, trainer, checkpointer: Checkpointer, tracker, record: RunRecord, final: FinalSteps):
        self.trainer, self.checkpointer, self.tracker = trainer, checkpointer, tracker
        self.record, self.final = record, final
        self.system_metrics = None
        self.status, self.wait_for_mlflow, self.quick = "FAILED", None, False  # None: the tracker's end_wait
        self.test_metrics: dict[str, float] = {}  # test_loss, test_acc1 where the dataset has a test split

    def run(self, resumed=None, previous_run: str | None = None) -> None:
        if resumed is not None:
            restore_trainer(self.trainer, *resumed)
        self._start(previous_run)
        if resumed is not None and self.tracker is not None:
            self._record_resume(resumed[1])
        try:
            with stop_on_signals(self.trainer):
                self.trainer.train()
            self._stop_system_metrics()  # before the model is logged: MLflow would attach later samples to it
            self._finish()
            self.status = "FINISHED"
        except BaseException as error:
            self._ended_by(error)
            raise
        finally:
            self._end()

    def _start(self, previous_run: str | None) -> None:
        sampling = self.record.system_metrics and samples_this_process()
        options = {"node_id": node_id(), "resume": previous_run is not None}
        if self.tracker is not None:
            start_tracker(self.tracker, self.record, previous_run)
            if sampling:  # from its delivery process: MLflow is imported there, not here
                self.system_metrics = self.tracker.sample_system_metrics(**options)
        run_id = broadcast_object(self.tracker.run_id if self.tracker else None)  # every rank knows the run
        if run_id and sampling and self.tracker is None:  # the first process of another node
            self.system_metrics = SystemMetrics(run_id, self.record.tracking_uri, **options)

    def _record_resume(self, saved: dict) -> None:
        """A tag per resume (where, from how many processes to how many), and the run's process tags as they are
        now: a resume on another number of processes continues the run, but not bit for bit."""
        saved_processes = len(saved["rng"]) if isinstance(saved.get("rng"), list) else 1
        processes = get_world_size()
        if saved_processes != processes:
            logger.warning(f"resuming a run of {saved_processes} process(es) with {processes}: it continues from the "
                           "checkpoint, but not bit for bit (exact resume needs the same number of processes)")
        current = {key: self.record.tags[key] for key in RESUME_UPDATES if key in self.record.tags}
        self.tracker.set_tags({**current, f"resumed_at_iteration_{self.trainer.iter}":
                               f"world_size {saved_processes} -> {processes}"})

    def _finish(self) -> None:
        """model_final.pth, the final confusion matrix, the test split, the model with its final metrics."""
        trainer, tracker, final = self.trainer, self.tracker, self.final
        model = final.model if final.model is not None else trainer.unwrapped_model
        path = self.checkpointer.save_model("model_final.pth", model)
        logger.info(f"saved {path}")
        latest = trainer.latest_eval or {}
        if tracker is not None and "val_confusion" in latest:
            tracker.log_figure(confusion_matrix_figure(latest["val_confusion"], final.class_names),
                               "confusion_matrix.png")
        if final.evaluate_test is not None:
            self._evaluate_test()
        if tracker is not None and final.log_model and final.card is not None:
            if get_world_size() > 1:  # they wait without a timeout (engine.distributed.wait_for_main_process)
                logger.info("logging the model to MLflow on rank 0; the other ranks wait for it")
            card = replace(final.card, metric_datasets=final.metric_datasets())
            info = tracker.log_model(model, final.example_input, card, step=trainer.iter,
                                     register_as=final.register_as)
            if info is not None:
                logger.info(f"logged the model to MLflow: mlflow.pyfunc.load_model('runs:/{tracker.run_id}/model')")

    def _evaluate_test(self) -> None:
        results, step = self.final.evaluate_test(), self.trainer.iter
        self.test_metrics = {"test_loss": results["loss"], "test_acc1": results["acc1"]}
        logger.info(f"test_loss {results['loss']:.4f}  test_acc1 {results['acc1']:.4f}")
        if self.tracker is not None:
            self.tracker.log_metrics([("test_loss", results["loss"], step), ("test_acc1", results["acc1"], step)])
            log_per_class_accuracy(self.tracker, self.final.class_names, "test", results, step,
                                   ["per_class_accuracy/test.png"])
            self.tracker.log_figure(confusion_matrix_figure(results["confusion"], self.final.class_names),
                                    "confusion_matrix_test.png")

    def _ended_by(self, error: BaseException) -> None:
        if isinstance(error, TrainingInterrupted):  # quick: under torchrun or Slurm, SIGKILL follows 30 s later
            self.status, self.wait_for_mlflow = "KILLED", 10.0
        elif isinstance(error, KeyboardInterrupt):  # a second Ctrl+C: leave quickly, the rest goes to the file
            self.status, self.wait_for_mlflow, self.quick = "KILLED", 3.0, True
        elif isinstance(error, FloatingPointError):
            logger.error(str(error))

    def _stop_system_metrics(self) -> None:
        if self.system_metrics is not None:
            self.system_metrics.stop()
            self.system_metrics = None

    def _end(self) -> None:
        if not self.quick:  # what a hook queued and did not wait for (train_net.py leaves with os._exit)
            self.checkpointer.close()
        self._stop_system_metrics()
        if self.tracker is None:
            return
        if not self.quick:
            for thread in self.record.background:
                if thread.is_alive():
                    thread.join()
        end_tracker(self.tracker, self.status, self.wait_for_mlflow)


def start_tracker(tracker, record: RunRecord, previous_run: str | None = None) -> None:
    """Create (or re-attach) the MLflow run with its params and tags, and queue the record's artifacts."""
    run_id = tracker.start(record.params, tags=record.tags, run_id=previous_run)
    logger.info(f"MLflow run {run_id or '(pending)'} in experiment '{tracker.experiment_name}'")
    logger.info(f"MLflow store: {redact_credentials(tracker.tracking_uri)}")
    for path in record.artifacts:
        tracker.log_artifact(path)
    for name, text in record.texts.items():
        tracker.log_text(text, name)
    for thread in record.background:
        thread.start()


def end_tracker(tracker, status: str, wait: float | None = None) -> None:
    """The final log.txt, then the final status once everything queued was delivered (or saved for later)."""
    sys.stdout.flush()
    if tracker.pending_dir is not None:
        tracker.log_artifact(tracker.pending_dir / "log.txt")
    if not tracker.end(status, timeout=wait):
        logger.warning(f"upload later with: python tools/upload_pending.py {tracker.pending_dir}")


def restore_trainer(trainer, path: Path, state: dict) -> None:
    try:
        trainer.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as error:
        detail = str(error).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit this run ({detail}); "
                              "resume with the config it was written with") from None
    logger.info(f"resumed from {path.name} at iteration {trainer.iter}")


def record_evaluation(tracker, record: RunRecord, split: str, results: dict, class_names) -> None:
    """``--eval-only``: an MLflow run of its own with the loss, accuracy, per-class table and confusion matrix."""
    start_tracker(tracker, record)
    tracker.log_metrics([(f"{split}_loss", results["loss"], 0), (f"{split}_acc1", results["acc1"], 0)])
    log_per_class_accuracy(tracker, class_names, split, results, 0, [f"per_class_accuracy/{split}.png"])
    tracker.log_figure(confusion_matrix_figure(results["confusion"], class_names), "confusion_matrix.png")
    end_tracker(tracker, "FINISHED")


@contextmanager
def stop_on_signals(trainer):
    """SIGINT/SIGTERM/SIGUSR1: finish the step, checkpoint, stop. A second SIGINT interrupts at once."""
    def request_stop(signum, frame):
        name = signal.Signals(signum).name
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        again = "; Ctrl+C again stops at once" if signum == signal.SIGINT else ""
        if is_main_process():  # every rank gets the signal (torchrun, Slurm, Ctrl+C): one line says so
            logger.warning(f"{name} received: stopping after this step with a checkpoint{again}")
        trainer.request_stop(name)

    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    else:
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
