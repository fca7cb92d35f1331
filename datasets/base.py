"""The shapes datasets hand to the rest of the engine."""

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


class DatasetError(ValueError):
    """Data that cannot be found or read; the message says where and how to fix it."""


@dataclass
class TensorSplit:
    """A split held in memory: one uint8 tensor of images and one int64 tensor of labels."""

    images: torch.Tensor  # uint8, [N, C, H, W]
    labels: torch.Tensor  # int64, [N]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            shape = tuple(self.images.shape)
            raise ValueError(f"images must be a uint8 [N, C, H, W] tensor, got {self.images.dtype} {shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetSplits:
    """What a dataset builder returns.

    ``train``/``val``/``test`` are either a ``TensorSplit`` (fits in memory, batched on the device) or a
    ``torch.utils.data.Dataset`` whose items are ``(uint8 [C, H, W] tensor, label)`` (read through a
    DataLoader). ``mean``/``std`` are per-channel statistics in [0, 1] units, used by ``normalize``.
    """

    train: TensorSplit | Dataset
    val: TensorSplit | Dataset
    test: TensorSplit | Dataset | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    source: str = ""  # where the images come from: a download URL, a folder, or how they are made


def split_train_val(split: TensorSplit, validation_size: float, seed: int) -> tuple[TensorSplit, TensorSplit]:
    """Hold out ``validation_size`` of ``split`` for validation, chosen by a permutation seeded with ``seed``."""
    train_idx, val_idx = holdout_indices(len(split), validation_size, seed)
    return (TensorSplit(split.images[train_idx], split.labels[train_idx]),
            TensorSplit(split.images[val_idx], split.labels[val_idx]))


def holdout_indices(count: int, validation_size: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices (train, validation) of ``count`` items: ``validation_size`` of them (at least one) held out,
    chosen by a permutation seeded with ``seed``."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    num_val = max(1, round(count * validation_size))
    if num_val >= count:
        raise DatasetError(f"DATA.VALIDATION_SIZE {validation_size} leaves no training images out of {count}")
    return order[num_val:].sort().values, order[:num_val].sort().values


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 [N, C, H, W] tensor, in [0, 1] units."""
    sums = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(sums)
    for chunk in images.split(4096):  # bounded memory for CIFAR-sized data
        values = chunk.to(torch.float64) / 255
        sums += values.sum(dim=(0, 2, 3))
        squares += (values**2).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = sums / count
    std = (squares / count - mean**2).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat single-channel images to ``channels`` (e.g. grey digits for an RGB model)."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.repeat(1, channels, 1, 1)
    raise DatasetError(f"the dataset has {images.shape[1]} channels but DATA.INPUT_DIM is {channels}; "
                       f"set DATA.INPUT_DIM {images.shape[1]}")
