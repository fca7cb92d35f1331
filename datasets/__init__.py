"""Dataset registry: ``DATA.DATASET_TYPE`` picks a builder ``cfg -> DatasetSplits``.

Adding a dataset is one new file with a ``build_<name>(cfg)`` function plus one entry below.
This package shares its name with the Hugging Face ``datasets`` library; see ``tests/test_datasets_name.py``.
"""

from ptengine.config.registry import Registry
from ptengine.datasets.base import DatasetError, DatasetSplits, TensorSplit
from ptengine.datasets.cifar10 import build_cifar10
from ptengine.datasets.digits import build_digits
from ptengine.datasets.image_folder import build_image_folder
from ptengine.datasets.synthetic import build_synthetic

DATASET_REGISTRY = Registry("DATA.DATASET_TYPE", {
    "cifar10": build_cifar10,
    "digits": build_digits,
    "image_folder": build_image_folder,
    "synthetic": build_synthetic,
}, aliases={"cifer10": "cifar10"})  # the Lightning template's spelling


def build_datasets(cfg) -> DatasetSplits:
    name = DATASET_REGISTRY.aliases.get(cfg.DATA.DATASET_TYPE, cfg.DATA.DATASET_TYPE)
    splits = DATASET_REGISTRY.lookup(name)(cfg)
    if splits.num_classes != len(cfg.DATA.CLASSES):
        raise DatasetError(f"the {name} dataset has {splits.num_classes} classes but DATA.CLASSES names "
                           f"{len(cfg.DATA.CLASSES)}; list {splits.num_classes} class names in DATA.CLASSES")
    return splits


__all__ = ["DATASET_REGISTRY", "DatasetError", "DatasetSplits", "TensorSplit", "build_datasets"]
