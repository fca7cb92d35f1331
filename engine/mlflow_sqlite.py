"""A bulk path for the metric history of a run in a SQLite MLflow store (used by ``engine.mlflow_delivery``).

MLflow's ``log_batch`` into a SQL store builds an ORM object per record and spends about 80 µs of CPU on each;
logged every step, that was the largest part of the engine's per-step cost on a small machine. Here every
record of a batch but each metric's newest one goes into MLflow's ``metrics`` table as a single
``INSERT OR IGNORE`` through MLflow's own table definition (about 7 µs a record); the newest ones then go
through ``log_batch``, so that MLflow itself checks the run and keeps its ``latest_metrics`` table (the run
page's "Metrics" values), exactly as if the whole batch had gone that way.

The order makes a crash between the two harmless: the history is written first, and a re-attached run
re-sends everything from its newest logged step on (``OR IGNORE`` skips a row that is already there).
"""

import math

import sqlalchemy
from mlflow.store.tracking.dbmodels.models import SqlMetric

LARGEST_FLOAT = 1.7976931348623157e308  # SQL has no infinity: MLflow stores ±inf as the largest double


def sql_value(value: float) -> tuple[bool, float]:
    """(is_nan, value) as MLflow stores a metric value: NaN as 0 with its flag, ±inf as ±LARGEST_FLOAT."""
    if math.isnan(value):
        return True, 0.0
    if math.isinf(value):
        return False, LARGEST_FLOAT if value > 0 else -LARGEST_FLOAT
    return False, value


def split_newest(records: list) -> tuple[list, list]:
    """(history, newest) of ``(name, value, step, timestamp_ms)`` records: each name's newest record, ranked by
    (step, timestamp, stored value) as MLflow ranks them for ``latest_metrics``, and all the others."""
    newest: dict = {}  # name -> (rank, record)
    for record in records:
        name, value, step, timestamp = record
        rank = (step, timestamp, sql_value(value)[1])
        if name not in newest or rank > newest[name][0]:
            newest[name] = (rank, record)
    chosen = {id(record) for _, record in newest.values()}
    return [record for record in records if id(record) not in chosen], [record for _, record in newest.values()]


class SqliteMetricHistory:
    """Inserts metric records straight into the ``metrics`` table of one SQLite store."""

    def __init__(self, tracking_uri: str):
        self._engine = sqlalchemy.create_engine(tracking_uri)
        self._insert = sqlalchemy.insert(SqlMetric.__table__).prefix_with("OR IGNORE")

    def insert(self, run_id: str, records: list) -> None:
        """``(name, value, step, timestamp_ms)`` records, in one transaction: all of them or none."""
        rows = []
        for name, value, step, timestamp in records:
            is_nan, stored = sql_value(value)
            rows.append({"run_uuid": run_id, "key": name, "value": stored, "timestamp": timestamp, "step": step,
                         "is_nan": is_nan})
        with self._engine.begin() as connection:
            connection.execute(self._insert, rows)
