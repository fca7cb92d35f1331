"""``--rerun RUN_ID``: the config a logged MLflow run was trained with, to train it again."""

import tempfile

from engine.mlflow_delivery import environment
from engine.tracking import make_client, resolve_tracking_uri
from ptengine.config import ConfigError, load_config
from ptengine.config.setup import fill_derived_defaults, merge_opts, validate_config


def rerun_config(run_id: str, opts: list[str]):
    """The config.yaml logged by ``run_id`` (plus ``opts``), and tags that point back to that run."""
    pairs = dict(zip(opts[0::2], opts[1::2], strict=False))
    client = make_client(resolve_tracking_uri(pairs.get("MLFLOW.TRACKING_URI", "")))
    with tempfile.TemporaryDirectory(prefix="rerun-") as folder:
        try:
            client.get_run(run_id)
            with _no_download_bar():
                config_file = client.download_artifacts(run_id, "config.yaml", folder)
        except Exception as error:
            raise ConfigError(f"cannot fetch config.yaml of MLflow run {run_id}: {str(error).splitlines()[0]}; "
                              "check the run id and MLFLOW.TRACKING_URI / MLFLOW_TRACKING_URI") from None
        source = load_config(config_file)
    # A re-run writes to a new output folder unless the command line names one.
    if "OUTPUT_DIR" not in opts[0::2]:
        opts = ["OUTPUT_DIR", ""] + opts
    cfg = source.clone()
    cfg.defrost()
    merge_opts(cfg, opts)
    fill_derived_defaults(cfg)  # a key the command line empties gets its default, as in a new run
    validate_config(cfg)
    cfg.freeze()
    return cfg, {"rerun_of": run_id}


def _no_download_bar():
    """Without MLflow's "Downloading artifacts" bar for one small file: the first thing a rerun printed.

    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR is MLflow's public switch (mlflow.environment_variables); it is put back
    as it was, so the user's own setting holds for the rest of the run."""
    return environment("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
