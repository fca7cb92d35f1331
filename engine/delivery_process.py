"""The training side of the MLflow delivery process (``engine.mlflow_delivery``).

The training thread only appends items to a list: a sender thread writes them to the child's pipe a few
times a second (at once for anything but metrics, and when asked to flush), and a reader thread takes the
child's answers. Every item stays in ``pending()`` until the child reports it delivered, so what a
checkpoint or the end saves to ``mlflow_pending.jsonl`` is exactly what the store may lack. Both threads
spend their time blocked in the operating system, outside the GIL.
"""

import logging
import os
import subprocess
import sys
import threading
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path

logger = logging.getLogger("engine")

REPO_ROOT = Path(__file__).resolve().parent.parent
SEND_INTERVAL = 0.25  # seconds between the sender's writes of queued metrics


class DeliveryProcess:
    """Starts the child at once (it imports MLflow while the run is being built) and talks to it.

    ``on_run_id(run_id)`` is called from the reader thread when the child has created or re-attached the run.
    """

    def __init__(self, on_run_id=None):
        self.on_run_id = on_run_id
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        code = (f"import sys; sys.path.append({str(REPO_ROOT)!r}); "
                f"from engine.mlflow_delivery import serve; serve({child_reads}, {child_writes})")
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child_reads, child_writes),
                                        stdin=subprocess.DEVNULL)
        os.close(child_reads)
        os.close(child_writes)
        self._to_child = Connection(parent_writes, readable=False)
        self._from_child = Connection(parent_reads, writable=False)
        self._condition = threading.Condition()
        self._outbox: list = []  # messages not yet written to the pipe
        self._unacked: deque = deque()  # items sent or queued, not yet reported delivered
        self._acked = 0  # items the child has delivered so far
        self._replies: dict[str, tuple] = {}
        self._urgent = self._closing = self._gone = False
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="mlflow-reader", daemon=True)
        self._sender.start()
        self._reader.start()

    # ---- called by the tracker -------------------------------------------------------------------------------
    def post_items(self, items: list, urgent: bool = False) -> None:
        """Queue items for delivery; metrics go with the sender's next write, anything else at once."""
        if not items:
            return
        with self._condition:
            self._unacked.extend(items)
            self._outbox.append(("items", items))
            if urgent:
                self._urgent = True
                self._condition.notify_all()

    def post(self, *message) -> None:
        with self._condition:
            self._outbox.append(message)
            self._urgent = True
            self._condition.notify_all()

    def ask(self, message: tuple, replies: tuple[str, ...], timeout: float) -> tuple | None:
        """Send ``message`` and wait for the first answer whose kind is in ``replies`` (None: no answer)."""
        with self._condition:
            for kind in replies:
                self._replies.pop(kind, None)
        self.post(*message)
        with self._condition:
            self._condition.wait_for(lambda: self._gone or any(kind in self._replies for kind in replies), timeout)
            return next((self._replies[kind] for kind in replies if kind in self._replies), None)

    def wait_delivered(self, timeout: float) -> bool:
        """Ask the child to send everything now; wait at most ``timeout`` for it to be delivered."""
        self.post("flush")
        with self._condition:
            return self._condition.wait_for(lambda: not self._unacked or self._gone, timeout) and not self._unacked

    def pending(self) -> list:
        with self._condition:
            return list(self._unacked)

    def close(self, timeout: float = 5.0) -> None:
        """End the child (what it has not delivered stays in ``pending()``): EOF, then kill after ``timeout``."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._sender.join(timeout)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout)

    # ---- the threads -----------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._urgent or self._closing, SEND_INTERVAL)
                messages, self._outbox, self._urgent = self._outbox, [], False
                closing = self._closing
            try:
                for message in _merged(messages):
                    self._to_child.send(message)
            except OSError:  # the child is gone; the reader reports it
                return
            if closing:
                self._to_child.close()  # EOF: the child exits
                return

    def _read_loop(self) -> None:
        while True:
            try:
                kind, *args = self._from_child.recv()
            except (EOFError, OSError):
                break
            if kind == "delivered":
                with self._condition:
                    for _ in range(args[0] - self._acked):
                        self._unacked.popleft()
                    self._acked = args[0]
                    self._condition.notify_all()
            elif kind == "log":
                logger.log(args[0], args[1])
            elif kind == "run_id" and self.on_run_id is not None:
                self.on_run_id(args[0])
            else:
                with self._condition:
                    self._replies[kind] = tuple(args)
                    self._condition.notify_all()
        self._from_child.close()
        with self._condition:
            self._gone = True
            self._condition.notify_all()
            closing = self._closing
        if not closing:
            code = self.process.wait()
            logger.warning(f"the MLflow delivery process exited (code {code}); what it did not deliver is saved "
                           "to mlflow_pending.jsonl at the next checkpoint and at the end")


def _merged(messages: list) -> list:
    """Consecutive ``items`` messages as one (one write instead of one per LOG.PERIOD)."""
    merged: list = []
    for message in messages:
        if message[0] == "items" and merged and merged[-1][0] == "items":
            merged[-1] = ("items", merged[-1][1] + message[1])
        else:
            merged.append(message)
    return merged
