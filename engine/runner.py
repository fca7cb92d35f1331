"""The public way to run: ``Runner`` owns the whole life of one run, in an order its code enforces.

    from engine import Runner
    from ptengine import config_builder, load_config      # the project's builders, from any folder

    cfg = load_config("config/digits.yaml", ["TRAIN.MAX_EPOCHS", "3"])
    result = Runner(cfg, config_builder, model=MyNet(), hooks=[MyHook()]).train()
    result.output_dir, result.run_id, result.final_metrics["val_acc1"], result.model

Everything you do not hand over (model, training and validation data, optimizer, loss) comes from the config
through the ``builder`` (``tools/build.py`` is the project's). The life, step by step:

1. the process group (torchrun), the names the config picks (checked before anything is written), the device;
2. the run folder, locked against a second process, and its log (log.txt);
3. with ``resume``: the newest checkpoint that loads and fits the config (before config.yaml is rewritten);
4. the objects: data, model (+ EMA), trainer and hooks, the run's record, the final steps;
5. training under signal handling (Ctrl+C, SIGTERM, SIGUSR1 finish the step and checkpoint), the final
   evaluation and model, and an MLflow run that always ends FINISHED, FAILED or KILLED (none with
   ``MLFLOW.ENABLED False``: the run's folder and log.txt only).

A run interrupted by a signal returns a ``RunResult`` with status ``KILLED`` (its checkpoint is written);
``train(resume=True)`` with the same OUTPUT_DIR continues it bit for bit. A second Ctrl+C raises
KeyboardInterrupt at once. Whatever happens, the process is left as it was found: streams, the ``engine``
logger, signal handlers, environment variables and torch's determinism switches.
"""

import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.checkpoint import Checkpointer
from engine.distributed import is_main_process, process_group, select_device
from engine.hooks import TrainingInterrupted
from engine.logger import restore_streams
from engine.precision import AMP_DTYPES, autocast_runs_on
from engine.run import (
    AGREED_STOPS,
    RunFolder,
    TrainingRun,
    configure_reproducibility,
    find_resume_point,
    newest_run_folder,
    record_evaluation,
    set_deterministic,
)
from engine.run_lock import FolderLock
from ptengine.config import ConfigError
from ptengine.config.resume import check_resume_config
from ptengine.config.setup import with_output_dir

logger = logging.getLogger("engine")


@dataclass
class RunResult:
    """What a run leaves: where its files are, its MLflow run, its metrics, and the trained model."""

    output_dir: Path
    status: str  # FINISHED, or KILLED after a stop signal (continue with resume=True)
    run_id: str | None = None  # the MLflow run (None on other ranks than the first)
    final_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation (val_*, test_*)
    best_metrics: dict[str, float] = field(default_factory=dict)  # the evaluation model_best.pth was saved at
    model: torch.nn.Module | None = None  # the weights of model_final.pth (the EMA's with TRAIN.EMA_DECAY)


