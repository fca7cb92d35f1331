"""User images in torchvision's ImageFolder layout, read from disk through a DataLoader.

    DATA.ROOT/train/<class name>/<any name>.png|.jpg|...
    DATA.ROOT/val/<class name>/...
    DATA.ROOT/test/<class name>/...      (optional)

Class indices follow the sorted folder names, and DATA.CLASSES must list those names in that order.
Items are decoded and resized only; random augmentation and normalization happen later, on whole batches
on the training device.
"""

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ptengine.datasets.base import DatasetError, DatasetSplits

PIL_MODES = {3: "RGB", 1: "L"}  # DATA.INPUT_DIM -> the mode every image is converted to
# No pass over a folder of images just to compute statistics (that can take longer than an epoch):
# natural photos are close enough to ImageNet's; grey images get a middle-of-the-range guess.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.5,), (0.25,)


class ImageFolderDataset(Dataset):
    """Images of one split folder; each item is ``(uint8 [channels, size, size] tensor, class index)``."""

    def __init__(self, folder: Path, channels: int, image_size: int):
        if channels not in PIL_MODES:
            raise DatasetError(f"image_folder reads 1-channel (grey) or 3-channel (RGB) images but DATA.INPUT_DIM "
                               f"is {channels}; set DATA.INPUT_DIM 3 or 1")
        self.folder = folder
        self.mode = PIL_MODES[channels]
        self.image_size = image_size
        from torchvision.datasets import ImageFolder  # here, not at the top: torchvision takes ~1.3 s to import

        try:
            listing = ImageFolder(str(folder))  # lists files only; nothing is opened yet
        except FileNotFoundError as error:
            raise DatasetError(f"no images found in {folder}: {error} Put the images in one subfolder per class, "
                               f"e.g. {folder}/<class name>/0001.png") from None
        self.classes: list[str] = listing.classes
        self.samples: list[tuple[str, int]] = listing.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as file_image:
                image = file_image.convert(self.mode)
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        except Exception as error:  # PIL reports damaged files with many exception types
            # One plain str argument: the error is pickled back from DataLoader workers and rebuilt from it.
            raise DatasetError(f"cannot read the image {path} ({type(error).__name__}: {error}); "
                               "remove or replace the file") from error
        from torchvision.transforms.functional import pil_to_tensor  # imported by __init__ already

        return pil_to_tensor(image), label


def build_image_folder(cfg) -> DatasetSplits:
    root = _check_root(cfg.DATA.ROOT)
    channels, size = cfg.DATA.INPUT_DIM, cfg.DATA.IMAGE_SIZE
    train = ImageFolderDataset(_split_folder(root, "train"), channels, size)
    _check_class_names(list(cfg.DATA.CLASSES), train)
    val = ImageFolderDataset(_split_folder(root, "val"), channels, size)
    _check_same_classes(train, val)
    test = None
    if (root / "test").is_dir():
        test = ImageFolderDataset(root / "test", channels, size)
        _check_same_classes(train, test)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
    return DatasetSplits(train=train, val=val, test=test, mean=mean, std=std, num_classes=len(train.classes),
                         source=str(root.resolve()))


def _check_root(root: str) -> Path:
    if not root:
        raise DatasetError("DATA.ROOT is empty; the image_folder dataset needs DATA.ROOT set to a folder holding "
                           "train/ and val/, each with one subfolder of images per class")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"DATA.ROOT {root} is not a folder; set DATA.ROOT to the folder holding train/ and val/")
    return path


def _split_folder(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{folder} is missing; DATA.ROOT must hold train/ and val/ (and optionally test/), "
                           f"each with one subfolder of images per class")
    return folder


def _check_class_names(names: list[str], train: ImageFolderDataset) -> None:
    """DATA.CLASSES names the labels in metrics and reports; a typed order other than the folders' mislabels them."""
    if names != train.classes:
        raise DatasetError(f"DATA.CLASSES {names} does not match the class folders of {train.folder}, which define "
                           f"the labels in sorted order: {train.classes}; set DATA.CLASSES \"{train.classes}\"")


def _check_same_classes(train: ImageFolderDataset, other: ImageFolderDataset) -> None:
    """Labels are indices into the sorted class folders, so every split needs exactly train's folders."""
    if other.classes == train.classes:
        return
    missing = sorted(set(train.classes) - set(other.classes))
    extra = sorted(set(other.classes) - set(train.classes))
    raise DatasetError(f"the class folders of {other.folder} differ from those of {train.folder} "
                       f"(missing: {', '.join(missing) or 'none'}; not in train: {', '.join(extra) or 'none'}); "
                       "give every split the same class folders")
