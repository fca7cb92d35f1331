"""Builders for the optimizer and the LR scheduler, chosen by name from the config."""

import math

import torch

from ptengine.solvers.lr_schedulers import SCHEDULE_REGISTRY, PerIterationLR, with_warmup
from ptengine.solvers.optimizers import OPTIMIZER_REGISTRY


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZER_REGISTRY.lookup(cfg.TRAIN.OPTIMIZER_TYPE)(model.parameters(), cfg.TRAIN)


def build_lr_scheduler(cfg, optimizer, iters_per_epoch: int) -> PerIterationLR:
    """A per-iteration scheduler; ``iters_per_epoch`` counts optimizer steps (after gradient accumulation)."""
    max_iters = iters_per_epoch * cfg.TRAIN.MAX_EPOCHS
    schedule = SCHEDULE_REGISTRY.lookup(cfg.TRAIN.SCHEDULER_TYPE)(cfg.TRAIN, iters_per_epoch, max_iters)
    warmup_iters = math.ceil(cfg.TRAIN.WARMUP_EPOCHS * iters_per_epoch)
    return PerIterationLR(optimizer, with_warmup(schedule, warmup_iters))


__all__ = ["build_lr_scheduler", "build_optimizer"]
