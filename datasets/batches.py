"""Batch sources: what the trainer and the evaluator iterate over.

Both sources follow one plan per epoch: a permutation seeded by ``(SEED, epoch)`` cut into global
batches of ``batch_size``; a process of rank ``r`` among ``world_size`` takes the r-th part of every global
batch. One process therefore sees exactly the batches that N processes see together, and a resumed run
can start in the middle of an epoch by skipping ``start`` batches.

Each yielded ``Batch`` holds transformed float images and labels on the training device. A training source
with ``mixing`` (datasets/mixing.py: mixup, cutmix) mixes them after the transform; its labels are then
per-class probabilities.
"""

import atexit
import ctypes
import functools
import math
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ptengine.datasets.base import TensorSplit
from ptengine.datasets.transforms import BatchTransform


@dataclass
class Batch:
    images: torch.Tensor  # float [B, C, H, W] on the device
    labels: torch.Tensor  # int64 [B] on the device; with mixing, float per-class probabilities [B, classes]
    global_size: int  # samples in the whole global batch (all ranks), for exact loss averaging


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class _BatchSource:
    def __init__(self, num_samples, batch_size, transform, device, shuffle, seed, rank=0, world_size=1, mixing=None):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.transform, self.device = transform, torch.device(device)
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.mixing = mixing  # datasets.mixing.BatchMixing, or None

    def __len__(self) -> int:
        """Global batches per epoch (the last one may be smaller)."""
        return math.ceil(self.num_samples / self.batch_size)

    def global_batch_size(self, index: int) -> int:
        """Samples in global batch ``index`` of an epoch (every batch is full but possibly the last)."""
        return min(self.batch_size, self.num_samples - index * self.batch_size)

    def _plan(self, epoch: int, start: int, device) -> Iterator[tuple[torch.Tensor, int]]:
        order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle).to(device)
        for global_batch in order.split(self.batch_size)[start:]:
            local = global_batch if self.world_size == 1 else global_batch.tensor_split(self.world_size)[self.rank]
            yield local, len(global_batch)

    def _mix(self, images, labels, epoch: int, index: int, global_size: int):
        """``mixing`` of this process's share of global batch ``index`` (which starts at ``first``, as cut by
        ``tensor_split``); the batch as it is without mixing."""
        if self.mixing is None:
            return images, labels
        first = self.rank * (global_size // self.world_size) + min(self.rank, global_size % self.world_size)
        return self.mixing(images, labels, epoch, index, first, global_size)


class InMemoryBatches(_BatchSource):
    """A split held as one tensor on the device, indexed and transformed a whole batch at a time.

    With ``pretransform`` the transform's leading deterministic steps (``to_tensor``, ``normalize``) are applied
    once to the whole split, so a batch only pays for the random ones; the split is then kept as float32 (4x
    the memory of uint8). The batches are identical either way: those steps act on each pixel alone.
    """

    def __init__(self, split: TensorSplit, batch_size: int, transform: BatchTransform, device, shuffle: bool,
                 seed: int, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 pretransform: bool = True, mixing=None):
        super().__init__(len(split), batch_size, transform, device, shuffle, seed, rank, world_size, mixing)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        fixed, rest = transform.split_fixed_prefix(example=self.images)
        if pretransform and fixed.steps and len(split):
            self.images, self.transform = apply_once(fixed, self.images), rest
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        # Nothing left to apply per batch (float images, no random step, no mixing): only the indexing, which is
        # all a tiny model's step can afford.
        plain = not self.transform.steps and self.images.is_floating_point() and self.mixing is None
        for index, (local, global_size) in enumerate(self._plan(epoch, start, self.device), start):
            images, labels = self.images[local], self.labels[local]
            if not plain:
                images = self.transform(images, local, epoch)
                images, labels = self._mix(images, labels, epoch, index, global_size)
            yield Batch(images.contiguous(memory_format=self.memory_format), labels, global_size)


def apply_once(transform: BatchTransform, images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``transform`` over a whole split, a chunk at a time (its temporaries stay chunk-sized)."""
    output = None
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        part = transform(part, torch.arange(start, start + len(part), device=images.device), 0)
        if output is None:
            output = torch.empty((len(images), *part.shape[1:]), dtype=part.dtype, device=part.device)
        output[start:start + len(part)] = part
    return output


class _Indexed(Dataset):
    """Adds the sample index to each item, for per-sample random transforms on the device."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label, index


class _PlannedBatches:
    """A batch sampler that replays the current epoch's plan; the DataLoader re-reads it every epoch."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def usable_cpus() -> int:
    """This process's share of the CPUs it may run on: its affinity (what Slurm's --cpus-per-gpu or
    --cpus-per-task, taskset or a container's cpuset allow; ``os.cpu_count()`` counts the whole machine),
    divided among the processes torchrun started on this node, which share it."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform (macOS)
        cpus = os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def dataloader_workers(requested: int) -> int:
    """DATA.NUM_WORKERS, capped at this process's share of the CPUs (more workers than that only compete)."""
    return min(requested, usable_cpus())


# Ctrl+C, `kill`, and Slurm's time-limit warning: the stops the training process handles (engine/run.py).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_leaving: multiprocessing.synchronize.Event | None = None  # set when this process exits: workers may then stop
CLOSED_POLL_S = 0.25  # how often a DataLoader worker looks whether its source was closed


def _training_process_leaving() -> multiprocessing.synchronize.Event:
    """The event a worker's SIGTERM handler reads, set by an exit handler of this process.

    Registered after multiprocessing's own exit handler (imported with torch), so it runs first: that one
    SIGTERMs the DataLoader workers (daemon processes) that are still alive and joins them.
    """
    global _leaving
    if _leaving is None:
        _leaving = multiprocessing.Event()
        atexit.register(_leaving.set)
    return _leaving


def _worker_init(leaving, closed, worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: it ignores the stop signals and ends when its source is closed."""
    _ignore_stop_signals(leaving)
    threading.Thread(target=_exit_when_set, args=(closed,), name="exit-when-closed", daemon=True).start()


def _ignore_stop_signals(leaving) -> None:
    """The stop signals are the training process's to handle.

    torchrun signals its workers' whole process group, Slurm every process of the step, and a terminal's Ctrl+C
    its foreground group: a worker that died of the signal made the training process fail with "DataLoader worker
    is killed by signal" instead of checkpointing. SIGTERM still ends a worker once the training process is
    leaving (multiprocessing stops its daemon processes that way).
    """
    def on_sigterm(signum, frame):
        if leaving.is_set():
            os._exit(0)  # a clean exit: the DataLoader reports workers that died of a signal as failures

    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)


def _exit_when_set(closed) -> None:
    """Ends the worker when the run is over, whoever still holds its DataLoader.

    The DataLoader stops its workers when its iterator is freed. After an error in a worker (an unreadable image)
    the error's traceback holds that iterator: it was freed only by the garbage collector, which runs the queues'
    finalizers first, so its stop request never reached the workers; it then waited 5 s for each (40 s in one
    Python session) and its SIGTERM is ignored here. The workers stayed alive meanwhile.

    ``closed`` is a flag in shared memory, read every CLOSED_POLL_S: a ``multiprocessing.Event`` would make the
    training process's ``set()`` wait forever for a worker that was killed while waiting on it (the out-of-memory
    killer, a bus error when /dev/shm is full).
    """
    while not closed.value:
        time.sleep(CLOSED_POLL_S)
    os._exit(0)  # exit code 0: not a worker failure to the DataLoader


class LoaderBatches(_BatchSource):
    """A folder dataset decoded by DataLoader workers, then moved to the device and transformed in batches."""

    def __init__(self, dataset: Dataset, batch_size: int, transform: BatchTransform, device, shuffle: bool,
                 seed: int, num_workers: int, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 mixing=None):
        super().__init__(len(dataset), batch_size, transform, device, shuffle, seed, rank, world_size, mixing)
        self.planned = _PlannedBatches()
        workers = dataloader_workers(num_workers)
        self.closed = multiprocessing.RawValue(ctypes.c_bool, False)  # set by close(): the workers then exit
        self.loader = DataLoader(_Indexed(dataset), batch_sampler=self.planned, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                 worker_init_fn=functools.partial(_worker_init, _training_process_leaving(),
                                                                  self.closed) if workers > 0 else None,
                                 # a worker that dies before its first batch must not leave us waiting forever
                                 timeout=300 if workers > 0 else 0)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        plan = list(self._plan(epoch, start, "cpu"))
        self.planned.batches = [local.tolist() for local, _ in plan]
        for index, ((images, labels, indices), (_, global_size)) in enumerate(zip(self.loader, plan, strict=True),
                                                                            start):
            images = images.to(self.device, non_blocking=True)
            indices = indices.to(self.device, non_blocking=True)
            images = self.transform(images, indices, epoch)
            images, labels = self._mix(images, labels.to(self.device, non_blocking=True), epoch, index, global_size)
            yield Batch(images.contiguous(memory_format=self.memory_format), labels, global_size)

    def close(self) -> None:
        """Ends the worker processes, at the end of the run: the source is not read after this."""
        self.closed.value = True
        self.loader = None


def build_batches(split, batch_size: int, transform: BatchTransform, device, shuffle: bool, seed: int,
                  num_workers: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                  pretransform: bool = True, mixing=None):
    """The right source for ``split``: in memory for a ``TensorSplit``, a DataLoader for anything else."""
    if isinstance(split, TensorSplit):
        return InMemoryBatches(split, batch_size, transform, device, shuffle, seed, rank, world_size, channels_last,
                               pretransform, mixing)
    return LoaderBatches(split, batch_size, transform, device, shuffle, seed, num_workers, rank, world_size,
                         channels_last, mixing)
