"""Synthetic noise images: sized by the config and fully determined by SEED."""

import torch

from ptengine.config import load_config
from ptengine.datasets import build_datasets
from ptengine.datasets.base import channel_stats
from ptengine.datasets.synthetic import build_synthetic


def synthetic_config(*opts):
    return load_config(None, ["DATA.DATASET_TYPE", "synthetic", "DATA.SYNTHETIC_SIZE", "40",
                              "DATA.IMAGE_SIZE", "16", *opts])


def test_images_and_labels_follow_the_config():
    splits = build_synthetic(synthetic_config("DATA.INPUT_DIM", "1", "DATA.CLASSES", "['a', 'b', 'c']"))

    assert splits.train.images.shape == (30, 1, 16, 16) and splits.train.images.dtype == torch.uint8
    assert splits.val.images.shape == (10, 1, 16, 16)  # DATA.VALIDATION_SIZE 0.25 of 40
    assert splits.test is None
    assert splits.num_classes == 3
    labels = torch.cat([splits.train.labels, splits.val.labels])
    assert labels.min() >= 0 and labels.max() <= 2
    assert set(labels.tolist()) == {0, 1, 2}  # 40 uniform draws over 3 classes hit every class
    assert (splits.mean, splits.std) == channel_stats(splits.train.images)


def test_the_registry_builds_it_with_the_default_ten_classes():
    splits = build_datasets(synthetic_config())
    assert splits.num_classes == 10
    assert splits.train.images.shape[1:] == (3, 16, 16)


def test_the_same_seed_gives_the_same_data_whatever_the_global_rng_did():
    torch.manual_seed(0)
    first = build_synthetic(synthetic_config("SEED", "7"))
    torch.manual_seed(1)
    torch.rand(100)
    second = build_synthetic(synthetic_config("SEED", "7"))
    other_seed = build_synthetic(synthetic_config("SEED", "8"))

    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.val.labels, second.val.labels)
    assert not torch.equal(first.train.images, other_seed.train.images)
