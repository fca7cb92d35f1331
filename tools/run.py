"""The life of one run: set up, train (or evaluate), and always leave the MLflow run in a final state.

Order matters for never losing a run: the output folder, log.txt and config.yaml exist before anything
can fail; the MLflow run id is written to OUTPUT_DIR as soon as it is known; the run is marked FINISHED,
FAILED or KILLED whatever happens, after everything queued was delivered or saved to OUTPUT_DIR.
"""

import logging
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from config import ConfigError, flatten_config, load_config
from config.defaults import REPO_ROOT
from config.setup import merge_opts, validate_config
from engine.checkpoint import Checkpointer, CheckpointError, atomic_write_bytes
from engine.distributed import (
    broadcast_object,
    destroy_process_group,
    init_distributed,
    is_main_process,
    module_to_evaluate,
    process_group,
    select_device,
)
from engine.evaluation import evaluate, per_class_accuracy
from engine.figures import confusion_matrix_figure, per_class_accuracy_figure
from engine.hooks import TrainingInterrupted
from engine.logger import restore_streams, setup_logging
from engine.precision import AMP_DTYPES, autocast_runs_on
from engine.system_metrics import SystemMetrics, node_id, samples_this_process
from engine.tracking import MLflowTracker, make_client, resolve_tracking_uri
from tools.build import build_data, build_ema, build_network, build_trainer, check_names
from tools.dataset_inputs import DatasetInputs
from tools.run_record import collect_run_record, git_diff, installed_packages, redact_credentials

logger = logging.getLogger("engine")

RUN_ID_FILE = "mlflow_run_id"
# Keys that may differ when resuming: they do not change which numbers training computes.
RESUME_MAY_CHANGE = {
    "OUTPUT_DIR", "TRAIN.MAX_EPOCHS", "TRAIN.GPUS", "TRAIN.DISTRIBUTED_BACKEND", "DATA.NUM_WORKERS",
    "DATA.PRETRANSFORM", "DATA.CACHE_DIR", "MODEL.WEIGHTS", "MLFLOW.TRACKING_URI", "MLFLOW.RUN_NAME", "LOG.PERIOD",
    "LOG.PROGRESS_BAR", "EVAL.PERIOD", "EVAL.SPLIT", "CHECKPOINT.PERIOD", "CHECKPOINT.KEEP", "MLFLOW.LOG_MODEL",
    "MLFLOW.SYSTEM_METRICS", "MLFLOW.REGISTER_MODEL",
    "TRAIN.COMPILE",  # the same computation; compiled kernels may round differently (engine/compile.py)
}


# Raised by every rank at the same iteration: the ranks leave together (see engine.distributed.process_group).
AGREED_STOPS = (TrainingInterrupted, FloatingPointError, CheckpointError)


def train(cfg, resume: bool = False, extra_tags: dict | None = None, hooks=()) -> Path:
    """Train from ``cfg`` (continuing from OUTPUT_DIR's newest checkpoint with ``resume``); return OUTPUT_DIR.

    ``hooks``: your HookBase instances, run after the built-in metric writer and before the checkpointer.
    """
    if resume and not cfg.OUTPUT_DIR:
        raise ConfigError(f"--resume needs the OUTPUT_DIR of the run to continue (an empty OUTPUT_DIR makes a new "
                          f"folder); add OUTPUT_DIR {_newest_run_folder() or '<folder of the run>'}")
    # torchrun --max-restarts restarts failed workers with the same command line: they continue the run.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    with process_group(cfg.TRAIN.DISTRIBUTED_BACKEND, cfg.TRAIN.GPUS, leave_together=AGREED_STOPS):
        return _train(cfg, resume or restarted, extra_tags or {}, hooks)


