"""The life of one run: set up, train (or evaluate), and always leave the MLflow run in a final state.

Order matters for never losing a run: the output folder, log.txt and config.yaml exist before anything
can fail; the MLflow run id is written to OUTPUT_DIR as soon as it is known; the run is marked FINISHED,
FAILED or KILLED whatever happens, after everything queued was delivered or saved to OUTPUT_DIR.
"""

import logging
import os
import random
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
from engine.figures import confusion_matrix_figure
from engine.hooks import TrainingInterrupted
from engine.logger import setup_logging
from engine.tracking import MLflowTracker, make_client, resolve_tracking_uri
from tools.build import build_data, build_network, build_trainer, check_names
from tools.run_record import collect_run_record, git_diff, installed_packages, redact_credentials

logger = logging.getLogger("engine")

RUN_ID_FILE = "mlflow_run_id"
# Keys that may differ when resuming: they do not change which numbers training computes.
RESUME_MAY_CHANGE = {
    "OUTPUT_DIR", "TRAIN.MAX_EPOCHS", "TRAIN.GPUS", "TRAIN.DISTRIBUTED_BACKEND", "DATA.NUM_WORKERS",
    "DATA.PRETRANSFORM", "DATA.CACHE_DIR", "MODEL.WEIGHTS", "MLFLOW.TRACKING_URI", "MLFLOW.RUN_NAME", "LOG.PERIOD",
    "LOG.PROGRESS_BAR", "EVAL.PERIOD", "EVAL.SPLIT", "CHECKPOINT.PERIOD", "CHECKPOINT.KEEP", "MLFLOW.LOG_MODEL",
}


# Raised by every rank at the same iteration: the ranks leave together (see engine.distributed.process_group).
AGREED_STOPS = (TrainingInterrupted, FloatingPointError, CheckpointError)


def train(cfg, resume: bool = False, extra_tags: dict | None = None, hooks=()) -> Path:
    """Train from ``cfg`` (continuing from OUTPUT_DIR's newest checkpoint with ``resume``); return OUTPUT_DIR.

    ``hooks``: your HookBase instances, run after the built-in metric writer and before the checkpointer.
    """
    # torchrun --max-restarts restarts failed workers with the same command line: they continue the run.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    with process_group(cfg.TRAIN.DISTRIBUTED_BACKEND, cfg.TRAIN.GPUS, leave_together=AGREED_STOPS):
        return _train(cfg, resume or restarted, extra_tags or {}, hooks)


def _train(cfg, resume: bool, extra_tags: dict, hooks=()) -> Path:
    main = is_main_process()
    check_names(cfg)  # mistakes that need no data are reported before anything is written
    device, num_gpus = select_device(cfg.TRAIN.GPUS, cfg.TRAIN.DISTRIBUTED_BACKEND)
    output_dir = prepare_output_dir(cfg)
    checkpointer = Checkpointer(output_dir, keep=cfg.CHECKPOINT.KEEP, enabled=main)
    if not resume and checkpointer.checkpoints():
        raise ConfigError(f"OUTPUT_DIR {output_dir} already holds checkpoints of an earlier run; continue it with "
                          "--resume, or choose another OUTPUT_DIR (nothing was changed)")
    setup_logging(output_dir, main)
    resumed = find_resume_point(cfg, checkpointer, output_dir) if resume else None
    if main:
        atomic_write_bytes(output_dir / "config.yaml", cfg.dump().encode())
    configure_reproducibility(cfg.SEED, cfg.TRAIN.DETERMINISTIC)
    if cfg.TRAIN.AMP and device.type != "cuda":
        logger.info("TRAIN.AMP is on but the run is on the CPU: training in float32")
    data = build_data(cfg, device)
    model = build_network(cfg, device, num_gpus)

    tracker = make_tracker(cfg, output_dir) if main else None
    trainer = build_trainer(cfg, model, data, device, tracker, checkpointer,
                            before_save=tracker.snapshot_pending if tracker else None, extra_hooks=hooks)
    config_text = cfg.dump()  # the config is frozen: dumped once, not at every checkpoint (~9 ms)
    trainer.checkpoint_extras = lambda: {"mlflow_run_id": tracker.run_id if tracker else None,
                                         "config": config_text}
    if resumed is not None:
        restore_trainer(trainer, *resumed)
    # The MLflow run starts only now, when every mistake in the config or the checkpoint has surfaced.
    if tracker is not None:
        previous_run = previous_run_id(output_dir, resumed) if resume else None
        start_tracker(cfg, output_dir, previous_run, extra_tags, device, num_gpus, tracker=tracker)
    trainer.run_id = broadcast_object(tracker.run_id if tracker else None)  # every rank knows the run

    status, wait_for_mlflow = "FAILED", 60.0
    try:
        with stop_on_signals(trainer):
            trainer.train()
        finish_training(cfg, trainer, data, tracker, checkpointer, device)
        status = "FINISHED"
    except TrainingInterrupted:  # quick: under torchrun or Slurm, SIGKILL follows 30 s after the signal
        status, wait_for_mlflow = "KILLED", 10.0
        raise
    except KeyboardInterrupt:  # a second Ctrl+C: leave quickly, what is undelivered goes to the pending file
        status, wait_for_mlflow = "KILLED", 3.0
        raise
    except FloatingPointError as error:
        logger.error(str(error))
        raise
    finally:
        if tracker is not None:
            sys.stdout.flush()
            tracker.log_artifact(output_dir / "log.txt")
            if not tracker.end(status, timeout=wait_for_mlflow):
                logger.warning(f"upload later with: python tools/upload_pending.py {output_dir}")
    return output_dir


