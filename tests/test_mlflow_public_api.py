"""The delivery process writes into MLflow only through ``MlflowClient`` (engine/mlflow_delivery.py): never into
the store's tables behind MLflow's back. What it delivers reads back exactly as MLflow's own ``log_batch``
writes it (the same history per key, the same latest values, NaN and ±inf included), and every value lands
exactly once when a request is sent again: after an answer lost on the way back, or by a resumed run that
re-sends its tail with new timestamps."""

import math

from fault_utils import empty_store, mlflow_client
from mlflow.entities import Metric

from engine.mlflow_delivery import RunDelivery

ITEMS = [("metric", key, value, step, 1_700_000_000_000 + step)
         for step, values in enumerate([(2.5, 0.1), (float("nan"), 0.1), (float("inf"), 0.09), (1.5, 0.08),
                                        (-float("inf"), 0.08), (0.7, 0.07)])
         for key, value in zip(("train_loss", "lr"), values, strict=True)]
ITEMS.append(("metric", "val_acc1", 0.5, 3, 1_700_000_000_003))


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


class AnswerLostOnce:
    """An MLflow client whose first metric ``log_batch`` reaches the store and then fails, as a request whose
    answer is lost on the way back (a timeout, a dropped connection)."""

    def __init__(self, client):
        self.client, self.failed = client, False

    def __getattr__(self, name):
        return getattr(self.client, name)

    def log_batch(self, run_id, metrics=(), **kwargs):
        result = self.client.log_batch(run_id, metrics=metrics, **kwargs)
        if metrics and not self.failed:
            self.failed = True
            raise ConnectionError("read timed out")
        return result


def test_every_write_goes_through_the_mlflow_client(tmp_path):
    # The URI names one store and the client another: whatever reaches the URI's store went around the client.
    bypassed_uri, client_uri = empty_store(tmp_path / "bypassed"), empty_store(tmp_path / "client")
    bypassed_bytes = (tmp_path / "bypassed" / "mlflow.db").read_bytes()
    delivery = RunDelivery(bypassed_uri, "public", "run", params={"lr": 0.1}, tags={}, run_id=None,
                           client=mlflow_client(client_uri))
    delivery.deliver(ITEMS[:7])
    delivery.deliver(ITEMS[7:])
    assert store_contents(client_uri, delivery.run_id) == mlflow_reference(tmp_path)
    assert (tmp_path / "bypassed" / "mlflow.db").read_bytes() == bypassed_bytes


def test_a_request_sent_again_leaves_every_value_exactly_once(tmp_path):
    uri = empty_store(tmp_path / "retried")
    client = AnswerLostOnce(mlflow_client(uri))
    delivery = RunDelivery(uri, "retried", "run", params={}, tags={}, run_id=None, client=client)
    try:
        delivery.deliver(ITEMS)
    except ConnectionError:
        pass
    assert client.failed
    delivery.deliver(ITEMS)  # what DeliveryQueue does after a failure
    # A resumed run re-attaches and re-sends from its checkpoint on, logged again at a later time.
    later = [(kind, name, value, step, timestamp + 60_000) for kind, name, value, step, timestamp in ITEMS[6:]]
    RunDelivery(uri, "retried", "run", params={}, tags={}, run_id=delivery.run_id).deliver(later)
    assert store_contents(uri, delivery.run_id) == mlflow_reference(tmp_path)
