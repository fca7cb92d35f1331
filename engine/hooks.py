"""Hooks: small objects that do one job each at fixed points of the training loop.

The trainer calls the registered hooks, in registration order, like this (the one place this order is
written down; ``engine/trainer.py`` follows it)::

    hook.before_train()
    for epoch in epochs:                   # from the epoch a resume starts in
        hook.before_epoch()
        for iteration in epoch:
            hook.before_step(); trainer.run_step(); hook.after_step()
            trainer checks for a stop request (Ctrl+C, SIGTERM) -> TrainingInterrupted
        hook.after_epoch()
    hook.after_train()                     # always, also when training raised (trainer.exception)

    hook.write_metrics(records)            # whenever someone calls trainer.flush_metrics(): the metric writer
                                           # every LOG.PERIOD steps and at epoch ends, the checkpointer before
                                           # each save; it raises first if a loss was NaN or inf

Subclass ``HookBase`` and override the methods you need (only those are called). ``self.trainer`` is the
running trainer: ``iter`` counts finished iterations, ``epoch`` is the current epoch (0-based), ``storage``
collects metrics (``storage.put(name, value, step)``), ``latest_eval`` is the newest evaluation,
``exception`` is what ended training, if anything, and ``step_outputs`` the last step's loss and sizes. A hook
that keeps state across a resume implements ``state_dict``/``load_state_dict`` and names it with ``state_key``:
it is saved under that name in every checkpoint.

The built-in hooks, in the order ``tools/build.py`` registers them: EMAHook (with TRAIN.EMA_DECAY), LRScheduler,
EpochTimer, EvalHook, PerClassAccuracyReport (with MLflow), MetricWriter, your hooks, BestCheckpointer,
PeriodicCheckpointer, ProgressBar.
"""

import logging
import math
import os
import sys
import time
import weakref

from engine.logger import attach_progress_bar
from engine.pace import RunPace, step_rate, time_left

logger = logging.getLogger("engine")

HOOK_METHODS = ("before_train", "before_epoch", "before_step", "after_step", "after_epoch", "after_train",
                "write_metrics")


class TrainingInterrupted(Exception):
    """Raised by the loop after a stop was requested (SIGINT/SIGTERM/SIGUSR1); hooks save a checkpoint on it."""


