"""The training engine: the loop, hooks, checkpoints, evaluation and the MLflow tracker.

The engine receives built objects (model, batches, optimizer); it never reads dataset- or model-specific
config keys and never imports ``datasets`` or ``networks``.
"""

from engine.checkpoint import Checkpointer, CheckpointError
from engine.evaluation import evaluate
from engine.hooks import (
    EvalHook,
    HookBase,
    IterationTimer,
    LRScheduler,
    MetricWriter,
    PeriodicCheckpointer,
    ProgressBar,
)
from engine.tracking import MLflowTracker
from engine.trainer import Trainer

__all__ = [
    "CheckpointError", "Checkpointer", "EvalHook", "HookBase", "IterationTimer", "LRScheduler", "MLflowTracker",
    "MetricWriter", "PeriodicCheckpointer", "ProgressBar", "Trainer", "evaluate",
]
