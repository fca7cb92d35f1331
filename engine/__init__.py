"""The training engine: the run's life (``Runner``), the loop, hooks, checkpoints, evaluation, the MLflow tracker,
and the registries your own models, datasets, optimizers, schedules and transforms join.

The engine receives built objects (model, batches, optimizer); it never reads dataset- or model-specific
config keys and never imports ``datasets``, ``networks`` or ``tools``.

The names below are imported on first use (``from engine import Trainer``), so that a module of the engine
that needs no torch (``engine.mlflow_delivery``, run in its own process) starts without importing it.
"""

import importlib

_HOME = {
    "BatchSource": "engine.trainer", "Trainer": "engine.trainer",
    "Checkpointer": "engine.checkpoint", "CheckpointError": "engine.checkpoint",
    "evaluate": "engine.evaluation",
    "BestCheckpointer": "engine.hooks", "EpochTimer": "engine.hooks", "EvalHook": "engine.hooks",
    "HookBase": "engine.hooks", "LRScheduler": "engine.hooks", "MetricWriter": "engine.hooks",
    "PeriodicCheckpointer": "engine.hooks", "ProgressBar": "engine.hooks", "TrainingInterrupted": "engine.hooks",
    "MLflowTracker": "engine.tracking",
    "Runner": "engine.runner", "RunResult": "engine.runner",
    "Registry": "engine.registry", "MODEL_REGISTRY": "engine.registry", "DATASET_REGISTRY": "engine.registry",
    "TRANSFORM_REGISTRY": "engine.registry", "OPTIMIZER_REGISTRY": "engine.registry",
    "SCHEDULE_REGISTRY": "engine.registry",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'engine' has no attribute '{name}'")
    return getattr(importlib.import_module(_HOME[name]), name)
