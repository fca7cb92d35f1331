"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), resized to 32x32."""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ptengine.datasets.base import DatasetSplits, TensorSplit, channel_stats, match_channels, split_train_val


def build_digits(cfg) -> DatasetSplits:
    images, targets = load_digits_arrays()
    pixels = torch.from_numpy(images).float().unsqueeze(1) / 16.0  # values 0..16 -> [0, 1]
    size = cfg.DATA.IMAGE_SIZE
    resized = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = (resized.clamp(0, 1) * 255).round().to(torch.uint8)
    images = match_channels(images, cfg.DATA.INPUT_DIM)
    labels = torch.from_numpy(targets)
    train, val = split_train_val(TensorSplit(images, labels), cfg.DATA.VALIDATION_SIZE, cfg.SEED)
    mean, std = channel_stats(train.images)
    return DatasetSplits(train=train, val=val, test=None, mean=mean, std=std, num_classes=10,
                         source="sklearn.datasets.load_digits (bundled with scikit-learn)")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The images (float64, [1797, 8, 8], values 0..16) and labels (int64) of sklearn's ``load_digits()``.

    Read straight from the CSV file scikit-learn ships, found without importing scikit-learn: importing it
    (for scipy) costs about 1.7 s of CPU, a third of a digits run's start-up. ``load_digits()`` itself if the
    file has moved."""
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec else None
    path = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target.astype(np.int64)
    with gzip.open(path, "rt") as rows:
        table = np.loadtxt(rows, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
