#!/usr/bin/env python
"""Train (or evaluate) a model from a config file:

    python tools/train_net.py --config-file config/digits.yaml [KEY VALUE ...]
    torchrun --nproc_per_node 2 tools/train_net.py --config-file ... TRAIN.DISTRIBUTED_BACKEND ddp

This file only builds: config -> data -> model -> solver -> hooks -> Trainer. The loop lives in engine/.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

import torch  # noqa: E402

from config import ConfigError, flatten_config, setup_config  # noqa: E402
from config.defaults import REPO_ROOT  # noqa: E402
from datasets import DatasetError, build_datasets  # noqa: E402
from datasets.batches import build_batches  # noqa: E402
from datasets.transforms import build_transform  # noqa: E402
from engine import hooks as engine_hooks  # noqa: E402
from engine.checkpoint import Checkpointer, CheckpointError, load_file  # noqa: E402
from engine.distributed import select_device, wrap_model  # noqa: E402
from engine.evaluation import evaluate  # noqa: E402
from engine.logger import setup_logging  # noqa: E402
from engine.tracking import MLflowTracker, resolve_tracking_uri  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from networks import build_model  # noqa: E402
from solvers import build_lr_scheduler, build_optimizer  # noqa: E402

logger = logging.getLogger("engine")

# Mistakes a user can make: printed as one line, exit code 2, no traceback (unless --debug).
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, FloatingPointError)
RUN_ID_FILE = "mlflow_run_id"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="YAML file of config overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT_DIR")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs, e.g. TRAIN.LR 0.05")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = setup_config(args)
        train(cfg, resume=args.resume)
        return 0
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def train(cfg, resume: bool = False) -> Path:
    """Build everything from ``cfg``, train, and return the output folder."""
    output_dir = prepare_output_dir(cfg)
    setup_logging(output_dir)
    configure_reproducibility(cfg.SEED, cfg.TRAIN.DETERMINISTIC)
    device, num_gpus = select_device(cfg.TRAIN.GPUS, cfg.TRAIN.DISTRIBUTED_BACKEND)
    logger.info(f"output folder {output_dir}; device {device}" + (f" x{num_gpus}" if num_gpus > 1 else ""))

    splits = build_datasets(cfg)
    train_batches = make_batches(cfg, splits.train, splits, device, train=True)
    val_batches = make_batches(cfg, splits.val, splits, device, train=False)
    model = build_model(cfg).to(device)
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS)
    if cfg.TRAIN.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    model = wrap_model(model, device, num_gpus, cfg.TRAIN.DISTRIBUTED_BACKEND)
    optimizer = build_optimizer(cfg, model)
    iters_per_epoch = -(-len(train_batches) // cfg.TRAIN.ACCUM_STEPS)
    scheduler = build_lr_scheduler(cfg, optimizer, iters_per_epoch)
    if cfg.TRAIN.AMP and device.type != "cuda":
        logger.info("TRAIN.AMP is on but the run is on the CPU: training in float32")

    checkpointer = Checkpointer(output_dir, keep=cfg.CHECKPOINT.KEEP)
    resumed = checkpointer.load_newest_valid() if resume else None
    if resume and resumed is None:
        logger.info(f"--resume: no checkpoint in {output_dir}, starting from scratch")

    tracker = MLflowTracker(resolve_tracking_uri(cfg.MLFLOW.TRACKING_URI), cfg.MLFLOW.EXPERIMENT_NAME,
                            cfg.MLFLOW.RUN_NAME, pending_dir=output_dir)
    previous_run = read_run_id(output_dir) if resume else None
    run_id = tracker.start(flatten_config(cfg), tags=run_tags(), run_id=previous_run)
    (output_dir / RUN_ID_FILE).write_text(run_id)  # known before the first checkpoint, for --resume
    logger.info(f"MLflow run {run_id} in experiment '{cfg.MLFLOW.EXPERIMENT_NAME}' at {tracker.tracking_uri}")
    tracker.log_artifact(output_dir / "config.yaml")

    num_classes = len(cfg.DATA.CLASSES)
    writer = engine_hooks.MetricWriter(tracker, cfg.LOG.PERIOD)
    trainer = Trainer(model, optimizer, train_batches, cfg.TRAIN.MAX_EPOCHS, device,
                      amp=cfg.TRAIN.AMP, accum_steps=cfg.TRAIN.ACCUM_STEPS, clip_grad_norm=cfg.TRAIN.CLIP_GRAD_NORM)
    trainer.register_hooks([
        engine_hooks.LRScheduler(scheduler),
        engine_hooks.IterationTimer(len(splits.train)),
        engine_hooks.EvalHook(lambda: evaluate(model, val_batches, num_classes, device, cfg.TRAIN.AMP),
                              cfg.EVAL.PERIOD),
        writer,
        engine_hooks.PeriodicCheckpointer(checkpointer, cfg.CHECKPOINT.PERIOD, writer),
        engine_hooks.ProgressBar(enabled=cfg.LOG.PROGRESS_BAR),
        LogUploader(tracker, output_dir / "log.txt"),
    ])
    if resumed is not None:
        path, state = resumed
        trainer.load_state_dict(state)
        logger.info(f"resumed from {path.name} at iteration {trainer.iter}")

    status = "FAILED"
    try:
        trainer.train()
        checkpointer.save_model("model_final.pth", trainer.unwrapped_model)
        logger.info(f"saved {output_dir / 'model_final.pth'}")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except FloatingPointError as error:
        logger.error(str(error))
        raise
    finally:
        sys.stdout.flush()
        tracker.log_artifact(output_dir / "log.txt")
        tracker.end(status)
    return output_dir


class LogUploader(engine_hooks.HookBase):
    """Uploads log.txt at every epoch end, so a crashed run still has its log in MLflow."""

    def __init__(self, tracker, log_path: Path):
        self.tracker, self.log_path = tracker, log_path

    def after_epoch(self):
        sys.stdout.flush()
        self.tracker.log_artifact(self.log_path)


def prepare_output_dir(cfg) -> Path:
    """Create OUTPUT_DIR (default: output/<timestamp>) and write the resolved config.yaml into it."""
    output_dir = Path(cfg.OUTPUT_DIR or REPO_ROOT / "output" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(cfg.dump())
    except OSError as error:
        raise ConfigError(f"cannot write to OUTPUT_DIR {output_dir}: {error.strerror}; "
                          "choose a writable folder with OUTPUT_DIR <path>") from None
    return output_dir


def configure_reproducibility(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # identical model initialisation in every process
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_batches(cfg, split, splits, device, train: bool):
    transform = build_transform(cfg.DATA.TRANSFORM_LIST, splits.mean, splits.std, cfg.SEED, train=train)
    return build_batches(split, cfg.TRAIN.BATCH_SIZE, transform, device, shuffle=train, seed=cfg.SEED,
                         num_workers=cfg.DATA.NUM_WORKERS, channels_last=cfg.TRAIN.CHANNELS_LAST)


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a model_final.pth (plain state_dict) or a checkpoint (its ``model`` entry) into ``model``."""
    state = load_file(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[1:2] or [str(error)]
        raise CheckpointError(f"MODEL.WEIGHTS {path} does not fit TRAIN.MODEL_TYPE: {first[0].strip()}") from None


def read_run_id(output_dir: Path) -> str | None:
    path = output_dir / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def run_tags() -> dict:
    return {"mlflow.source.name": "tools/train_net.py", "command": " ".join(sys.argv)}


if __name__ == "__main__":
    sys.exit(main())
