"""Launch ``tools/train_net.py`` under torchrun from a test, and leave no process behind.

torchrun starts every worker in a session of its own, so killing torchrun's process group would orphan
them: ``Launch.kill`` reads the whole process tree from ``/proc`` first, then kills each process in it.

Run as a script, this file *is* ``train_net.py``, except that after a torchrun restart rank 0 comes back
last: it starts ``RESTART_DELAY`` seconds (default 3) after every other rank has started. The worker that
replaces a killed rank 0 then reaches the process group last every time, as happens by chance on a busy
machine or a slow node::

    torchrun --max-restarts 1 ... tests/torchrun_utils.py --config-file config/digits.yaml KEY VALUE ...
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TORCHRUN = Path(sys.executable).parent / "torchrun"
TRAIN_NET = Path(__file__).resolve().parent.parent / "tools" / "train_net.py"


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


def rank0_comes_back_last() -> None:
    """After a restart: ranks > 0 say they started (a file in the cwd); rank 0 waits for all of them."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0":
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    started = [Path(f"restart{restart}_rank{r}_started") for r in range(1, world_size)]
    if rank > 0:
        started[rank - 1].touch()
        return
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(float(os.environ.get("RESTART_DELAY", "3")))


if __name__ == "__main__":
    sys.path.insert(0, str(TRAIN_NET.parent.parent))
    from tools import train_net  # imported first, so that only the wait decides who reaches the group first

    rank0_comes_back_last()
    import torch.distributed as dist
    _s = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    print("DEBUG attempt", os.environ["TORCHELASTIC_RESTART_COUNT"], "rank", os.environ["RANK"], time.time(), {k: _s.get(k) for k in _s.list_keys()}, flush=True)
    sys.exit(train_net.main())
