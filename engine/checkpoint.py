"""Checkpoint files: atomic saves, safe loads, and finding the newest valid checkpoint.

A save writes a temporary file in the same folder, flushes and fsyncs it, then renames it over the
target, so a crash mid-save never leaves a broken file under a real name. The pointer file
``last_checkpoint`` is rewritten the same way, and only after the checkpoint itself is in place.
"""

import io
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

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


def save_file(obj, path: Path) -> None:
    """``torch.save`` made atomic; a failure (disk full, permissions) is one CheckpointError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as error:
        raise CheckpointError(f"could not write {path}: {error.strerror or error}; "
                              "free disk space or fix the folder's permissions (earlier checkpoints are intact)",
                              ) from None


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
    """Periodic checkpoints ``checkpoint_<iteration>.pth`` in ``output_dir``, keeping the newest ``keep``."""

    def __init__(self, output_dir, keep: int = 3, enabled: bool = True):
        self.output_dir, self.keep, self.enabled = Path(output_dir), keep, enabled

    def save(self, iteration: int, state: dict) -> Path:
        path = self.output_dir / f"checkpoint_{iteration:08d}.pth"
        if not self.enabled:
            return path
        save_file(state, path)
        atomic_write_bytes(self.output_dir / POINTER, path.name.encode())
        self._prune()
        logger.info(f"saved checkpoint {path.name}")
        return path

    def save_model(self, name: str, model: torch.nn.Module) -> Path:
        """A plain ``state_dict`` (no ``module.`` prefix), loadable with ``torch.load(weights_only=True)``."""
        path = self.output_dir / name
        if self.enabled:
            save_file(model.state_dict(), path)
        return path

    def checkpoints(self) -> list[Path]:
        """Periodic checkpoints, oldest first."""
        found = [p for p in self.output_dir.glob("checkpoint_*.pth") if _CHECKPOINT_NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name)

    def load_newest_valid(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, newest first by the pointer then by name; None if there is none."""
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
