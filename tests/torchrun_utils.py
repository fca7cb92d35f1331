"""Launch ``tools/train_net.py`` under torchrun from a test, and leave no process behind.

torchrun starts every worker in a session of its own, so killing torchrun's process group would orphan
them: ``Launch.kill`` reads the whole process tree from ``/proc`` first, then kills each process in it.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TORCHRUN = Path(sys.executable).parent / "torchrun"


class Launch:
    """One launcher process (``python`` or ``torchrun``) run in ``cwd``, stdout and stderr in ``log_path``."""

    def __init__(self, command: list, cwd: Path, log_path: Path, env: dict[str, str]):
        self.command, self.log_path = [str(part) for part in command], Path(log_path)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self.returncode: int | None = None

    def wait(self, deadline: float) -> int | None:
        """The exit code; None, after killing the whole tree, when ``deadline`` (``time.monotonic``) passes."""
        try:
            self.returncode = self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
        return self.returncode

    def kill(self) -> None:
        """SIGKILL this launcher and every process below it (nothing happens once they have all exited)."""
        for pid in [*descendants(self.process.pid), self.process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)

    def workers(self) -> dict[int, int]:
        """``{RANK: pid}`` of the workers torchrun runs right now."""
        ranks = {}
        for pid in children(self.process.pid):
            rank = environ_of(pid).get("RANK")
            if rank is not None:
                ranks[int(rank)] = pid
        return ranks

    def output_tail(self, lines: int = 30) -> str:
        """The command and the end of its output, for assertion messages."""
        output = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join([f"$ {' '.join(self.command)}  (exit code {self.returncode})", *output[-lines:]])


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread or the process ended meanwhile
            pass
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, deepest first."""
    found = []
    for child in children(pid):
        found += [*descendants(child), child]
    return found


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)

