"""One process per run folder: two trainings writing checkpoints into one folder and metrics into one MLflow
run would corrupt both.

The lock is ``fcntl.flock`` on ``OUTPUT_DIR/run.lock``: the kernel releases it when its process ends, however
it ends (kill -9 included), so a folder is never left locked by a process that is gone. The file says who holds
it (host and pid), for the error a second process gets. A node lost with its lock on a network file system is
released by that file system's lease expiry (NFSv4: about 90 s).
"""

import fcntl
import os
import socket
import time
from pathlib import Path

from ptengine.config import ConfigError

LOCK_FILE = "run.lock"


class FolderLock:
    """``with FolderLock(folder):`` holds the folder for this process, or raises ``ConfigError`` naming the
    process that holds it."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self._file = None

    def __enter__(self):
        file = open(self.path, "a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise ConfigError(f"OUTPUT_DIR {self.path.parent} is in use by {holder}; wait for that training to "
                              "end (or stop it), or choose another OUTPUT_DIR (nothing was changed)") from None
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()  # releases the lock; the file stays (removing it would race a waiting process)
            self._file = None
