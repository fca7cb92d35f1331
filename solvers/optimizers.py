"""Optimizers by name. Each takes the model's parameters and the TRAIN section of the config."""

import torch

from ptengine.config.registry import Registry


def sgd(params, train_cfg):
    return torch.optim.SGD(params, lr=train_cfg.LR, momentum=train_cfg.MOMENTUM, weight_decay=train_cfg.WEIGHT_DECAY)


def adam(params, train_cfg):
    return torch.optim.Adam(params, lr=train_cfg.LR, betas=(train_cfg.MOMENTUM, 0.999),
                            weight_decay=train_cfg.WEIGHT_DECAY)


def adamw(params, train_cfg):
    return torch.optim.AdamW(params, lr=train_cfg.LR, betas=(train_cfg.MOMENTUM, 0.999),
                             weight_decay=train_cfg.WEIGHT_DECAY)


OPTIMIZER_REGISTRY = Registry("TRAIN.OPTIMIZER_TYPE", {"sgd": sgd, "adam": adam, "adamw": adamw})
