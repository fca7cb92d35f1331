"""Data a user hands to the run API as objects instead of a DATA.DATASET_TYPE name.

    Runner(cfg, train_data=..., val_data=...)

Each may be
- the project's in-memory ``TensorSplit`` (uint8 images, labels): batched on the device, as digits or CIFAR-10;
- a ``torch.utils.data.Dataset`` whose items are ``(image tensor [C, H, W], class index)``: read through a
  DataLoader with ``DATA.NUM_WORKERS`` workers and batched by the engine's plan, so shuffling is keyed by
  ``(SEED, epoch)``, each process of a DDP run takes its share, and ``--resume`` continues bit for bit;
- a ``torch.utils.data.DataLoader`` of ``(images, labels)`` batches, used as it is: its order is yours (call
  ``sampler.set_epoch`` style shuffling is honoured), a resume skips the batches already trained, and under DDP
  its sampler must give each process its share.

The transforms of ``DATA.TRANSFORM_LIST`` run on whole batches on the device; uint8 images are scaled to
[0, 1] and normalized with ImageNet's statistics (3 channels) or a middle-of-the-range guess (1 channel).
"""

import itertools

import torch
from torch.utils.data import DataLoader, Dataset

from ptengine.datasets.base import DatasetError, DatasetSplits, TensorSplit
from ptengine.datasets.batches import Batch
from ptengine.datasets.image_folder import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD


def splits_from_objects(train, val, num_classes: int) -> DatasetSplits:
    """``DatasetSplits`` of the user's own training and validation data (both are needed)."""
    if train is None or val is None:
        raise DatasetError("give both train_data and val_data (a Dataset, a DataLoader or a TensorSplit), or "
                           "neither to use DATA.DATASET_TYPE")
    channels = _channels(train)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN * channels, GREY_STD * channels)
    source = f"{type(train).__name__} given to the run API"
    return DatasetSplits(train=train, val=val, test=None, mean=mean, std=std, num_classes=num_classes, source=source)


def class_names_of(data) -> list[str] | None:
    """The class names a dataset carries (torchvision's ``classes``), if any."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    names = getattr(dataset, "classes", None)
    return [str(name) for name in names] if names else None


def _channels(data) -> int:
    if isinstance(data, TensorSplit):
        return data.images.shape[1]
    if isinstance(data, DataLoader):
        images = next(iter(data))[0]
        return images.shape[1]
    if isinstance(data, Dataset):
        image = data[0][0]
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise DatasetError(f"the items of {type(data).__name__} must be (image tensor [C, H, W], class index); "
                               f"got {type(image).__name__}: add a transform that returns a tensor, e.g. "
                               "torchvision.transforms.v2.PILToTensor()")
        return image.shape[0]
    raise DatasetError(f"train_data/val_data must be a torch Dataset, a DataLoader or a TensorSplit, not "
                       f"{type(data).__name__}")


class LoaderAsIs:
    """A user's DataLoader as a batch source: its batches, moved to the device and transformed there."""

    def __init__(self, loader: DataLoader, transform, device, world_size: int = 1, channels_last: bool = False):
        if loader.batch_size is None:
            raise DatasetError("a DataLoader given to the run API needs a batch_size (the engine averages the loss "
                               "over the exact samples of each step); or give its Dataset instead")
        self.loader, self.transform, self.device = loader, transform, torch.device(device)
        self.world_size = world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.samples = len(loader.dataset) if loader.drop_last is False else len(loader) * loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def global_batch_size(self, index: int) -> int:
        local = min(self.loader.batch_size, self.samples - index * self.loader.batch_size)
        return local * self.world_size

    def epoch(self, epoch: int, start: int = 0):
        set_epoch = getattr(self.loader.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        for index, (images, labels) in enumerate(itertools.islice(self.loader, start, None), start):
            images = images.to(self.device, non_blocking=True)
            indices = torch.arange(index * self.loader.batch_size, index * self.loader.batch_size + len(images),
                                   device=self.device)  # per-sample keys of the random transforms
            images = self.transform(images, indices, epoch)
            yield Batch(images.contiguous(memory_format=self.memory_format), labels.to(self.device),
                        self.global_batch_size(index))