class HookBase:
    trainer = None  # set by Trainer.register_hooks (a weak proxy: hooks do not keep the trainer alive)
    # The name this hook's state is saved under in checkpoints, and found under on resume. A hook that keeps
    # state (defines state_dict) must set one; keep it stable across versions of your code.
    state_key: str | None = None

    def before_train(self): ...

    def before_epoch(self): ...

    def before_step(self): ...

    def after_step(self): ...

    def after_epoch(self): ...

    def after_train(self): ...

    def write_metrics(self, records: list[tuple[str, float, int]]):
        """``(name, value, step)`` records just read from ``trainer.storage``."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def _attach(self, trainer) -> None:
        self.trainer = weakref.proxy(trainer)


def is_period_end(count: int, period: int, last: int) -> bool:
    """True every ``period`` counts and at the last one (``period`` 0 = only the last)."""
    return count == last or (period > 0 and count % period == 0)


class LRScheduler(HookBase):
    """Records the LR used by the step that just ran, then advances the per-iteration schedule."""

    state_key = "LRScheduler"  # the class name of earlier versions: their checkpoints still resume

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def after_step(self):
        self.trainer.storage.put("lr", self.scheduler.get_last_lr()[0], self.trainer.iter)
        self.scheduler.step()

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


class EpochTimer(HookBase):
    """Epoch wall time and training throughput (measured per epoch: no per-step device sync), and the run's pace
    (``engine.pace.RunPace``: the one ETA that the console lines and the bar show), which it feeds."""

    def __init__(self, samples_per_epoch: int, pace: RunPace | None = None):
        self.samples_per_epoch = samples_per_epoch
        self.pace = pace if pace is not None else RunPace()
        self._start = 0.0
        self._first_iter = 0

    def before_epoch(self):
        self._start, self._first_iter = time.perf_counter(), self.trainer.iter

    def after_step(self):
        self.pace.step_finished(self.trainer.iter)

    def after_epoch(self):
        self.pace.epoch_finished()  # first of the epoch-end hooks: the evaluation and checkpoint come after it
        if self.trainer.iter == self._first_iter:
            return  # resumed exactly at this epoch's end: nothing was timed
        seconds = time.perf_counter() - self._start
        done = (self.trainer.iter - self._first_iter) / self.trainer.iters_per_epoch
        self.trainer.storage.put("epoch_time", seconds, self.trainer.iter)
        throughput = self.samples_per_epoch * done / max(seconds, 1e-9)
        self.trainer.storage.put("images_per_sec", throughput, self.trainer.iter)


class EvalHook(HookBase):
    """Runs ``eval_function() -> {"loss": .., "acc1": .., ...}`` every ``period`` epochs and after the last.

    Scalars are stored as ``<prefix>_<name>`` (``val_loss``, ``val_acc1``) at the current iteration; the
    full result (confusion matrix included) stays in ``trainer.latest_eval`` for other hooks (the per-class
    report, engine/eval_report.py, reads it there).
    """

    NOT_METRICS = ("count",)  # a constant of the split, not a curve worth a chart

    def __init__(self, eval_function, period: int, prefix: str = "val"):
        self.eval_function, self.period, self.prefix = eval_function, period, prefix

    def after_epoch(self):
        if not is_period_end(self.trainer.epoch + 1, self.period, self.trainer.max_epochs):
            return
        results = self.eval_function()
        for name, value in results.items():
            if isinstance(value, (int, float)) and name not in self.NOT_METRICS:
                self.trainer.storage.put(f"{self.prefix}_{name}", value, self.trainer.iter)
        self.trainer.latest_eval = {f"{self.prefix}_{k}": v for k, v in results.items()}
        self.trainer.latest_eval["iteration"] = self.trainer.iter
        self.trainer.model.train()


class MetricWriter(HookBase):
    """Every ``period`` iterations and at each epoch end: reads the stored metrics (``trainer.flush_metrics``),
    hands them to the tracker, which sends them in the background, and prints the console lines.

    Console: one line every ``period`` iterations (and at the last) with the training values,
    ``epoch 3/15  iter 60/330  train_loss 0.2164  lr 0.02  ETA 0:01:52``, and one line per epoch with the
    evaluation. The ETA is for the whole run, from ``pace`` (the ``RunPace`` that EpochTimer feeds and the bar
    shows too; without one, ``?``). Its state in a checkpoint is the MLflow run it logs to, which a resume
    re-attaches.
    """

    state_key = "MetricWriter"  # the class name of earlier versions: their checkpoints still resume

    TRAINING_VALUES = ("train_loss", "lr")
    EPOCH_VALUES = ("val_loss", "val_acc1", "val_acc1_raw", "images_per_sec")  # _raw: with EMA (engine/ema.py)

    def __init__(self, tracker, period: int, pace: RunPace | None = None):
        self.tracker, self.period = tracker, period
        self.pace = pace if pace is not None else RunPace()
        self.latest: dict[str, float] = {}
        self._fresh: set[str] = set()

    def after_step(self):
        if is_period_end(self.trainer.iter, self.period, self.trainer.max_iter):
            self.trainer.flush_metrics()
            logger.info(self._line(f"iter {self.trainer.iter}/{self.trainer.max_iter}", self.TRAINING_VALUES))
            self._fresh.clear()

    def after_epoch(self):
        self.trainer.storage.put("epoch", self.trainer.epoch + 1, self.trainer.iter)  # 1-based, as printed
        self.trainer.flush_metrics()
        if any(name in self._fresh for name in self.EPOCH_VALUES):
            logger.info(self._line("", self.EPOCH_VALUES, only=self._fresh, epoch_ended=True))
        self._fresh.clear()

    def after_train(self):
        if self.trainer.exception is None or isinstance(self.trainer.exception, TrainingInterrupted):
            self.trainer.flush_metrics()

    def write_metrics(self, records):
        for name, value, _ in records:
            self.latest[name] = value
            self._fresh.add(name)
        if self.tracker is not None:
            self.tracker.log_metrics(records)

    def state_dict(self):
        run_id = self.tracker.run_id if self.tracker is not None else None
        return {"mlflow_run_id": run_id} if run_id else {}

    def _line(self, position: str, names, only=None, epoch_ended: bool = False) -> str:
        trainer = self.trainer
        parts = [f"epoch {trainer.epoch + 1}/{trainer.max_epochs}"] + ([position] if position else [])
        for name in names:
            if name in self.latest and (only is None or name in only):
                parts.append(_format_value(name, self.latest[name]))
        parts.append(f"ETA {time_left(trainer, self.pace, epoch_ended)}")
        return "  ".join(parts)


def _format_value(name: str, value: float) -> str:
    if name == "images_per_sec":
        return f"{value:.0f} img/s"
    if name.endswith("_raw"):  # with EMA: the trained weights' value beside the average's
        return f"raw {value:.4g}"
    return f"{name} {value:.4g}" if math.isfinite(value) else f"{name} {value}"


class ProgressBar(HookBase):
    """One tqdm bar for the whole run on the terminal's stderr, with the run's ETA and pace from ``pace`` (the
    ``RunPace`` the console lines show too; tqdm's own estimate, a moving average that evaluations and
    start-up pull around, is not shown).

    Only on a terminal: never in log.txt, a pipe or a file (``train_bg.sh``'s console file). Lines printed
    meanwhile go above it (``engine.logger``).
    """

    FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    TEXT_PERIOD_S = 0.5  # how often the ETA text is recomputed (tqdm redraws at most as often)

    def __init__(self, stream=None, enabled: bool = True, pace: RunPace | None = None):
        self.stream = stream or sys.__stderr__
        self.enabled = enabled and _is_terminal(self.stream)
        self.pace = pace if pace is not None else RunPace()
        self._bar = None
        self._text_time = -math.inf

    def before_train(self):
        if not self.enabled:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.iter, file=self.stream,
                         bar_format=self.FORMAT, unit="step", ncols=self._width(), mininterval=0.5, leave=False,
                         desc=self._description(), postfix=self._pace_text())
        attach_progress_bar(self._bar)

    def before_epoch(self):
        if self._bar is not None:
            self._bar.ncols = self._width()  # follows a resized terminal, epoch by epoch
            self._bar.set_description_str(self._description(), refresh=False)

    def after_step(self):
        if self._bar is not None:
            now = self.pace.last_step_time
            if now is None or now - self._text_time >= self.TEXT_PERIOD_S:
                self._bar.set_postfix_str(self._pace_text(), refresh=False)
                self._text_time = now if now is not None else -math.inf
            self._bar.update(1)

    def after_train(self):
        if self._bar is not None:
            attach_progress_bar(None)
            self._bar.close()
            # tqdm erases the bar by writing spaces over it: the next line printed would end in them.
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._bar = None

    @property
    def bar(self):
        """The tqdm bar while it is on screen, else None (``str(bar)`` is the line it draws)."""
        return self._bar

    def _pace_text(self) -> str:
        return f"ETA {time_left(self.trainer, self.pace)}, {step_rate(self.pace)}"

    def _description(self) -> str:
        return f"epoch {self.trainer.epoch + 1}/{self.trainer.max_epochs}"

    def _width(self) -> int:
        """A little narrower than the terminal: the "^C" a terminal echoes then stays on the bar's line."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 80
        return max(columns - 4, 40)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class BestCheckpointer(HookBase):
    """``model_best.pth``: the weights of the epoch with the best ``val_acc1`` so far (of a fresh evaluation:
    an epoch without one never counts). Registered before ``PeriodicCheckpointer``, so that a checkpoint of
    the same epoch knows the best accuracy so far."""

    state_key = "BestCheckpointer"  # the class name of earlier versions: their checkpoints still resume

    def __init__(self, checkpointer, metric: str = "val_acc1", filename: str = "model_best.pth", model=None):
        self.checkpointer, self.metric, self.filename = checkpointer, metric, filename
        self.model = model  # what is saved: the EMA's module with EMA, else (None) the trained model
        self.best = -math.inf
        self.best_metrics: dict[str, float] = {}  # the evaluation it was saved at, with its iteration

    def after_epoch(self):
        latest = self.trainer.latest_eval or {}
        value = latest.get(self.metric)
        fresh = latest.get("iteration") == self.trainer.iter  # evaluated this very model, not an older one
        if fresh and value is not None and value > self.best:
            self.trainer.flush_metrics()  # raises if the loss diverged: a diverged model is never "best"
            self.best = value
            self.best_metrics = {k: v for k, v in latest.items() if isinstance(v, (int, float))}
            model = self.model if self.model is not None else self.trainer.unwrapped_model
            self.checkpointer.save_model(self.filename, model, wait=False)

    def state_dict(self):
        return {"best": self.best, "best_metrics": self.best_metrics}

    def load_state_dict(self, state):
        self.best = state.get("best", state.get("best_acc1", -math.inf))
        self.best_metrics = state.get("best_metrics", {})


class PeriodicCheckpointer(HookBase):
    """Saves a checkpoint every ``period`` iterations, at every epoch end and when training is interrupted.

    The state is serialized at once; the files are written by the checkpointer's background thread while
    training goes on, and ``after_train`` waits until they are on disk. A failed write stops training at the
    next step where the processes agree.

    Before each save the stored metrics are flushed (``trainer.flush_metrics``: they reach the tracker, and a
    NaN loss is never checkpointed); ``before_write()``, if given, runs on the writer thread just before the
    checkpoint file is written: the tracker's ``save_pending`` persists what MLflow has not received yet, so
    no metric older than a checkpoint can be lost.
    """

    def __init__(self, checkpointer, period: int, before_write=None):
        self.checkpointer, self.period, self.before_write = checkpointer, period, before_write

    def after_step(self):
        iteration = self.trainer.iter
        if iteration % self.trainer.stop_check_period == 0:  # where ranks agree (every step alone)
            self.checkpointer.raise_if_failed()
        if self.period and iteration % self.period == 0 and iteration % self.trainer.iters_per_epoch:
            self._save()  # (not at an epoch's end: after_epoch saves there)

    def after_epoch(self):
        self._save()

    def after_train(self):
        exception = self.trainer.exception
        if exception is None or isinstance(exception, TrainingInterrupted):
            if exception is not None:
                self._save()
            self.checkpointer.wait()
            return
        try:
            self.checkpointer.wait(every_rank=False)  # what was queued before the failure still lands
        except Exception as error:  # the training's own error is the one raised; this one goes to the log
            logger.error(str(error))

    def _save(self):
        self.trainer.flush_metrics()
        self.checkpointer.save(self.trainer.iter, self.trainer.state_dict(), wait=False,
                               before_write=self.before_write)
