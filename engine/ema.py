"""Exponential moving average (EMA) of the weights, updated after every optimizer step, and its hook.

The EMA's module is what evaluation, ``model_best.pth``, ``model_final.pth`` and the logged model use when
``TRAIN.EMA_DECAY`` is on: ``FinalWeights`` is the one place that decides it, for all of them. Its state
(weights and update count) is saved in every
checkpoint through ``EMAHook.state_dict``, so a resumed run continues the same average.
"""

import copy

import torch
from torch import nn

from engine.distributed import module_to_evaluate, unwrapped
from engine.hooks import HookBase


class ModelEMA:
    """An average of ``model``'s parameters; its buffers (BatchNorm running statistics) are copied, not averaged.

    Update ``t`` (1, 2, ...) uses the warm-up decay ``min(decay, (1 + t) / (10 + t))`` (as TensorFlow's
    ExponentialMovingAverage with ``num_updates``): 0.18 at the first update, 0.9 after 80, 0.99 after 890. A
    constant decay would keep the random initial weights in the average for about ``1 / (1 - decay)`` steps;
    the warm-up forgets them within a few dozen, which short runs need.

    Under DDP every rank holds the same weights after each optimizer step, so every rank's average is the same
    without any communication. The copied buffers are each rank's own (without SyncBatchNorm every rank updates
    its statistics from its share of the batch); rank 0's are the ones saved, and ``engine.evaluation.evaluate``
    gives them to every rank before it evaluates, so no per-step collective is needed for them.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    def current_decay(self) -> float:
        """The decay of the next update."""
        step = self.updates + 1
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model`` (the plain module: the same structure as ``self.module``)."""
        weight = 1.0 - self.current_decay()
        self.updates += 1
        averages, parameters = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averages, parameters, weight)  # average += weight * (parameter - average)
        buffers = list(model.buffers())
        if buffers:
            torch._foreach_copy_(list(self.module.buffers()), buffers)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.module.load_state_dict(state["model"])


class EMAHook(HookBase):
    """Updates ``ema`` after every optimizer step; its state joins every checkpoint.

    Register it before any hook that evaluates or checkpoints (tools/build.py puts it first), so they see the
    average of the step that just ran.
    """

    state_key = "EMAHook"  # the class name of earlier versions: their checkpoints still resume

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def after_step(self):
        self.ema.update(self.trainer.unwrapped_model)

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)


class FinalWeights:
    """Which weights a run evaluates, saves as model_best.pth and model_final.pth, tests and logs: the moving
    average's with ``ema``, else the trained model's. Every consumer asks this one object."""

    def __init__(self, model: nn.Module, ema: ModelEMA | None = None):
        self.model, self.ema = model, ema

    @property
    def module(self) -> nn.Module:
        """The plain module of those weights (no DDP or DataParallel wrapper, not compiled): saved and logged."""
        return self.ema.module if self.ema is not None else unwrapped(self.model)

    @property
    def evaluated(self) -> nn.Module:
        """What evaluates them (DataParallel kept: it splits the batch over the GPUs; never compiled)."""
        return self.ema.module if self.ema is not None else module_to_evaluate(self.model)

    @property
    def trained(self) -> nn.Module:
        """The trained weights' plain module (with EMA: evaluated beside the average, as val_*_raw)."""
        return module_to_evaluate(self.model)

    def hooks(self) -> list[HookBase]:
        """What keeps them current: the EMA's update after every step (first of all hooks), or nothing."""
        return [EMAHook(self.ema)] if self.ema is not None else []
