"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), resized to 32x32."""

import torch
import torch.nn.functional as F

from datasets.base import DatasetSplits, TensorSplit, channel_stats, match_channels, split_train_val


def build_digits(cfg) -> DatasetSplits:
    from sklearn.datasets import load_digits  # imported here: only this dataset needs scikit-learn

    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # values 0..16 -> [0, 1]
    size = cfg.DATA.IMAGE_SIZE
    resized = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = (resized.clamp(0, 1) * 255).round().to(torch.uint8)
    images = match_channels(images, cfg.DATA.INPUT_DIM)
    labels = torch.from_numpy(digits.target)
    train, val = split_train_val(TensorSplit(images, labels), cfg.DATA.VALIDATION_SIZE, cfg.SEED)
    mean, std = channel_stats(train.images)
    return DatasetSplits(train=train, val=val, test=None, mean=mean, std=std, num_classes=10,
                         source="sklearn.datasets.load_digits (bundled with scikit-learn)")
