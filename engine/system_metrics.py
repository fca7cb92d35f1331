"""System metrics of a run (CPU, memory, disk, network; GPU utilisation, memory and power where there is
an NVIDIA GPU) through MLflow's own monitor, as ``system/...`` metrics of the run.

MLflow's monitor publishes a sample only once its interval has passed, and drops the unfinished one when it
is stopped, so a run shorter than the interval would have none: ``stop`` publishes a last sample. The
interval stays at 10 s or more: sampling then costs the training step nothing measurable.
"""

import logging
import os

logger = logging.getLogger("engine")
MIN_INTERVAL = 10.0


class SystemMetrics:
    """Samples this machine for the MLflow run ``run_id`` from a background thread, until ``stop``."""

    def __init__(self, run_id: str, tracking_uri: str, interval: float = MIN_INTERVAL, node_id: str | None = None,
                 resume: bool = False):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # our own lines report outages
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=max(interval, MIN_INTERVAL),
                                             resume_logging=resume, node_id=node_id, tracking_uri=tracking_uri)
        self._monitor.start()

    def stop(self) -> None:
        """Stop sampling and publish a last sample (also the only one of a run shorter than the interval)."""
        self._monitor.finish()
        try:
            self._monitor.collect_metrics()
            self._monitor.publish_metrics(self._monitor.aggregate_metrics())
            self._monitor.mlflow_logger.flush()
        except Exception as error:  # the store went away: system metrics are not worth failing a run over
            logger.warning(f"could not log the last system metrics sample: {str(error).splitlines()[0][:200]}")


def node_id() -> str | None:
    """Under torchrun, the node rank (``GROUP_RANK``): each node's metrics are ``system/<node rank>/...``."""
    return os.environ.get("GROUP_RANK")


def samples_this_process() -> bool:
    """One sampler per machine: the first process of each node."""
    return os.environ.get("LOCAL_RANK", "0") == "0"