def _train(cfg, resume: bool, extra_tags: dict, hooks=()) -> Path:
    check_names(cfg)  # mistakes that need no data are reported before anything is written
    device, num_gpus = select_device(cfg.TRAIN.GPUS, cfg.TRAIN.DISTRIBUTED_BACKEND)
    folder = RunFolder(cfg)
    cfg = with_output_dir(cfg, folder.path)  # config.yaml, the params and the tags say where the files are
    checkpointer = Checkpointer(folder.path, keep=cfg.CHECKPOINT.KEEP, enabled=is_main_process())
    if not resume and checkpointer.checkpoints():
        raise ConfigError(f"OUTPUT_DIR {folder.path} already holds checkpoints of an earlier run; continue it with "
                          "--resume, or choose another OUTPUT_DIR (nothing was changed)")
    trainer = None
    try:
        trainer = _prepare_and_train(cfg, folder, checkpointer, resume, extra_tags, hooks, device, num_gpus)
        return folder.path
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        stop.output_dir = folder.path  # for the resume command train_net.py prints
        raise
    except BaseException:
        folder.discard_if_unused(started=trainer is not None)
        raise


def _prepare_and_train(cfg, folder, checkpointer, resume, extra_tags, hooks, device, num_gpus):
    output_dir, main = folder.path, is_main_process()
    folder.start_log()
    resumed = find_resume_point(cfg, checkpointer, output_dir) if resume else None
    folder.write_config(cfg)  # after the resume check: a refused resume leaves the old config.yaml
    configure_reproducibility(cfg.SEED, cfg.TRAIN.DETERMINISTIC)
    if cfg.TRAIN.AMP and not autocast_runs_on(device, AMP_DTYPES[cfg.TRAIN.AMP_DTYPE]):
        logger.info("TRAIN.AMP is on but the run is on the CPU: training in float32 "
                    "(TRAIN.AMP_DTYPE bfloat16 runs on the CPU)")
    data = build_data(cfg, device)
    model = build_network(cfg, device, num_gpus)
    ema = build_ema(cfg, model)  # TRAIN.EMA_DECAY: evaluated, and saved as model_best / model_final (None = off)
    tracker = make_tracker(cfg, output_dir) if main else None
    trainer = build_trainer(cfg, model, data, device, tracker, checkpointer,
                            before_save=tracker.snapshot_pending if tracker else None, extra_hooks=hooks,
                            eval_report=make_eval_report(tracker, cfg.DATA.CLASSES, "val") if tracker else None,
                            ema=ema)
    config_text = cfg.dump()  # the config is frozen: dumped once, not at every checkpoint (~9 ms)
    trainer.checkpoint_extras = lambda: {"mlflow_run_id": tracker.run_id if tracker else None,
                                         "config": config_text}
    if resumed is not None:
        restore_trainer(trainer, *resumed)
    run = TrackedRun(cfg, tracker, data, resume, extra_tags, device, num_gpus, previous_run_id(output_dir, resumed))
    run.start()
    try:
        with stop_on_signals(trainer):
            trainer.train()
        run.stop_system_metrics()  # before the model is logged: MLflow would attach later samples to it
        finish_training(cfg, trainer, data, tracker, checkpointer, device, ema)
        run.status = "FINISHED"
    except BaseException as error:
        run.ended_by(error)
        raise
    finally:
        run.end()
    return trainer


