"""Checkpoint files: atomic saves, safe loads, and finding the newest valid checkpoint.

A save writes a temporary file in the same folder, flushes and fsyncs it, then renames it over the
target, so a crash mid-save never leaves a broken file under a real name. The pointer file
``last_checkpoint`` is rewritten the same way, and only after the checkpoint itself is in place.

The periodic checkpoints of a training run are written by one background thread. The training thread only
takes a ``snapshot`` of the state (the weights change with the next step): a copy of every tensor, GPU ones into
pinned host memory without waiting for the copy. Serializing (about 120 ms for a ResNet-18 and its momentum)
and the disk work (write, fsync, rename, pointer, pruning) overlap with training. ``Checkpointer.wait()`` blocks
until everything is on disk.

Under DDP only rank 0 writes, but every rank makes the same calls in the same order: a failed write is then
raised on every rank at the same point (``raise_on_every_rank``), and no rank is left waiting for the others.
"""

import copy
import io
import logging
import os
import re
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from engine.distributed import broadcast_object, in_process_group, raise_on_every_rank

logger = logging.getLogger("engine")

POINTER = "last_checkpoint"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d{8})\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def serialize(obj) -> memoryview:
    """What ``torch.save`` would write, in memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


class Snapshot:
    """A copy of a (nested) state that later training steps cannot change, taken without waiting for the GPU.

    Tensors are copied (CUDA ones into pinned host memory, asynchronously, in stream order: the step queued after
    them cannot change what they read), containers rebuilt, any other value deep-copied. ``value()`` waits for the
    copies and returns the copy; call it on the thread that serializes.
    """

    def __init__(self, state):
        self._cuda_devices: set[torch.device] = set()
        self._state = self._copy(state)
        self._copies_done = []
        for device in self._cuda_devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._copies_done.append(event)

    def _copy(self, value):
        if isinstance(value, torch.Tensor):
            if value.is_cuda:
                self._cuda_devices.add(value.device)
                return value.detach().to("cpu", non_blocking=True)  # into pinned memory, asynchronously
            return value.detach().clone()
        if isinstance(value, dict):
            copied = copy.copy(value)  # the same type (OrderedDict, defaultdict), then each value copied
            for key, item in value.items():
                copied[key] = self._copy(item)
            return copied
        if isinstance(value, list):
            return [self._copy(item) for item in value]
        if isinstance(value, tuple):
            items = [self._copy(item) for item in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples too
        return copy.deepcopy(value)

    def value(self):
        for event in self._copies_done:
            event.synchronize()
        return self._state


def write_serialized(path: Path, data) -> None:
    """Atomically write bytes from ``serialize``; a failure (disk full, permissions) is one CheckpointError."""
    try:
        atomic_write_bytes(path, data)
    except OSError as error:
        raise CheckpointError(f"could not write {path}: {error.strerror or error}; "
                              "free disk space or fix the folder's permissions (earlier checkpoints are intact)",
                              ) from None


def save_file(obj, path: Path) -> None:
    """``torch.save`` made atomic; a failure (disk full, permissions) is one CheckpointError."""
    write_serialized(path, serialize(obj))


def load_file(path: Path, map_location="cpu"):
    """``torch.load`` with ``weights_only=True``; unreadable or truncated files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, wrong format, or unsafe content refused by weights_only
        raise CheckpointError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None


