"""The MLflow delivery queue (engine/mlflow_delivery.py): metrics wait to fill a request, for at most ``max_delay``.

Each request costs the store a fixed amount of work, so the queue sends few large ones; whoever needs the
records now (``flush``, ``close``) gets them at once. Nothing is reordered. What nobody waits for is delivered at
the lowest CPU priority, out of the training's way.
"""

import os
import sys
import threading
import time

import pytest
from fault_utils import wait_for

from engine.mlflow_delivery import MAX_METRICS_PER_REQUEST, DeliveryQueue, LowPriorityThread


class Recorder:
    """A ``deliver`` function that keeps every batch it was given."""

    def __init__(self):
        self.batches: list[list] = []
        self.delivered = threading.Event()

    def __call__(self, batch):
        self.batches.append(list(batch))
        self.delivered.set()


def metrics(count: int, first_step: int = 1) -> list[tuple]:
    return [("metric", "train_loss", 0.5, step, 0) for step in range(first_step, first_step + count)]


def started_queue(max_delay: float) -> tuple[DeliveryQueue, Recorder]:
    recorder = Recorder()
    queue = DeliveryQueue(recorder, max_delay=max_delay)
    queue.start()
    return queue, recorder


def test_metrics_wait_for_more_then_go_as_one_request_after_max_delay():
    queue, recorder = started_queue(max_delay=0.6)
    started = time.monotonic()
    for step in range(1, 31, 10):
        queue.extend(metrics(10, step))

    assert recorder.delivered.wait(timeout=10)
    waited = time.monotonic() - started
    assert 0.5 <= waited < 5
    assert [len(batch) for batch in recorder.batches] == [30]
    assert [item[3] for item in recorder.batches[0]] == list(range(1, 31))
    queue.close(timeout=5)


def test_a_full_request_goes_at_once():
    queue, recorder = started_queue(max_delay=60)
    queue.extend(metrics(MAX_METRICS_PER_REQUEST + 5))

    assert recorder.delivered.wait(timeout=10)
    assert len(recorder.batches[0]) == MAX_METRICS_PER_REQUEST
    assert queue.flush(timeout=10)
    assert [len(batch) for batch in recorder.batches] == [MAX_METRICS_PER_REQUEST, 5]
    queue.close(timeout=5)


def test_flush_sends_what_is_queued_without_waiting_for_max_delay():
    queue, recorder = started_queue(max_delay=60)
    queue.extend(metrics(3))
    time.sleep(0.2)
    assert recorder.batches == []  # still waiting for more

    assert queue.flush(timeout=10)  # well within max_delay: flush does not wait for it
    assert [len(batch) for batch in recorder.batches] == [3]
    assert queue.pending() == []
    queue.close(timeout=5)


def test_items_behind_waiting_metrics_keep_their_order():
    queue, recorder = started_queue(max_delay=0.3)
    queue.extend(metrics(4))
    queue.put(("artifact", "/tmp/figure.png", None))
    queue.extend(metrics(2, first_step=5))

    deadline = time.monotonic() + 10
    while len(recorder.batches) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(batch[0][0], len(batch)) for batch in recorder.batches] == [("metric", 4), ("artifact", 1), ("metric", 2)]
    queue.close(timeout=5)


def test_close_delivers_everything_left():
    queue, recorder = started_queue(max_delay=60)
    queue.extend(metrics(7))
    queue.put(("status", "FINISHED"))

    assert queue.close(timeout=10)
    assert [len(batch) for batch in recorder.batches] == [7, 1]
    assert recorder.batches[-1] == [("status", "FINISHED")]


def own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="a nice value per thread is Linux's")
def test_metrics_nobody_waits_for_go_at_the_lowest_priority_and_the_rest_at_normal_priority():
    seen = []

    def deliver(batch):
        seen.append((batch[0][0], [item[3] for item in batch if item[0] == "metric"], own_niceness()))

    def logged(step: int, seconds_ago: float = 0.0) -> tuple:
        return "metric", "train_loss", 0.5, step, int((time.time() - seconds_ago) * 1000)

    background = DeliveryQueue(deliver, max_delay=0.05, background=True, max_lag=20)
    background.start()
    background.extend([logged(1)])  # fresh, and nobody waits for it
    wait_for(lambda: background.delivered == 1, "the fresh metric")
    background.extend([logged(2, seconds_ago=60)])  # a minute late (a machine busy with other work)
    wait_for(lambda: background.delivered == 2, "the late metric")
    background.close(timeout=10)

    asked = DeliveryQueue(deliver, max_delay=60, background=True)  # metrics wait, unless someone asks
    asked.start()
    asked.extend([logged(3)])
    assert asked.flush(timeout=30)
    asked.put(("status", "FINISHED"))
    assert asked.flush(timeout=30)
    asked.close(timeout=10)

    normal = own_niceness()
    assert seen == [("metric", [1], LowPriorityThread.NICENESS), ("metric", [2], normal), ("metric", [3], normal),
                    ("status", [], normal)]