class TrackedRun:
    """The MLflow side of one training: the run (created or re-attached once the config and checkpoint have
    passed every check), its inputs and system metrics, and its final status whatever happens."""

    def __init__(self, cfg, tracker, data, resume, extra_tags, device, num_gpus, previous_run):
        self.cfg, self.tracker, self.data, self.resume = cfg, tracker, data, resume
        self.extra_tags, self.device, self.num_gpus, self.previous_run = extra_tags, device, num_gpus, previous_run
        self.datasets = self.system_metrics = None
        self.status, self.wait_for_mlflow, self.quick = "FAILED", 60.0, False

    def start(self):
        if self.tracker is not None:
            tags = {**self.extra_tags, "mlflow.note.content": run_description(self.cfg, self.data)}
            start_tracker(self.cfg, Path(self.cfg.OUTPUT_DIR), self.previous_run if self.resume else None, tags,
                          self.device, self.num_gpus, tracker=self.tracker)
            self.datasets = DatasetInputs(self.tracker, self.cfg, self.data.splits)
            self.datasets.start()
        run_id = broadcast_object(self.tracker.run_id if self.tracker else None)  # every rank knows the run
        if run_id and self.cfg.MLFLOW.SYSTEM_METRICS and samples_this_process():
            self.system_metrics = SystemMetrics(run_id, resolve_tracking_uri(self.cfg.MLFLOW.TRACKING_URI),
                                                node_id=node_id(), resume=self.resume)

    def ended_by(self, error: BaseException) -> None:
        if isinstance(error, TrainingInterrupted):  # quick: under torchrun or Slurm, SIGKILL follows 30 s later
            self.status, self.wait_for_mlflow = "KILLED", 10.0
        elif isinstance(error, KeyboardInterrupt):  # a second Ctrl+C: leave quickly, the rest goes to the file
            self.status, self.wait_for_mlflow, self.quick = "KILLED", 3.0, True
        elif isinstance(error, FloatingPointError):
            logger.error(str(error))

    def stop_system_metrics(self) -> None:
        if self.system_metrics is not None:
            self.system_metrics.stop()
            self.system_metrics = None

    def end(self) -> None:
        self.stop_system_metrics()
        if self.tracker is None:
            return
        if self.datasets is not None and not self.quick:
            self.datasets.join()
        sys.stdout.flush()
        self.tracker.log_artifact(Path(self.cfg.OUTPUT_DIR) / "log.txt")
        if not self.tracker.end(self.status, timeout=self.wait_for_mlflow):
            logger.warning(f"upload later with: python tools/upload_pending.py {self.cfg.OUTPUT_DIR}")


def finish_training(cfg, trainer, data, tracker, checkpointer, device, ema=None) -> None:
    """model_final.pth, the final confusion matrix, the test split, the model with its final metrics: of the
    EMA weights with ``ema``, else of the trained ones."""
    model = ema.module if ema is not None else trainer.unwrapped_model
    final_path = checkpointer.save_model("model_final.pth", model)
    logger.info(f"saved {final_path}")
    final = trainer.latest_eval or {}
    if tracker is not None and "val_confusion" in final:
        tracker.log_figure(confusion_matrix_figure(final["val_confusion"], cfg.DATA.CLASSES), "confusion_matrix.png")
    if data.test is not None:
        results = evaluate(model, data.test, len(cfg.DATA.CLASSES), device, cfg.TRAIN.AMP,
                           AMP_DTYPES[cfg.TRAIN.AMP_DTYPE])
        logger.info(f"test_loss {results['loss']:.4f}  test_acc1 {results['acc1']:.4f}")
        if tracker is not None:
            tracker.log_metrics([("test_loss", results["loss"], trainer.iter),
                                 ("test_acc1", results["acc1"], trainer.iter)])
            make_eval_report(tracker, cfg.DATA.CLASSES, "test")(results, trainer.iter)
            tracker.log_figure(confusion_matrix_figure(results["confusion"], cfg.DATA.CLASSES),
                               "confusion_matrix_test.png")
    if tracker is not None and cfg.MLFLOW.LOG_MODEL:
        log_model(cfg, tracker, model, data, trainer.iter)


def log_model(cfg, tracker, model, data, step: int) -> None:
    """The model, named after what it is, with the metrics of the final step (the final evaluation's)."""
    example = next(iter(data.val.epoch(0))).images[:2].float().cpu()
    name = f"{cfg.TRAIN.MODEL_TYPE}-{cfg.DATA.DATASET_TYPE}"
    if tracker.log_model(model, example, name=name, step=step, register_as=cfg.MLFLOW.REGISTER_MODEL):
        logger.info(f"logged the model '{name}' to MLflow (mlflow.pytorch, pt2 format)")