class Runner:
    """One run of ``cfg`` (a frozen config) with the objects you give, the rest built by ``builder``.

    ``model``: an ``nn.Module``; ``train_data``/``val_data``: a ``Dataset``, a ``DataLoader`` or a
    ``TensorSplit`` (see datasets/user_data.py); ``optimizer``: a torch optimizer or ``model -> optimizer``;
    ``loss(logits, targets)``: summed over the batch (evaluation keeps cross-entropy); ``hooks``: HookBase
    instances, run after the metric writer and before the checkpointers; ``tags``: extra MLflow tags.
    ``tee_streams`` copies everything printed to log.txt by replacing sys.stdout/sys.stderr for the run (the
    command line's choice; from Python log.txt holds the engine's lines). ``resume_hint(output_dir)``: what is
    printed after "continue it with" when a signal stopped the run (the command line's own command; by default,
    how to call this API again).
    """

    def __init__(self, cfg, builder, *, model=None, train_data=None, val_data=None, optimizer=None, loss=None,
                 hooks=(), tags: dict | None = None, tee_streams: bool = False,
                 resume_hint: Callable[[Path], str] | None = None):
        self.builder = builder
        self.model, self.train_data, self.val_data = model, train_data, val_data
        self.optimizer, self.loss, self.hooks = optimizer, loss, list(hooks)
        self.cfg = self._config_naming_objects(cfg)
        self.tags = dict(tags or {})  # extra MLflow tags (a rerun's rerun_of)
        self.tee_streams, self.resume_hint = tee_streams, resume_hint or _api_resume_hint
        self.output_dir: Path | None = None  # known once the run folder exists
        self._run_id: str | None = None

    def train(self, resume: bool = False) -> RunResult:
        """Train (``resume``: continue from OUTPUT_DIR's newest checkpoint); see the module docstring."""
        cfg = self.cfg
        if resume and not cfg.OUTPUT_DIR:
            found = newest_run_folder(Path.cwd()) or "<folder of the run>"
            raise ConfigError(f"--resume needs the OUTPUT_DIR of the run to continue (an empty OUTPUT_DIR makes a "
                              f"new folder); add OUTPUT_DIR {found}")
        # torchrun --max-restarts restarts failed workers with the same command line: they continue the run.
        resume = resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        with process_state_kept():
            try:
                return self._train(resume)
            except TrainingInterrupted:
                return RunResult(self.output_dir, "KILLED", run_id=self._run_id)

    def evaluate(self) -> dict:
        """``--eval-only``: evaluate MODEL.WEIGHTS (or ``model``) on EVAL.SPLIT; an MLflow run of its own."""
        cfg = self.cfg
        if not cfg.MODEL.WEIGHTS and self.model is None:
            raise ConfigError("--eval-only needs the weights to evaluate: add MODEL.WEIGHTS <path to .pth>")
        with process_state_kept(), process_group(cfg.TRAIN.DISTRIBUTED_BACKEND, cfg.TRAIN.GPUS):
            self.builder.check_names(cfg, given=self._given())  # IMPORTS too: a model of yours by its name
            device, num_gpus = select_device(cfg.TRAIN.GPUS, cfg.TRAIN.DISTRIBUTED_BACKEND)
            folder = self._open_folder()
            cfg = with_output_dir(cfg, folder.path)
            with folder_in_use(folder, self.tee_streams):
                data = None
                try:
                    folder.write_config(cfg.dump())
                    data = self.builder.build_data(cfg, device, **self._data_objects())
                    results = self.builder.evaluate_weights(cfg, data, device, num_gpus, self.model)
                except BaseException:
                    folder.discard_if_unused(started=False)
                    raise
                finally:
                    if data is not None:
                        data.close()
                self._record_evaluation(cfg, folder, device, num_gpus, data, results)
            return results

    # -- the life of a training run, in order -------------------------------------------------------------

    def _train(self, resume: bool) -> RunResult:
        cfg, builder = self.cfg, self.builder
        self._run_id = None
        with process_group(cfg.TRAIN.DISTRIBUTED_BACKEND, cfg.TRAIN.GPUS, leave_together=AGREED_STOPS):
            builder.check_names(cfg, given=self._given())  # mistakes reported before anything is written
            device, num_gpus = select_device(cfg.TRAIN.GPUS, cfg.TRAIN.DISTRIBUTED_BACKEND)
            folder = self._open_folder()
            cfg = with_output_dir(cfg, folder.path)  # config.yaml, the params and the tags say where the files are
            checkpointer = Checkpointer(folder.path, keep=cfg.CHECKPOINT.KEEP, enabled=is_main_process())
            if not resume and checkpointer.checkpoints():
                raise ConfigError(f"OUTPUT_DIR {folder.path} already holds checkpoints of an earlier run; "
                                  "continue it with --resume, or choose another OUTPUT_DIR (nothing was changed)")
            with folder_in_use(folder, self.tee_streams):
                try:
                    return self._build_and_run(cfg, folder, checkpointer, resume, device, num_gpus)
                except TrainingInterrupted as stop:
                    if is_main_process():  # (in log.txt too with tee_streams)
                        print(f"training interrupted: {stop}; continue it with{self.resume_hint(folder.path)}",
                              file=sys.stderr)
                    raise

    def _build_and_run(self, cfg, folder, checkpointer, resume, device, num_gpus) -> RunResult:
        # First, so that its delivery process imports MLflow while the run is being built (the store is untouched
        # until the run starts: a run refused before that leaves no trace in it).
        kind = "rerun" if "rerun_of" in self.tags else ""  # the start of the run's name
        tracker = run = data = None
        try:
            tracker = self.builder.make_tracker(cfg, folder, kind) if tracks(cfg) else None
            resumed = find_resume_point(checkpointer, lambda saved, path: check_resume_config(cfg, saved, path)) \
                if resume else None
            folder.write_config(cfg.dump())  # after the resume check: a refused resume leaves the old config.yaml
            configure_reproducibility(cfg.SEED, cfg.TRAIN.DETERMINISTIC, device)
            if cfg.TRAIN.AMP and not autocast_runs_on(device, AMP_DTYPES[cfg.TRAIN.AMP_DTYPE]):
                logger.info("TRAIN.AMP is on but the run is on the CPU: training in float32 (bfloat16 runs on the CPU)")
            data = self.builder.build_data(cfg, device, **self._data_objects())
            run = self._build(cfg, data, checkpointer, tracker, device, num_gpus)
            previous_run = folder.previous_run_id(resumed) if resume else None  # a fresh run never re-attaches
            try:
                run.run(resumed, previous_run)
            finally:
                self._run_id = tracker.run_id if tracker is not None else None
            return self._result(folder, run)
        except TrainingInterrupted:
            raise
        except BaseException:
            folder.discard_if_unused(started=run is not None and run.trainer.iter > 0)
            if tracker is not None:  # ended already if the run started; else its process ends here
                tracker.close()
            raise
        finally:
            if data is not None:
                data.close()  # its DataLoader workers end with the run, even where an error's traceback holds them

    def _build(self, cfg, data, checkpointer, tracker, device, num_gpus) -> TrainingRun:
        builder = self.builder
        model = builder.build_model_for_training(cfg, device, num_gpus, model=self.model)
        weights = builder.build_weights(cfg, model)  # evaluated, saved and logged: the EMA's or the model's
        trainer = builder.build_trainer(cfg, model, data, device, tracker, checkpointer, self.hooks, self.loss,
                                        weights, optimizer=self.optimizer)
        record = builder.build_run_record(cfg, device, num_gpus, data, tracker, self.tags)
        final = builder.build_final_steps(cfg, data, weights.module, device,
                                          dataset_inputs=next(iter(record.background), None))
        return TrainingRun(trainer, checkpointer, tracker, record, final)

    def _result(self, folder: RunFolder, run: TrainingRun) -> RunResult:
        trainer = run.trainer
        final = {k: v for k, v in (trainer.latest_eval or {}).items() if isinstance(v, (int, float))}
        final.pop("iteration", None)
        final.update(run.test_metrics)
        best = next((hook.best_metrics for hook in trainer.hooks if hasattr(hook, "best_metrics")), {})
        model = run.final.model if run.final.model is not None else trainer.unwrapped_model
        return RunResult(folder.path, "FINISHED", run_id=self._run_id, final_metrics=final,
                         best_metrics=dict(best), model=model)

    # -- pieces ---------------------------------------------------------------------------------------------

    def _config_naming_objects(self, cfg):
        """``cfg`` saying what was given instead of its names, so that config.yaml, the MLflow params and the run's
        description tell the truth: the model's and the dataset's class names, the dataset's class names
        (torchvision's ``classes``), the optimizer's class."""
        changes = {}
        if self.model is not None:
            changes["TRAIN.MODEL_TYPE"] = type(self.model).__name__
        data = self.train_data
        if data is not None:
            changes["DATA.DATASET_TYPE"] = type(getattr(data, "dataset", data)).__name__
            names = getattr(getattr(data, "dataset", data), "classes", None)
            if names:
                changes["DATA.CLASSES"] = [str(name) for name in names]
        if isinstance(self.optimizer, torch.optim.Optimizer):
            changes["TRAIN.OPTIMIZER_TYPE"] = type(self.optimizer).__name__
        if not changes:
            return cfg
        cfg = cfg.clone()
        cfg.defrost()
        for key, value in changes.items():
            section, name = key.split(".")
            cfg[section][name] = value
        cfg.freeze()
        return cfg

    def _given(self) -> set[str]:
        """The config keys whose registry names are not looked up: the objects were given."""
        keys = {"TRAIN.MODEL_TYPE": self.model, "DATA.DATASET_TYPE": self.train_data,
                "TRAIN.OPTIMIZER_TYPE": self.optimizer}
        return {key for key, value in keys.items() if value is not None}

    def _open_folder(self) -> RunFolder:
        folder = RunFolder(self.cfg.OUTPUT_DIR or Path.cwd() / "output" / time.strftime("%Y%m%d-%H%M%S"))
        self.output_dir = folder.path
        return folder

    def _data_objects(self) -> dict:
        return {"train_data": self.train_data, "val_data": self.val_data} \
            if self.train_data is not None or self.val_data is not None else {}

    def _record_evaluation(self, cfg, folder, device, num_gpus, data, results) -> None:
        split = cfg.EVAL.SPLIT
        logger.info(f"{split}_loss {results['loss']:.4f}  {split}_acc1 {results['acc1']:.4f}  "
                    f"({results['count']} images)")
        if tracks(cfg):
            description = (f"evaluation of {cfg.MODEL.WEIGHTS} on the {split} split of {cfg.DATA.DATASET_TYPE} "
                           f"({results['count']} images)")
            record = self.builder.build_run_record(cfg, device, num_gpus, data, None, {"mode": "eval-only"},
                                                   description)
            record_evaluation(self.builder.make_tracker(cfg, folder, "eval"), record, split, results, cfg.DATA.CLASSES)


