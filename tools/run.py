"""One run from a config: build the objects (tools/build.py), then hand them to the engine's run life
(engine/run.py), which resumes, trains, finishes and always leaves the MLflow run in a final state.

    from ptengine.tools.run import train
    train(load_config("config/digits.yaml"), hooks=[MyHook()], loss=my_loss)
"""

import logging
import os
import time
from pathlib import Path

from engine.checkpoint import Checkpointer
from engine.distributed import is_main_process, process_group, select_device
from engine.hooks import TrainingInterrupted
from engine.precision import AMP_DTYPES, autocast_runs_on
from engine.run import (
    AGREED_STOPS,
    RunFolder,
    TrainingRun,
    configure_reproducibility,
    find_resume_point,
    newest_run_folder,
    record_evaluation,
)
from ptengine.config import ConfigError
from ptengine.config.defaults import REPO_ROOT
from ptengine.config.resume import check_resume_config
from ptengine.config.setup import with_output_dir
from ptengine.tools import build

logger = logging.getLogger("engine")


def train(cfg, resume: bool = False, extra_tags: dict | None = None, hooks=(), loss=None) -> Path:
    """Train from ``cfg``; return OUTPUT_DIR. ``resume`` continues from OUTPUT_DIR's newest checkpoint.

    ``hooks``: your HookBase instances (run after the metric writer, before the checkpointers; their
    ``state_dict`` joins every checkpoint). ``loss(logits, targets)``: the training loss summed over the batch
    (default: cross-entropy); evaluation always reports plain cross-entropy.
    """
    if resume and not cfg.OUTPUT_DIR:
        raise ConfigError(f"--resume needs the OUTPUT_DIR of the run to continue (an empty OUTPUT_DIR makes a new "
                          f"folder); add OUTPUT_DIR {newest_run_folder(REPO_ROOT) or '<folder of the run>'}")
    # torchrun --max-restarts restarts failed workers with the same command line: they continue the run.
    resume = resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    with process_group(cfg.TRAIN.DISTRIBUTED_BACKEND, cfg.TRAIN.GPUS, leave_together=AGREED_STOPS):
        build.check_names(cfg)  # mistakes that need no data are reported before anything is written
        device, num_gpus = select_device(cfg.TRAIN.GPUS, cfg.TRAIN.DISTRIBUTED_BACKEND)
        folder = _run_folder(cfg)
        cfg = with_output_dir(cfg, folder.path)  # config.yaml, the params and the tags say where the files are
        checkpointer = Checkpointer(folder.path, keep=cfg.CHECKPOINT.KEEP, enabled=is_main_process())
        if not resume and checkpointer.checkpoints():
            raise ConfigError(f"OUTPUT_DIR {folder.path} already holds checkpoints of an earlier run; continue it "
                              "with --resume, or choose another OUTPUT_DIR (nothing was changed)")
        built: dict = {}
        try:
            _build_and_run(cfg, folder, checkpointer, resume, extra_tags or {}, hooks, loss, device, num_gpus, built)
        except (TrainingInterrupted, KeyboardInterrupt) as stop:
            stop.output_dir = folder.path  # for the resume command train_net.py prints
            raise
        except BaseException:
            folder.discard_if_unused(started="trainer" in built and built["trainer"].iter > 0)
            if built.get("tracker") is not None:  # ended already if the run started; else its process ends here
                built["tracker"].close()
            raise
    return folder.path


def _build_and_run(cfg, folder, checkpointer, resume, extra_tags, hooks, loss, device, num_gpus, built) -> None:
    folder.start_log()
    # First, so that its delivery process imports MLflow while the run is being built (the store is untouched
    # until the run starts: a run refused before that leaves no trace in it).
    built["tracker"] = tracker = build.make_tracker(cfg, folder) if is_main_process() else None
    resumed = find_resume_point(checkpointer, lambda saved, path: check_resume_config(cfg, saved, path)) \
        if resume else None
    folder.write_config(cfg.dump())  # after the resume check: a refused resume leaves the old config.yaml
    configure_reproducibility(cfg.SEED, cfg.TRAIN.DETERMINISTIC, device)
    if cfg.TRAIN.AMP and not autocast_runs_on(device, AMP_DTYPES[cfg.TRAIN.AMP_DTYPE]):
        logger.info("TRAIN.AMP is on but the run is on the CPU: training in float32 (bfloat16 runs on the CPU)")
    data = build.build_data(cfg, device)
    model = build.build_model_for_training(cfg, device, num_gpus)
    ema = build.build_ema(cfg, model)  # TRAIN.EMA_DECAY: evaluated, and saved as model_best / model_final (None = off)
    built["trainer"] = trainer = build.build_trainer(cfg, model, data, device, tracker, checkpointer, hooks, loss, ema)
    record = build.build_run_record(cfg, device, num_gpus, data, tracker, extra_tags)
    final = build.build_final_steps(cfg, data, ema.module if ema is not None else trainer.unwrapped_model, device)
    previous_run = folder.previous_run_id(resumed) if resume else None  # a fresh run never re-attaches one
    TrainingRun(trainer, checkpointer, tracker, record, final).run(resumed, previous_run)


def evaluate_only(cfg) -> dict:
    """``--eval-only``: evaluate MODEL.WEIGHTS on EVAL.SPLIT and log loss, accuracy and figures to MLflow."""
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("--eval-only needs the weights to evaluate: add MODEL.WEIGHTS <path to .pth>")
    with process_group(cfg.TRAIN.DISTRIBUTED_BACKEND, cfg.TRAIN.GPUS):
        device, num_gpus = select_device(cfg.TRAIN.GPUS, cfg.TRAIN.DISTRIBUTED_BACKEND)
        folder = _run_folder(cfg)
        cfg = with_output_dir(cfg, folder.path)
        try:
            folder.start_log()
            folder.write_config(cfg.dump())
            data, results = build.evaluate_weights(cfg, device, num_gpus)
        except BaseException:
            folder.discard_if_unused(started=False)
            raise
        split = cfg.EVAL.SPLIT
        logger.info(f"{split}_loss {results['loss']:.4f}  {split}_acc1 {results['acc1']:.4f}  "
                    f"({results['count']} images)")
        if is_main_process():
            description = (f"evaluation of {cfg.MODEL.WEIGHTS} on the {split} split of {cfg.DATA.DATASET_TYPE} "
                           f"({results['count']} images)")
            record = build.build_run_record(cfg, device, num_gpus, data, None, {"mode": "eval-only"}, description)
            record_evaluation(build.make_tracker(cfg, folder), record, split, results, cfg.DATA.CLASSES)
        return results


def _run_folder(cfg) -> RunFolder:
    return RunFolder(cfg.OUTPUT_DIR or REPO_ROOT / "output" / time.strftime("%Y%m%d-%H%M%S"))


