"""Metrics delivered into a SQLite store through the bulk path (engine/mlflow_sqlite.py) read back exactly as
if MLflow's own ``log_batch`` had written them: the same history per key, the same latest values, NaN and ±inf
included, and no duplicate when a batch is delivered twice (a retry, or a resumed run re-sending its tail)."""

import math

from fault_utils import empty_store, mlflow_client
from mlflow.entities import Metric

from engine.mlflow_delivery import RunDelivery

ITEMS = [("metric", key, value, step, 1_700_000_000_000 + step)
         for step, values in enumerate([(2.5, 0.1), (float("nan"), 0.1), (float("inf"), 0.09), (1.5, 0.08),
                                        (-float("inf"), 0.08), (0.7, 0.07)])
         for key, value in zip(("train_loss", "lr"), values, strict=True)]
ITEMS.append(("metric", "val_acc1", 0.5, 3, 1_700_000_000_003))  # a key with one record: only the newest path


def readable(value: float) -> str:
    return "nan" if math.isnan(value) else repr(value)


def store_contents(tracking_uri: str, run_id: str) -> tuple:
    client = mlflow_client(tracking_uri)
    history = {key: sorted((m.step, m.timestamp, readable(m.value)) for m in client.get_metric_history(run_id, key))
               for key in ("train_loss", "lr", "val_acc1")}
    latest = {key: readable(value) for key, value in client.get_run(run_id).data.metrics.items()}
    return history, latest


def mlflow_reference(tmp_path) -> tuple:
    """What MLflow's own log_batch writes for ITEMS."""
    uri = empty_store(tmp_path / "reference")
    client = mlflow_client(uri)
    run_id = client.create_run(client.create_experiment("reference")).info.run_id
    metrics = [Metric(name, value, timestamp, step) for _, name, value, step, timestamp in ITEMS]
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    return store_contents(uri, run_id)


class FailsOnce:
    """An MLflow client whose first metric ``log_batch`` fails, after the bulk history was written."""

    def __init__(self, client):
        self.client, self.failed = client, False

    def __getattr__(self, name):
        return getattr(self.client, name)

    def log_batch(self, run_id, metrics=(), **kwargs):
        if metrics and not self.failed:
            self.failed = True
            raise ConnectionError("connection refused")
        return self.client.log_batch(run_id, metrics=metrics, **kwargs)


def test_bulk_history_reads_back_as_mlflow_writes_it(tmp_path):
    uri = empty_store(tmp_path / "bulk")
    delivery = RunDelivery(uri, "bulk", "run", params={}, tags={}, run_id=None)
    delivery.deliver(ITEMS[:7])
    delivery.deliver(ITEMS[7:])
    assert store_contents(uri, delivery.run_id) == mlflow_reference(tmp_path)


def test_a_batch_that_fails_halfway_and_is_delivered_again_leaves_no_duplicate(tmp_path):
    uri = empty_store(tmp_path / "retried")
    client = FailsOnce(mlflow_client(uri))
    delivery = RunDelivery(uri, "retried", "run", params={}, tags={}, run_id=None, client=client)
    try:
        delivery.deliver(ITEMS)
    except ConnectionError:
        pass
    assert client.failed
    delivery.deliver(ITEMS)  # what DeliveryQueue does after a failure
    # and a resumed run re-attaching re-sends from its newest logged step on
    RunDelivery(uri, "retried", "run", params={}, tags={}, run_id=delivery.run_id).deliver(ITEMS)
    assert store_contents(uri, delivery.run_id) == mlflow_reference(tmp_path)