def tracks(cfg) -> bool:
    """Whether this process records the run in MLflow: the first process, unless MLFLOW.ENABLED is False."""
    return is_main_process() and cfg.MLFLOW.ENABLED


def _api_resume_hint(output_dir: Path | None) -> str:
    return f":\n  the same Runner with OUTPUT_DIR {output_dir} in its config, and .train(resume=True)"


@contextmanager
def folder_in_use(folder: RunFolder, tee_streams: bool):
    """The run folder locked against a second process (main process), and its log.txt, for the block."""
    with ExitStack() as stack:
        if is_main_process():
            stack.enter_context(FolderLock(folder.path))
        stack.callback(restore_streams)
        folder.start_log(tee_streams)
        yield


@contextmanager
def process_state_kept():
    """Put back what a run changes in its process: environment, signal handlers (engine.run's own context),
    the ``engine`` logger, torch's determinism switches. A notebook's next cell finds its process as it was."""
    environment = dict(os.environ)
    engine_logger = logging.getLogger("engine")
    logger_state = (list(engine_logger.handlers), engine_logger.level, engine_logger.propagate)
    switches = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        yield
    finally:
        restore_streams()
        engine_logger.handlers[:] = logger_state[0]
        engine_logger.setLevel(logger_state[1])
        engine_logger.propagate = logger_state[2]
        if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
                != switches[:2]:
            set_deterministic(switches[0], warn_only=switches[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = switches[2], switches[3]
        for name in set(os.environ) - set(environment):
            del os.environ[name]
        os.environ.update(environment)