def finish_training(cfg, trainer, data, tracker, checkpointer, device) -> None:
    """model_final.pth, the final evaluation's figure and per-class accuracy, the test split, the model."""
    model = trainer.unwrapped_model
    final_path = checkpointer.save_model("model_final.pth", model)
    logger.info(f"saved {final_path}")
    final = trainer.latest_eval or {}
    if tracker is not None and "val_confusion" in final:
        log_evaluation(tracker, "val", final, cfg.DATA.CLASSES, trainer.iter)
    if data.test is not None:
        results = evaluate(model, data.test, len(cfg.DATA.CLASSES), device, cfg.TRAIN.AMP)
        logger.info(f"test_loss {results['loss']:.4f}  test_acc1 {results['acc1']:.4f}")
        if tracker is not None:
            tracker.log_metrics([("test_loss", results["loss"], trainer.iter), ("test_acc1", results["acc1"],
                                                                               trainer.iter)])
            log_evaluation(tracker, "test", {f"test_{k}": v for k, v in results.items()}, cfg.DATA.CLASSES,
                           trainer.iter, figure_name="confusion_matrix_test.png")
    if tracker is not None and cfg.MLFLOW.LOG_MODEL:
        example = next(iter(data.val.epoch(0))).images[:2].float().cpu()
        if tracker.log_model(model, example):
            logger.info("logged the model to MLflow (mlflow.pytorch, pt2 format)")


def log_evaluation(tracker, split: str, results: dict, class_names, step: int,
                   figure_name: str = "confusion_matrix.png") -> None:
    confusion = results[f"{split}_confusion"]
    accuracies = per_class_accuracy(confusion)
    tracker.log_metrics([(f"{split}_acc1_{_metric_safe(name)}", acc, step)
                         for name, acc in zip(class_names, accuracies, strict=True)])
    tracker.log_figure(confusion_matrix_figure(confusion, class_names), figure_name)


def evaluate_only(cfg) -> dict:
    """``--eval-only``: evaluate MODEL.WEIGHTS on EVAL.SPLIT and log loss, accuracy and figures to MLflow."""
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("--eval-only needs the weights to evaluate: add MODEL.WEIGHTS <path to .pth>")
    init_distributed(cfg.TRAIN.DISTRIBUTED_BACKEND, cfg.TRAIN.GPUS)
    try:
        output_dir = prepare_output_dir(cfg)
        setup_logging(output_dir, is_main_process())
        if is_main_process():
            atomic_write_bytes(output_dir / "config.yaml", cfg.dump().encode())
        device, num_gpus = select_device(cfg.TRAIN.GPUS, cfg.TRAIN.DISTRIBUTED_BACKEND)
        data = build_data(cfg, device)
        batches = data.test if cfg.EVAL.SPLIT == "test" else data.val
        if batches is None:
            raise ConfigError(f"the {cfg.DATA.DATASET_TYPE} dataset has no test split; use EVAL.SPLIT val")
        model = build_network(cfg, device, num_gpus)
        results = evaluate(module_to_evaluate(model), batches, len(cfg.DATA.CLASSES), device, cfg.TRAIN.AMP)
        split = cfg.EVAL.SPLIT
        logger.info(f"{split}_loss {results['loss']:.4f}  {split}_acc1 {results['acc1']:.4f}  "
                    f"({results['count']} images)")
        if is_main_process():
            tracker = start_tracker(cfg, output_dir, None, {"mode": "eval-only"}, device, num_gpus)
            tracker.log_metrics([(f"{split}_loss", results["loss"], 0), (f"{split}_acc1", results["acc1"], 0)])
            log_evaluation(tracker, split, {f"{split}_{k}": v for k, v in results.items()}, cfg.DATA.CLASSES, 0)
            sys.stdout.flush()
            tracker.log_artifact(output_dir / "log.txt")
            tracker.end("FINISHED")
        return results
    finally:
        destroy_process_group()


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


def _metric_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in str(name))


# ---- set-up helpers ----------------------------------------------------------------------------------------
def prepare_output_dir(cfg) -> Path:
    """Create OUTPUT_DIR (default: output/<timestamp>, the same on every rank) and check it is writable."""
    default = str(REPO_ROOT / "output" / time.strftime("%Y%m%d-%H%M%S"))
    output_dir = Path(broadcast_object(cfg.OUTPUT_DIR or default)).resolve()
    if not is_main_process():
        return output_dir
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output_dir / ".write_test", b"")
        (output_dir / ".write_test").unlink()
    except OSError as error:
        raise ConfigError(f"cannot write to OUTPUT_DIR {output_dir}: {error.strerror}; "
                          "choose a writable folder with OUTPUT_DIR <path>") from None
    return output_dir


def configure_reproducibility(seed: int, deterministic: bool) -> None:
    random.seed(seed)
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
    tags = {**collect_run_record(cfg, device, num_gpus), **extra_tags}
    params = {key: redact_credentials(value) for key, value in flatten_config(cfg).items()}
    run_id = tracker.start(params, tags=tags, run_id=previous_run)
    logger.info(f"MLflow run {run_id or '(pending)'} in experiment '{cfg.MLFLOW.EXPERIMENT_NAME}' "
                f"at {tracker.tracking_uri}")
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
        logger.warning(f"{name} received: stopping after this step and saving a checkpoint "
                       "(press Ctrl+C again to stop at once)")
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
