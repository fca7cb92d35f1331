"""Transforms applied to whole batches on the training device.

Images arrive as uint8 ``[B, C, H, W]`` tensors together with their sample indices and the epoch.
Random transforms draw from a hash of ``(seed, epoch, sample index)`` instead of a global random stream,
so the same sample gets the same crop and flip in a resumed run and in any number of processes.
"""

import itertools

import torch

from ptengine.config.registry import Registry

PAD = 4  # random_crop padding, as in the usual CIFAR recipe

_MASK31 = (1 << 31) - 1


def sample_hash(indices: torch.Tensor, seed: int, epoch: int, salt: int) -> torch.Tensor:
    """Deterministic pseudo-random int64 values in [0, 2**31) per sample, on the indices' device.

    Every intermediate stays below 2**62, so the integer arithmetic never overflows and CPU and CUDA
    give identical values.
    """
    x = (indices.to(torch.int64) * 1103515245 + (seed * 1000003 + epoch * 7919 + salt * 104729)) & _MASK31
    for multiplier in (1664525, 22695477, 1103515245):
        x = ((x ^ (x >> 15)) * multiplier + 12345) & _MASK31
    return x


class ToTensor:
    """uint8 [0, 255] -> float32 [0, 1]."""

    random = False
    pointwise = True  # each output value depends on the same pixel's value alone

    def __call__(self, images, indices, epoch):
        return images.float().div_(255) if images.dtype == torch.uint8 else images


class Normalize:
    random = False
    pointwise = True

    def __init__(self, mean, std):
        self.mean, self.std = mean, std
        self._cache = {}

    def __call__(self, images, indices, epoch):
        images = ToTensor()(images, indices, epoch)  # forgiving when to_tensor was left out of the list
        key = (images.device, images.dtype)
        if key not in self._cache:  # built once per device, not every step
            shape = (1, -1, 1, 1)
            self._cache[key] = (torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(shape),
                                torch.tensor(self.std, device=images.device, dtype=images.dtype).view(shape))
        mean, std = self._cache[key]
        return (images - mean) / std


