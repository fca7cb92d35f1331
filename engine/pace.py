"""The pace of this process's training and the time the run has left: one estimate, which the console lines
(``hooks.MetricWriter``) and the progress bar (``hooks.ProgressBar``) both show. ``hooks.EpochTimer`` feeds it.
"""

import datetime
import time


class RunPace:
    """Seconds per step, measured while this process trains, and the time left from them.

    The step time is that of steady training: measured between steps of one epoch, leaving out this process's
    first ``warmup_steps`` steps (start-up, compilation, caches filling) and the first step of every epoch (the
    data loader starting), so that evaluations, epoch-end checkpoints and start-up never enter it. What an epoch
    change costs beyond one step (evaluation, checkpoint, the next epoch's start) is measured apart and counted
    once per epoch end still to come. Only steps run by this process count: after a resume the estimate knows
    nothing of the process before, and no step of that one is taken for this one's.

    ``clock`` returns seconds as a float (``time.perf_counter``); tests pass a fake one.
    """

    def __init__(self, clock=time.perf_counter, warmup_steps: int = 3):
        self.clock = clock
        self._warmup_left = warmup_steps
        self._steady_seconds, self._steady_steps = 0.0, 0  # over the finished stretches
        self._stretch: tuple[float, int] | None = None  # (time, iteration) where this epoch's steady stretch began
        self._last_step: tuple[float, int] | None = None  # (time, iteration) of the newest step
        self._epoch_end: float | None = None  # when the last step of the last finished epoch ended
        self._change_seconds, self._changes = 0.0, 0  # epoch changes measured, beyond one step each

    def step_finished(self, iteration: int) -> None:
        """Call after every step, with the number of finished iterations."""
        now = self.clock()
        self._last_step = (now, iteration)
        if self._warmup_left > 0:
            self._warmup_left -= 1
            self._stretch = (now, iteration) if self._warmup_left == 0 else None
            return
        if self._stretch is None:  # the first step of an epoch
            if self._epoch_end is not None:
                step = self.step_seconds() or 0.0
                self._change_seconds += max(now - self._epoch_end - step, 0.0)
                self._changes += 1
            self._stretch = (now, iteration)

    def epoch_finished(self) -> None:
        """Call at the end of every epoch, before its evaluation and checkpoint."""
        if self._stretch is not None and self._last_step is not None:
            self._steady_seconds += self._last_step[0] - self._stretch[0]
            self._steady_steps += self._last_step[1] - self._stretch[1]
        self._stretch = None
        self._epoch_end = self._last_step[0] if self._warmup_left == 0 and self._last_step else None

    def step_seconds(self) -> float | None:
        """Seconds per steady step so far (None before any was measured)."""
        seconds, steps = self._steady_seconds, self._steady_steps
        if self._stretch is not None and self._last_step is not None:
            seconds += self._last_step[0] - self._stretch[0]
            steps += self._last_step[1] - self._stretch[1]
        return seconds / steps if steps > 0 else None

    def seconds_left(self, steps_left: int, epoch_ends_left: int) -> float | None:
        """The time ``steps_left`` steps and ``epoch_ends_left`` epoch ends will take (None: not known yet)."""
        if steps_left <= 0 and epoch_ends_left <= 0:
            return 0.0
        step = self.step_seconds()
        if step is None and not self._changes:
            return None
        # Measured epoch changes but no steady step: epochs of one step, whose whole time each change holds.
        step = step if step is not None else 0.0
        change = self._change_seconds / self._changes if self._changes else 0.0
        return max(steps_left, 0) * step + max(epoch_ends_left, 0) * change

    @property
    def last_step_time(self) -> float | None:
        return self._last_step[0] if self._last_step else None


def time_left(trainer, pace: RunPace, epoch_ended: bool = False) -> str:
    """The run's time left as H:MM:SS (``?`` until a steady step was measured). ``epoch_ended``: the current
    epoch's end is under way (its evaluation ran), so only the later epochs' ends are still to come."""
    ends_left = trainer.max_epochs - trainer.epoch - (1 if epoch_ended else 0)
    seconds = pace.seconds_left(trainer.max_iter - trainer.iter, ends_left)
    return "?" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


def step_rate(pace: RunPace) -> str:
    """Steady steps per second (seconds per step when slower than one a second), as the bar shows it."""
    step = pace.step_seconds()
    if step is None or step <= 0:
        return "? step/s"
    return f"{1 / step:.2f} step/s" if step < 1 else f"{step:.2f} s/step"