def make_eval_report(tracker, class_names, split: str):
    """``report(results, step)``: per-class accuracy of one evaluation as a figure and a table in MLflow."""
    def report(results: dict, step: int) -> None:
        accuracies = per_class_accuracy(results["confusion"])
        name = f"per_class_accuracy/{split}_step_{step:08d}"
        title = f"{split} accuracy per class at step {step} (overall {results['acc1']:.3f})"
        tracker.log_figure(per_class_accuracy_figure(accuracies, class_names, title), f"{name}.png")
        counts = results["confusion"].sum(dim=1).tolist()
        tracker.log_table({"class": list(class_names), "accuracy": accuracies, "images": counts}, f"{name}.json")

    return report


def evaluate_only(cfg) -> dict:
    """``--eval-only``: evaluate MODEL.WEIGHTS on EVAL.SPLIT and log loss, accuracy and figures to MLflow."""
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("--eval-only needs the weights to evaluate: add MODEL.WEIGHTS <path to .pth>")
    init_distributed(cfg.TRAIN.DISTRIBUTED_BACKEND, cfg.TRAIN.GPUS)
    folder = None
    try:
        device, num_gpus = select_device(cfg.TRAIN.GPUS, cfg.TRAIN.DISTRIBUTED_BACKEND)
        folder = RunFolder(cfg)
        cfg = with_output_dir(cfg, folder.path)
        folder.start_log()
        folder.write_config(cfg)
        return _evaluate_and_log(cfg, folder.path, device, num_gpus)
    except BaseException:
        if folder is not None:
            folder.discard_if_unused(started=False)
        raise
    finally:
        destroy_process_group()


def _evaluate_and_log(cfg, output_dir: Path, device, num_gpus) -> dict:
    data = build_data(cfg, device)
    batches = data.test if cfg.EVAL.SPLIT == "test" else data.val
    if batches is None:
        raise ConfigError(f"the {cfg.DATA.DATASET_TYPE} dataset has no test split; use EVAL.SPLIT val")
    model = build_network(cfg, device, num_gpus)
    results = evaluate(module_to_evaluate(model), batches, len(cfg.DATA.CLASSES), device, cfg.TRAIN.AMP,
                       AMP_DTYPES[cfg.TRAIN.AMP_DTYPE])
    split = cfg.EVAL.SPLIT
    logger.info(f"{split}_loss {results['loss']:.4f}  {split}_acc1 {results['acc1']:.4f}  "
                f"({results['count']} images)")
    if is_main_process():
        tags = {"mode": "eval-only", "mlflow.note.content": f"evaluation of {cfg.MODEL.WEIGHTS} on the {split} "
                f"split of {cfg.DATA.DATASET_TYPE} ({results['count']} images)"}
        tracker = start_tracker(cfg, output_dir, None, tags, device, num_gpus)
        tracker.log_metrics([(f"{split}_loss", results["loss"], 0), (f"{split}_acc1", results["acc1"], 0)])
        make_eval_report(tracker, cfg.DATA.CLASSES, split)(results, 0)
        tracker.log_figure(confusion_matrix_figure(results["confusion"], cfg.DATA.CLASSES), "confusion_matrix.png")
        sys.stdout.flush()
        tracker.log_artifact(output_dir / "log.txt")
        tracker.end("FINISHED")
    return results


def rerun_config(run_id: str, opts: list[str]):
    """The config.yaml logged by ``run_id`` (plus ``opts``), and tags that point back to that run."""
    import tempfile

    client = make_client(resolve_tracking_uri(_tracking_uri_from(opts)))
    with tempfile.TemporaryDirectory(prefix="rerun-") as folder:
        try:
            client.get_run(run_id)
            config_file = client.download_artifacts(run_id, "config.yaml", folder)
        except Exception as error:
            raise ConfigError(f"cannot fetch config.yaml of MLflow run {run_id}: {str(error).splitlines()[0]}; "
                              "check the run id and MLFLOW.TRACKING_URI / MLFLOW_TRACKING_URI") from None
        source = load_config(config_file)
    # A re-run writes to a new output folder unless the command line names one.
    if "OUTPUT_DIR" not in opts[0::2]:
        opts = ["OUTPUT_DIR", ""] + opts
    cfg = source.clone()
    cfg.defrost()
    merge_opts(cfg, opts)
    validate_config(cfg)
    cfg.freeze()
    return cfg, {"rerun_of": run_id}