class RandomCrop:
    """Zero-pad by ``PAD`` pixels and crop back to the original size at a per-sample offset."""

    random = True

    def __init__(self, seed: int):
        self.seed = seed

    def coordinates(self, indices, epoch, height, width):
        """The input row of every output row and the input column of every output column, per sample."""
        draws = sample_hash(indices, self.seed, epoch, salt=1)
        offset_y = draws % (2 * PAD + 1) - PAD
        offset_x = (draws // (2 * PAD + 1)) % (2 * PAD + 1) - PAD
        return (offset_y[:, None] + torch.arange(height, device=indices.device),
                offset_x[:, None] + torch.arange(width, device=indices.device))

    def __call__(self, images, indices, epoch):
        return remap(images, *self.coordinates(indices, epoch, *images.shape[2:]))


class RandomHorizontalFlip:
    random = True

    def __init__(self, seed: int):
        self.seed = seed

    def coordinates(self, indices, epoch, height, width):
        """Rows unchanged (None), columns reversed for about half of the samples."""
        flip = (sample_hash(indices, self.seed, epoch, salt=2) % 2).bool()
        forward = torch.arange(width, device=indices.device)
        return None, torch.where(flip[:, None], forward.flip(0), forward)

    def __call__(self, images, indices, epoch):
        return remap(images, *self.coordinates(indices, epoch, *images.shape[2:]))


def remap(images: torch.Tensor, rows, columns, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b, c, y, x] = images[b, c, rows[b, y], columns[b, x]]``, zero (or ``fill[0, c, 0, 0]``) where the
    coordinate is outside; ``None`` rows or columns are left as they are.

    One gather over each image with a one-pixel border, flattened: much faster than padding, cropping and
    flipping step by step (each of which copies the batch).
    """
    batch, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    if fill is not None:
        border = fill.reshape(1, channels, 1)
        padded[:, :, 0], padded[:, :, -1], padded[:, :, :, 0], padded[:, :, :, -1] = border, border, border, border
    rows = torch.arange(height, device=images.device).expand(batch, height) if rows is None else rows
    columns = torch.arange(width, device=images.device).expand(batch, width) if columns is None else columns
    rows, columns = (rows + 1).clamp(0, height + 1), (columns + 1).clamp(0, width + 1)  # outside -> border
    positions = (rows[:, :, None] * (width + 2) + columns[:, None, :]).view(batch, 1, height * width)
    gathered = padded.flatten(2).gather(2, positions.expand(batch, channels, height * width))
    return gathered.view(batch, channels, height, width)


class _Remap:
    """Consecutive coordinate-mapping steps (crop, flip) composed into one ``remap`` of the batch.

    ``fill`` is what the padding holds: zero, or what zero became through pointwise steps moved before this.
    """

    random = True

    def __init__(self, steps, fill: torch.Tensor | None = None):
        self.steps, self.fill = steps, fill

    def __call__(self, images, indices, epoch):
        height, width = images.shape[2:]
        rows, columns = self.steps[0].coordinates(indices, epoch, height, width)
        for step in self.steps[1:]:
            later_rows, later_columns = step.coordinates(indices, epoch, height, width)
            rows, columns = _compose(rows, later_rows, height), _compose(columns, later_columns, width)
        return remap(images, rows, columns, self.fill)


def _compose(first, second, size: int):
    """Input coordinates of ``second`` applied after ``first``; what ``second`` takes from outside stays outside.
    ``None`` is the identity."""
    if first is None or second is None:
        return second if first is None else first
    inside = (second >= 0) & (second < size)
    return torch.where(inside, first.gather(1, second.clamp(0, size - 1)), second)


class BatchTransform:
    """The ordered list of transforms for one split (random ones dropped for evaluation).

    Consecutive steps that only move pixels (they have ``coordinates``) run as one gather.
    """

    def __init__(self, steps):
        self.steps = list(steps)
        self._fused = _fuse_remaps(self.steps)

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        images = _apply(self._fused, images, indices, epoch)
        return images.float() if images.dtype == torch.uint8 else images

    def split_fixed_prefix(self, example: torch.Tensor | None = None) -> tuple["BatchTransform", "BatchTransform"]:
        """The steps that give a sample the same output in every epoch, and the rest.

        In-memory data applies the first part once to the whole split instead of to every batch. That part is
        the leading deterministic steps and, given ``example`` (the split's images, of which the first is
        used), the pointwise steps (to_tensor, normalize) right after a run of crops and flips: moving pixels
        and changing their values commute, when the padding gets the value that a zero pixel turns into.
        """
        count = next((i for i, step in enumerate(self.steps) if step.random), len(self.steps))
        fixed, rest = self.steps[:count], self.steps[count:]
        movers = list(itertools.takewhile(lambda step: hasattr(step, "coordinates"), rest))
        pointwise = list(itertools.takewhile(lambda step: getattr(step, "pointwise", False), rest[len(movers):]))
        if example is None or not movers or not pointwise:
            return BatchTransform(fixed), BatchTransform(rest)
        index = torch.zeros(1, dtype=torch.int64, device=example.device)
        zero = torch.zeros_like(_apply(fixed, example[:1, :, :1, :1], index, 0))  # what the padding inserts
        fill = _apply(pointwise, zero, index, 0)
        later = rest[len(movers) + len(pointwise):]
        return BatchTransform(fixed + pointwise), BatchTransform([_Remap(movers, fill), *later])


def _apply(steps, images, indices, epoch):
    for step in steps:
        images = step(images, indices, epoch)
    return images


def _fuse_remaps(steps) -> list:
    fused, run = [], []
    for step in [*steps, None]:
        if step is not None and hasattr(step, "coordinates"):
            run.append(step)
            continue
        if run:
            fused.append(_Remap(run))
            run = []
        if step is not None:
            fused.append(step)
    return fused


TRANSFORM_REGISTRY = Registry("DATA.TRANSFORM_LIST", {
    "to_tensor": lambda mean, std, seed: ToTensor(),
    "normalize": lambda mean, std, seed: Normalize(mean, std),
    "random_crop": lambda mean, std, seed: RandomCrop(seed),
    "random_horizontal_flip": lambda mean, std, seed: RandomHorizontalFlip(seed),
})


def build_transform(names, mean, std, seed: int, train: bool) -> BatchTransform:
    """Build the batch transform named by ``DATA.TRANSFORM_LIST``; evaluation keeps only deterministic steps."""
    steps = [TRANSFORM_REGISTRY.lookup(name)(mean, std, seed) for name in names]
    return BatchTransform(step for step in steps if train or not step.random)
