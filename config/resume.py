"""Which config changes a resume may make: only those that do not change the numbers training computes."""

from pathlib import Path

import yaml
from yacs.config import CfgNode

from ptengine.config.setup import ConfigError, flatten_config

RESUME_MAY_CHANGE = {
    "OUTPUT_DIR", "TRAIN.MAX_EPOCHS", "TRAIN.GPUS", "TRAIN.DISTRIBUTED_BACKEND", "DATA.NUM_WORKERS",
    "DATA.PRETRANSFORM", "DATA.CACHE_DIR", "MODEL.WEIGHTS", "MLFLOW.TRACKING_URI", "MLFLOW.RUN_NAME", "LOG.PERIOD",
    "LOG.PROGRESS_BAR", "EVAL.PERIOD", "EVAL.SPLIT", "CHECKPOINT.PERIOD", "CHECKPOINT.KEEP", "MLFLOW.LOG_MODEL",
    "MLFLOW.SYSTEM_METRICS", "MLFLOW.REGISTER_MODEL", "MLFLOW.END_WAIT", "MLFLOW.ENABLED",
    # the same computation; compiled kernels may round differently (engine/compile.py), and so may the GPU's fast
    # ones (cuDNN autotuning, TF32)
    "TRAIN.COMPILE", "TRAIN.COMPILE_BACKEND", "TRAIN.DETERMINISTIC",
}


def check_resume_config(cfg: CfgNode, saved_yaml: str, path: Path) -> None:
    """Refuse to resume ``cfg`` from the checkpoint ``path`` written with the config ``saved_yaml`` if a key
    that changes the training trajectory differs."""
    saved = flatten_config(CfgNode(yaml.safe_load(saved_yaml) or {}))
    current = flatten_config(cfg)
    allowed = set(RESUME_MAY_CHANGE)
    if cfg.TRAIN.SCHEDULER_TYPE == "cosine":
        allowed.discard("TRAIN.MAX_EPOCHS")  # the cosine schedule spans MAX_EPOCHS: changing it changes the LRs
    if not cfg.TRAIN.AMP:
        allowed.add("TRAIN.AMP_DTYPE")  # unused without AMP (and AMP itself may not change)
    changed = sorted(k for k in current if k not in allowed and k in saved and saved[k] != current[k])
    if changed:
        details = ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in changed[:4])
        raise ConfigError(f"cannot resume from {path.name}: the config changes the training trajectory ({details}); "
                          "resume with the original values, or start a new run in another OUTPUT_DIR")
