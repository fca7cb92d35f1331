"""The training engine: the loop, hooks, checkpoints, evaluation, the MLflow tracker and the run's life.

The engine receives built objects (model, batches, optimizer); it never reads dataset- or model-specific
config keys and never imports ``datasets``, ``networks`` or ``tools``.
"""

from engine.checkpoint import Checkpointer, CheckpointError
from engine.evaluation import evaluate
from engine.hooks import (
    BestCheckpointer,
    EpochTimer,
    EvalHook,
    HookBase,
    LRScheduler,
    MetricWriter,
    PeriodicCheckpointer,
    ProgressBar,
    TrainingInterrupted,
)
from engine.tracking import MLflowTracker
from engine.trainer import BatchSource, Trainer

__all__ = [
    "BatchSource", "BestCheckpointer", "CheckpointError", "Checkpointer", "EpochTimer", "EvalHook", "HookBase",
    "LRScheduler", "MLflowTracker", "MetricWriter", "PeriodicCheckpointer", "ProgressBar", "Trainer",
    "TrainingInterrupted", "evaluate",
]
