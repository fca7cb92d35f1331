"""Dataset registry: ``DATA.DATASET_TYPE`` picks a builder ``cfg -> DatasetSplits``.

Adding a dataset is one new file with a ``build_<name>(cfg)`` function plus one entry below, or, from a file
of your own, ``@DATASET_REGISTRY.register("<name>")`` (engine/registry.py). This folder shares its name with the
Hugging Face ``datasets`` library: it is imported as ``ptengine.datasets`` (see ``tests/test_datasets_name.py``).
"""

from pathlib import Path

from engine.registry import DATASET_REGISTRY
from ptengine.config.defaults import CIFAR10_CLASSES
from ptengine.config.setup import ConfigError
from ptengine.datasets.base import DatasetError, DatasetSplits, TensorSplit
from ptengine.datasets.cifar10 import build_cifar10
from ptengine.datasets.digits import build_digits
from ptengine.datasets.image_folder import build_image_folder, folder_class_names
from ptengine.datasets.synthetic import build_synthetic

DATASET_REGISTRY.update(cifar10=build_cifar10, digits=build_digits, image_folder=build_image_folder,
                        synthetic=build_synthetic)
DATASET_REGISTRY.aliases["cifer10"] = "cifar10"  # the Lightning template's spelling


# DATA.CLASSES left empty: the dataset's own class names, in label order.
OWN_CLASS_NAMES = {
    "cifar10": lambda cfg: list(CIFAR10_CLASSES),
    "digits": lambda cfg: [str(digit) for digit in range(10)],
    "image_folder": lambda cfg: folder_class_names(cfg.DATA.ROOT),
    "synthetic": lambda cfg: [str(label) for label in range(10)],
}


def default_class_names(cfg) -> list[str]:
    """What an empty DATA.CLASSES means for ``cfg``'s dataset; a dataset of the user's must be given its names."""
    name = DATASET_REGISTRY.aliases.get(cfg.DATA.DATASET_TYPE, cfg.DATA.DATASET_TYPE)
    DATASET_REGISTRY.lookup(name)  # an unknown name is reported as that, not as missing class names
    if name not in OWN_CLASS_NAMES:
        raise ConfigError(f"DATA.CLASSES is empty and the {name} dataset does not name its classes; list them in "
                          "label order, e.g. DATA.CLASSES \"['cat', 'dog']\"")
    return OWN_CLASS_NAMES[name](cfg)


def data_name(cfg) -> str:
    """A short name for what is trained on: the dataset's, or an image folder's own (``~/data/flowers`` -> flowers)."""
    name = DATASET_REGISTRY.aliases.get(cfg.DATA.DATASET_TYPE, cfg.DATA.DATASET_TYPE)
    if name == "image_folder" and cfg.DATA.ROOT:
        return Path(cfg.DATA.ROOT).expanduser().resolve().name or name
    return name


def build_datasets(cfg) -> DatasetSplits:
    name = DATASET_REGISTRY.aliases.get(cfg.DATA.DATASET_TYPE, cfg.DATA.DATASET_TYPE)
    splits = DATASET_REGISTRY.lookup(name)(cfg)
    if splits.num_classes != len(cfg.DATA.CLASSES):
        raise DatasetError(f"the {name} dataset has {splits.num_classes} classes but DATA.CLASSES names "
                           f"{len(cfg.DATA.CLASSES)}; list {splits.num_classes} class names in DATA.CLASSES")
    return splits


__all__ = ["DATASET_REGISTRY", "DatasetError", "DatasetSplits", "TensorSplit", "build_datasets", "data_name",
           "default_class_names"]