class Checkpointer:
    """Periodic checkpoints ``checkpoint_<iteration>.pth`` in ``output_dir``, keeping the newest ``keep``.

    ``save(..., wait=False)`` returns once the state is serialized and leaves the writing to a background
    thread (saves land in order); a write that failed is raised by the next ``raise_if_failed()``, ``save`` or
    ``wait()``, on every rank. ``load_newest_valid`` waits for earlier saves first. ``enabled=False`` (ranks
    other than 0) writes nothing.
    """

    def __init__(self, output_dir, keep: int = 3, enabled: bool = True):
        self.output_dir, self.keep, self.enabled = Path(output_dir), keep, enabled
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []
        self._a_write_failed = False  # set on the writer thread

    def save(self, iteration: int, state: dict, wait: bool = True, before_write=None) -> Path:
        """Save ``state``; ``before_write()`` (if given) runs just before the file is written, on the same thread."""
        path = self.output_dir / f"checkpoint_{iteration:08d}.pth"
        self._submit(self._write_checkpoint, path, state, before_write, wait=wait)
        return path

    def save_model(self, name: str, model: torch.nn.Module, wait: bool = True) -> Path:
        """A plain ``state_dict`` (no ``module.`` prefix), loadable with ``torch.load(weights_only=True)``."""
        path = self.output_dir / name
        self._submit(write_serialized, path, model.state_dict() if self.enabled else None, wait=wait)
        return path

    def _submit(self, write, path: Path, obj, *args, wait: bool) -> None:
        self._raise_finished_failure()
        if self.enabled:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
            self._writes.append(self._writer.submit(self._in_order, write, path, Snapshot(obj), *args))
        if wait:
            self.wait()

    def _in_order(self, write, path: Path, snapshot: Snapshot, *args) -> None:
        """Serialize and run one queued write, unless an earlier one failed (that failure stops the run): a later
        checkpoint written after it, once the disk had room again, would move the pointer past it."""
        if self._a_write_failed:
            logger.warning(f"not writing {path.name}: an earlier checkpoint could not be written")
            return
        try:
            write(path, serialize(snapshot.value()), *args)
        except BaseException:
            self._a_write_failed = True
            raise

    def _write_checkpoint(self, path: Path, data, before_write) -> None:
        if before_write is not None:
            before_write()
        write_serialized(path, data)
        atomic_write_bytes(self.output_dir / POINTER, path.name.encode())
        self._prune()
        logger.info(f"saved checkpoint {path.name}")

    def raise_if_failed(self) -> None:
        """Raise the error of a background write that has failed, on every rank (it does not wait)."""
        if not self._a_write_failed and not in_process_group():
            return  # called every step: a flag read, when there is nothing to raise and no rank to tell
        self._raise_finished_failure()

    def _raise_finished_failure(self) -> None:
        raise_on_every_rank(self._first_failure(finished_only=True), as_type=CheckpointError)

    def wait(self, every_rank: bool = True) -> None:
        """Block until every save is on disk; raise the first that failed (on every rank with ``every_rank``;
        only here without, for a rank that is already leaving with an error of its own)."""
        failure = self._first_failure(finished_only=False)
        if every_rank:
            raise_on_every_rank(failure, as_type=CheckpointError)
        elif failure is not None:
            raise failure

    def close(self) -> None:
        """Let the queued writes finish (a failure among them is for ``wait`` to raise) and stop the writer."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _first_failure(self, finished_only: bool) -> BaseException | None:
        """Forget the finished writes (all of them, waiting, unless ``finished_only``); the first error among them."""
        while self._writes and (not finished_only or self._writes[0].done()):
            error = self._writes.pop(0).exception()
            if error is not None:
                return error
        return None

    def checkpoints(self) -> list[Path]:
        """Periodic checkpoints, oldest first."""
        found = [p for p in self.output_dir.glob("checkpoint_*.pth") if _CHECKPOINT_NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name)

    def load_newest_valid(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, newest first by the pointer then by name; None if there is none."""
        self.wait()
        candidates = self.checkpoints()[::-1]
        pointer = self.output_dir / POINTER
        if pointer.is_file():
            named = self.output_dir / pointer.read_text().strip()
            candidates = [named] + [c for c in candidates if c != named]
        for path in candidates:
            try:
                return path, load_file(path)
            except CheckpointError as error:
                logger.warning(f"{error}; trying the previous checkpoint")
        return None

    def set_aside_unreadable(self) -> list[Path]:
        """Rename every periodic checkpoint to ``<name>.unreadable`` (after ``load_newest_valid`` found none that
        loads), so that a fresh start does not overwrite them; returns the new paths, on every rank.

        Under DDP only rank 0 (``enabled``) renames, as it alone writes: every rank renaming the same files made
        some fail with FileNotFoundError while the others waited for them in their next collective. The others
        wait here for its list (or its error)."""
        kept, error = [], None
        if self.enabled:
            try:
                for path in self.checkpoints():
                    kept.append(path.with_name(path.name + ".unreadable"))
                    path.rename(kept[-1])
                (self.output_dir / POINTER).unlink(missing_ok=True)
            except OSError as failure:
                error = CheckpointError(f"could not set aside the unreadable checkpoints of {self.output_dir}: "
                                        f"{failure.strerror or failure}; fix the folder's permissions")
        raise_on_every_rank(error, as_type=CheckpointError)
        return [Path(name) for name in broadcast_object([str(path) for path in kept])]

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem; the rename itself is still atomic
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
