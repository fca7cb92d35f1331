"""LR schedules as a multiplier of the base LR, evaluated per optimizer step (iteration).

Epoch-based schedules (step_lr, multistep) only change value at epoch boundaries, exactly as a per-epoch
StepLR would; cosine decays every iteration. A linear warmup, if any, multiplies the first iterations.
Everything is a pure function of the iteration, so the schedule resumes exactly from a checkpoint.
"""

import math

from config.registry import Registry


def step_lr(train_cfg, iters_per_epoch, max_iters):
    return lambda it: train_cfg.GAMMA ** ((it // iters_per_epoch) // train_cfg.STEP_SIZE)


def multistep(train_cfg, iters_per_epoch, max_iters):
    milestones = sorted(train_cfg.MILESTONES)
    return lambda it: train_cfg.GAMMA ** sum(it // iters_per_epoch >= m for m in milestones)


def cosine(train_cfg, iters_per_epoch, max_iters):
    return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, max_iters) / max_iters))


def constant(train_cfg, iters_per_epoch, max_iters):
    return lambda it: 1.0


SCHEDULE_REGISTRY = Registry("TRAIN.SCHEDULER_TYPE",
                             {"step_lr": step_lr, "multistep": multistep, "cosine": cosine, "constant": constant})


def with_warmup(schedule, warmup_iters: int):
    if warmup_iters <= 0:
        return schedule
    return lambda it: schedule(it) * min(1.0, (it + 1) / warmup_iters)
