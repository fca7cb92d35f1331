"""Random noise images with random labels: no files, no download. For smoke tests and speed checks.

There is nothing to learn here (labels do not depend on pixels), so accuracy stays near chance.
"""

import torch

from ptengine.datasets.base import DatasetSplits, TensorSplit, channel_stats, split_train_val


def build_synthetic(cfg) -> DatasetSplits:
    # A private generator: the same SEED gives the same data whatever else has used the global RNG.
    generator = torch.Generator().manual_seed(cfg.SEED)
    size, channels = cfg.DATA.IMAGE_SIZE, cfg.DATA.INPUT_DIM
    num_classes = len(cfg.DATA.CLASSES)
    images = torch.randint(0, 256, (cfg.DATA.SYNTHETIC_SIZE, channels, size, size),
                           dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (cfg.DATA.SYNTHETIC_SIZE,), generator=generator)
    train, val = split_train_val(TensorSplit(images, labels), cfg.DATA.VALIDATION_SIZE, cfg.SEED)
    mean, std = channel_stats(train.images)
    return DatasetSplits(train=train, val=val, test=None, mean=mean, std=std, num_classes=num_classes,
                         source=f"random noise images and labels (SEED {cfg.SEED})")
