"""Hooks: small objects that do one job each at fixed points of the training loop.

The trainer calls every registered hook, in registration order, like this::

    hook.before_train()
    for epoch in epochs:
        hook.before_epoch()
        for iteration in epoch:
            hook.before_step(); trainer.run_step(); hook.after_step()
        hook.after_epoch()
    hook.after_train()          # always, also when training raised

Subclass ``HookBase`` and override the methods you need; ``self.trainer`` is the running trainer
(``trainer.iter`` counts finished iterations, ``trainer.epoch`` is the current epoch, ``trainer.storage``
collects metrics, ``trainer.exception`` is what ended training, if anything). A hook that keeps state
across a resume implements ``state_dict``/``load_state_dict``.
"""

import logging
import math
import sys
import time
import weakref

logger = logging.getLogger("engine")


class TrainingInterrupted(Exception):
    """Raised by the loop after a stop was requested (SIGINT/SIGTERM); hooks save a checkpoint on it."""


class HookBase:
    trainer = None  # set by Trainer.register_hooks (a weak proxy: hooks do not keep the trainer alive)

    def before_train(self): ...

    def before_epoch(self): ...

    def before_step(self): ...

    def after_step(self): ...

    def after_epoch(self): ...

    def after_train(self): ...

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

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def after_step(self):
        self.trainer.storage.put("lr", self.scheduler.get_last_lr()[0], self.trainer.iter)
        self.scheduler.step()

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


class IterationTimer(HookBase):
    """Epoch wall time and training throughput (measured per epoch: no per-step device sync)."""

    def __init__(self, samples_per_epoch: int):
        self.samples_per_epoch = samples_per_epoch
        self._start = 0.0
        self._first_iter = 0

    def before_epoch(self):
        self._start, self._first_iter = time.perf_counter(), self.trainer.iter

    def after_epoch(self):
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
    full result (confusion matrix included) stays in ``trainer.latest_eval`` for other hooks.
    """

    def __init__(self, eval_function, period: int, prefix: str = "val"):
        self.eval_function, self.period, self.prefix = eval_function, period, prefix

    def after_epoch(self):
        if not is_period_end(self.trainer.epoch + 1, self.period, self.trainer.max_epochs):
            return
        results = self.eval_function()
        for name, value in results.items():
            if isinstance(value, (int, float)):
                self.trainer.storage.put(f"{self.prefix}_{name}", value, self.trainer.iter)
        self.trainer.latest_eval = {f"{self.prefix}_{k}": v for k, v in results.items()}
        self.trainer.latest_eval["iteration"] = self.trainer.iter
        self.trainer.model.train()


class MetricWriter(HookBase):
    """Reads the stored metrics every ``period`` iterations (one device sync), checks the loss is finite,
    prints a console line and hands the values to the tracker, which sends them in the background."""

    def __init__(self, tracker, period: int):
        self.tracker, self.period = tracker, period
        self.latest: dict[str, float] = {}

    def after_step(self):
        if is_period_end(self.trainer.iter, self.period, self.trainer.max_iter):
            self.write()

    def after_epoch(self):
        self.trainer.storage.put("epoch", self.trainer.epoch, self.trainer.iter)
        self.write()

    def after_train(self):
        if self.trainer.exception is None or isinstance(self.trainer.exception, TrainingInterrupted):
            self.write()

    def write(self):
        self.trainer.check_finite()
        records = self.trainer.storage.drain()
        if not records:
            return
        for name, value, _ in records:
            self.latest[name] = value
        if self.tracker is not None:
            self.tracker.log_metrics(records)
        logger.info(self._console_line())

    def _console_line(self) -> str:
        trainer = self.trainer
        parts = [f"epoch {trainer.epoch + 1}/{trainer.max_epochs}", f"iter {trainer.iter}/{trainer.max_iter}"]
        for name in ("train_loss", "lr", "val_loss", "val_acc1", "images_per_sec"):
            if name in self.latest:
                value = self.latest[name]
                parts.append(f"{name} {value:.4g}" if math.isfinite(value) else f"{name} {value}")
        return "  ".join(parts)


class ProgressBar(HookBase):
    """A tqdm bar per epoch on the terminal's stderr (kept out of log.txt)."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream, self.enabled = stream or sys.__stderr__, enabled
        self._bar = None

    def before_epoch(self):
        if not self.enabled:
            return
        from tqdm import tqdm

        done = self.trainer.iter - self.trainer.epoch * self.trainer.iters_per_epoch
        self._bar = tqdm(total=self.trainer.iters_per_epoch, initial=done, file=self.stream, leave=False,
                         desc=f"epoch {self.trainer.epoch + 1}/{self.trainer.max_epochs}", mininterval=0.5)

    def after_step(self):
        if self._bar is not None:
            self._bar.update(1)

    def after_epoch(self):
        self._close()

    def after_train(self):
        self._close()

    def _close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class PeriodicCheckpointer(HookBase):
    """Saves a checkpoint every ``period`` iterations, at every epoch end and when training is interrupted,
    and ``model_best.pth`` by ``val_acc1``.

    The state is serialized at once; the files are written by the checkpointer's background thread while
    training goes on, and ``after_train`` waits until they are on disk. A failed write stops training at the
    next step.

    Before each save the metrics are written and checked finite, and ``before_save()`` runs on the training
    thread. It may return a function, which the writer thread runs just before the checkpoint file is written:
    the tracker's ``snapshot_pending`` returns one that persists the metrics not yet delivered to MLflow, so
    no metric older than a checkpoint can be lost.
    """

    def __init__(self, checkpointer, period: int, writer: MetricWriter | None = None, before_save=None):
        self.checkpointer, self.period, self.writer, self.before_save = checkpointer, period, writer, before_save
        self.best_acc1 = -math.inf

    def after_step(self):
        if self.trainer.iter % self.trainer.stop_check_period == 0:  # where ranks agree (every step alone)
            self.checkpointer.raise_if_failed()
        at_epoch_end = self.trainer.iter % self.trainer.iters_per_epoch == 0  # after_epoch saves there
        if self.period and self.trainer.iter % self.period == 0 and not at_epoch_end:
            self._save()

    def after_epoch(self):
        self.trainer.check_finite()  # a diverged model is never "best"
        latest = self.trainer.latest_eval or {}
        acc1 = latest.get("val_acc1")
        fresh = latest.get("iteration") == self.trainer.iter  # evaluated this very model, not an older one
        if fresh and acc1 is not None and acc1 > self.best_acc1:
            self.best_acc1 = acc1
            self.checkpointer.save_model("model_best.pth", self.trainer.unwrapped_model, wait=False)
        self._save()  # after the update above, so the checkpoint knows the best accuracy so far

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
        if self.writer is not None:
            self.writer.write()
        self.trainer.check_finite()
        before_write = self.before_save() if self.before_save is not None else None
        self.checkpointer.save(self.trainer.iter, self.trainer.state_dict(), wait=False,
                               before_write=before_write if callable(before_write) else None)

    def state_dict(self):
        return {"best_acc1": self.best_acc1}

    def load_state_dict(self, state):
        self.best_acc1 = state["best_acc1"]
