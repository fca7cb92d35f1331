"""The benchmark's clocks: epoch wall and CPU time, peak memory, and the engine's timing hook.

The hook is an ordinary ``HookBase`` handed to the run (``Runner(..., hooks=[EpochClock(...)])``): it sees only
what any user's hook sees (``self.trainer``'s public state), so the engine it times is the one a user runs.
"""

import os
import re
import statistics
import time
from pathlib import Path

import torch

from engine.hooks import HookBase

DEFAULT_THREADS = torch.get_num_threads()  # what a user's run gets: read before the benchmark changes it
COST_SAMPLES = 5  # metric flushes timed after each engine run


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory while the block runs: CUDA memory allocated, or the main process's resident set (VmHWM).

    Linux resets VmHWM to the current RSS through /proc/self/clear_refs; elsewhere the peak is the process's.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.mib = 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.mib = torch.cuda.max_memory_allocated() / 2**20
            return
        try:
            status = Path("/proc/self/status").read_text()
            self.mib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        except (OSError, AttributeError):
            import resource

            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class EpochTimes:
    """Wall and CPU seconds of each epoch."""

    def __init__(self, device):
        self.device = device
        self.wall: list[float] = []
        self.cpu: list[float] = []  # this process (all its threads) and its children (DataLoader workers, MLflow)
        self.children_cpu: list[float] = []  # the children's CPU seconds so far, at each lap
        self._marks = (0.0, 0.0)

    def start(self) -> None:
        self._marks = (time.perf_counter(), time.process_time() + children_cpu_seconds())

    def lap(self) -> None:
        synchronize(self.device)
        previous, self._marks = self._marks, None
        self.children_cpu.append(children_cpu_seconds())
        self.start()
        for laps, now, before in zip((self.wall, self.cpu), self._marks, previous, strict=True):
            laps.append(now - before)


class EpochClock(HookBase):
    """Times the engine's epochs from inside the run, as a user's hook would.

    An epoch's lap is taken in ``after_step`` at its last iteration: the epoch-end hooks of epoch N (metric
    writer, checkpoint) fall into lap N+1, so every timed lap pays one epoch-end checkpoint, and the final
    evaluation and model (after the last epoch) are in no lap. Between this hook's ``after_epoch`` (after the
    metric writer) and the next ``before_epoch`` run the checkpointers: that is the checkpoint's cost on the
    training thread. With ``flush_samples``, ``after_train`` times ``trainer.flush_metrics()`` on one
    ``log_period`` of records (a device loss and a float LR per step, as training leaves them).
    """

    def __init__(self, device, log_period: int = 20, flush_samples: int = 0):
        self.times = EpochTimes(device)
        self.log_period, self.flush_samples = log_period, flush_samples
        self.checkpoint: list[float] = []  # seconds of each epoch end after the metric writer, the last left out
        self.flush: list[float] = []
        self.flushes_per_epoch = 0  # every log_period steps and at the epoch end
        self._epoch_end_started: float | None = None

    def before_train(self):
        self.times.start()

    def after_step(self):
        if self.trainer.iter % self.trainer.iters_per_epoch == 0:
            self.times.lap()

    def after_epoch(self):
        self._epoch_end_started = time.perf_counter()

    def before_epoch(self):
        if self._epoch_end_started is not None:
            self.checkpoint.append(time.perf_counter() - self._epoch_end_started)
            self._epoch_end_started = None

    def after_train(self):
        self.flushes_per_epoch = self.trainer.iters_per_epoch // self.log_period + 1
        if self.trainer.exception is None:
            self.flush = [self._time_one_flush() for _ in range(self.flush_samples)]

    def _time_one_flush(self) -> float:
        trainer, step = self.trainer, self.trainer.iter
        for offset in range(1, self.log_period + 1):
            trainer.storage.put("train_loss", torch.rand((), device=trainer.device), step + offset)
            trainer.storage.put("lr", 0.01, step + offset)
        start = time.perf_counter()
        trainer.flush_metrics()
        return time.perf_counter() - start

    def costs(self) -> dict | None:
        """Seconds of one metric flush and of one epoch-end checkpoint (medians), the children's CPU seconds per
        timed epoch (the MLflow delivery process where no DataLoader worker runs), flushes per epoch."""
        if not self.flush or not self.checkpoint or len(self.times.children_cpu) < 2:
            return None
        children = self.times.children_cpu
        return {"flush": statistics.median(self.flush), "checkpoint": statistics.median(self.checkpoint),
                "delivery_cpu_per_epoch": (children[-1] - children[0]) / (len(children) - 1),
                "flushes_per_epoch": self.flushes_per_epoch}


def children_cpu_seconds() -> float:
    """CPU seconds used so far by this process's live child processes, e.g. persistent DataLoader workers."""
    children = []
    for task in Path("/proc/self/task").glob("*") if Path("/proc/self/task").is_dir() else ():
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    return sum(proc_cpu_seconds(f"/proc/{pid}/stat") for pid in children)


def proc_cpu_seconds(stat_path: str) -> float:
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile, or not Linux
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