def _tracking_uri_from(opts: list[str]) -> str:
    pairs = dict(zip(opts[0::2], opts[1::2], strict=False))
    return pairs.get("MLFLOW.TRACKING_URI", "")


# ---- set-up helpers ----------------------------------------------------------------------------------------
class RunFolder:
    """OUTPUT_DIR of this run (default ``output/<timestamp>``, the same on every rank), created and checked.

    A run that fails before its first step leaves no new folder behind: ``discard_if_unused`` removes the
    folder if this run created it and it holds nothing worth keeping. A folder that existed is never removed.
    """

    KEEP = ("checkpoint_*.pth", "model_*.pth", "mlflow_pending.jsonl")  # never discarded with these inside

    def __init__(self, cfg):
        default = str(REPO_ROOT / "output" / time.strftime("%Y%m%d-%H%M%S"))
        self.path = Path(broadcast_object(cfg.OUTPUT_DIR or default)).resolve()
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

    def start_log(self) -> None:
        """log.txt: a copy of all the run prints, from here on."""
        setup_logging(self.path, is_main_process())
        logger.info(f"output folder: {self.path}")

    def write_config(self, cfg) -> None:
        if is_main_process():
            atomic_write_bytes(self.path / "config.yaml", cfg.dump().encode())

    def discard_if_unused(self, started: bool) -> None:
        if started or not self.created or any(any(self.path.glob(p)) for p in self.KEEP):
            return
        restore_streams()  # log.txt is open in the folder; what follows goes to the terminal only
        shutil.rmtree(self.path, ignore_errors=True)


def with_output_dir(cfg, output_dir: Path):
    """``cfg`` with OUTPUT_DIR resolved, so config.yaml, the params and the tags name the real folder."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.freeze()
    return cfg


def run_description(cfg, data) -> str:
    """What was trained on what, for the run's description in the MLflow UI."""
    sizes = f"{len(data.splits.train):,} training / {len(data.splits.val):,} validation images"
    return (f"{cfg.TRAIN.MODEL_TYPE} trained on {cfg.DATA.DATASET_TYPE} ({sizes}) for {cfg.TRAIN.MAX_EPOCHS} "
            f"epochs: {cfg.TRAIN.OPTIMIZER_TYPE}, LR {cfg.TRAIN.LR:g} ({cfg.TRAIN.SCHEDULER_TYPE}), "
            f"batch {cfg.TRAIN.BATCH_SIZE}. Files: {cfg.OUTPUT_DIR}")


def _newest_run_folder() -> str | None:
    """The newest folder under output/ holding a checkpoint, as a path relative to the repository."""
    found = sorted((REPO_ROOT / "output").glob("*/checkpoint_*.pth"), key=lambda p: p.stat().st_mtime)
    return str(found[-1].parent.relative_to(REPO_ROOT)) if found else None


def configure_reproducibility(seed: int, deterministic: bool) -> None:
    # Not Python's global random: MLflow draws run names from it, and seeding it named every run alike.
    np.random.seed(seed)
    torch.manual_seed(seed)  # identical model initialisation in every process
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms for each new input shape, picks the fastest
        torch.backends.cudnn.deterministic = False
        torch.use_deterministic_algorithms(False)


def find_resume_point(cfg, checkpointer: Checkpointer, output_dir: Path):
    """The newest valid checkpoint (path, state), after checking its config matches; None starts fresh."""
    found = checkpointer.load_newest_valid()
    if found is None:
        unreadable = checkpointer.set_aside_unreadable()
        if unreadable:
            logger.warning(f"--resume: none of the {len(unreadable)} checkpoints in {output_dir} could be read; "
                           f"they are kept as {unreadable[0].name}, ...; starting from scratch")
        else:
            logger.info(f"--resume: no checkpoint in {output_dir}, starting from scratch")
        return None
    path, state = found
    check_resume_config(cfg, state.get("config", ""), path)
    return found


