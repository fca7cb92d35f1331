"""Model registry: ``TRAIN.MODEL_TYPE`` picks a builder ``cfg -> nn.Module``.

Adding a model is one new file with a ``build_<name>(cfg)`` function plus one entry below.
"""

from torch import nn

from ptengine.config.registry import Registry
from ptengine.networks.resnet import build_resnet18
from ptengine.networks.simple_cnn import SimpleCNN, build_simple_cnn

MODEL_REGISTRY = Registry("TRAIN.MODEL_TYPE", {
    "simple_cnn": build_simple_cnn,
    "resnet18": build_resnet18,
})


def build_model(cfg) -> nn.Module:
    return MODEL_REGISTRY.lookup(cfg.TRAIN.MODEL_TYPE)(cfg)


__all__ = ["MODEL_REGISTRY", "SimpleCNN", "build_model"]