def check_resume_config(cfg, saved_yaml: str, path: Path) -> None:
    import yaml
    from yacs.config import CfgNode

    saved = flatten_config(CfgNode(yaml.safe_load(saved_yaml) or {}))
    current = flatten_config(cfg)
    allowed = set(RESUME_MAY_CHANGE)
    if cfg.TRAIN.SCHEDULER_TYPE == "cosine":
        allowed.discard("TRAIN.MAX_EPOCHS")  # the cosine schedule spans MAX_EPOCHS: changing it changes the LRs
    if not cfg.TRAIN.AMP:
        allowed.add("TRAIN.AMP_DTYPE")  # unused without AMP (and AMP itself may not change)
    changed = sorted(k for k in current if k not in allowed and k in saved and saved[k] != current[k])
    if changed:
        details = ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in changed[:4])
        raise ConfigError(f"cannot resume from {path.name}: the config changes the training trajectory ({details}); "
                          "resume with the original values, or start a new run in another OUTPUT_DIR")


def make_tracker(cfg, output_dir: Path) -> MLflowTracker:
    def remember(run_id):  # written as soon as the run exists, so --resume finds it even before a checkpoint
        atomic_write_bytes(output_dir / RUN_ID_FILE, run_id.encode())

    return MLflowTracker(resolve_tracking_uri(cfg.MLFLOW.TRACKING_URI), cfg.MLFLOW.EXPERIMENT_NAME,
                         cfg.MLFLOW.RUN_NAME, pending_dir=output_dir, on_run_id=remember)


def start_tracker(cfg, output_dir: Path, previous_run: str | None, extra_tags: dict, device, num_gpus,
                  tracker: MLflowTracker | None = None) -> MLflowTracker:
    """Create (or re-attach) the run with params and the run record, and queue config.yaml and the freeze."""
    tracker = tracker or make_tracker(cfg, output_dir)
    tags = {**collect_run_record(cfg, device, num_gpus), "output_dir": str(output_dir), **extra_tags}
    params = {key: redact_credentials(value) for key, value in flatten_config(cfg).items()}
    run_id = tracker.start(params, tags=tags, run_id=previous_run)
    logger.info(f"MLflow run {run_id or '(pending)'} in experiment '{cfg.MLFLOW.EXPERIMENT_NAME}'")
    logger.info(f"MLflow store: {redact_credentials(tracker.tracking_uri)}")
    tracker.log_artifact(output_dir / "config.yaml")
    tracker.log_text(installed_packages(), "requirements-freeze.txt")
    if tags.get("git_dirty") == "True":
        tracker.log_text(git_diff(), "git_diff.patch")
    return tracker


def restore_trainer(trainer, path: Path, state: dict) -> None:
    try:
        trainer.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as error:
        detail = str(error).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit this run ({detail}); "
                              "resume with the config it was written with") from None
    logger.info(f"resumed from {path.name} at iteration {trainer.iter}")


def previous_run_id(output_dir: Path, resumed) -> str | None:
    """The run to re-attach: the checkpoint's, else the one written at start (a crash before any checkpoint)."""
    from_checkpoint = resumed[1].get("mlflow_run_id") if resumed else None
    path = output_dir / RUN_ID_FILE
    return from_checkpoint or (path.read_text().strip() if path.is_file() else None)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def stop_on_signals(trainer):
    """SIGINT/SIGTERM/SIGUSR1 (Slurm's warning before a time limit or preemption): finish the step, checkpoint,
    stop. A second SIGINT interrupts at once."""
    def request_stop(signum, frame):
        name = signal.Signals(signum).name
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        again = "; Ctrl+C again stops at once" if signum == signal.SIGINT else ""
        logger.warning(f"{name} received: stopping after this step with a checkpoint{again}")
        trainer.request_stop(name)

    if threading_main():
        previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    else:
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
