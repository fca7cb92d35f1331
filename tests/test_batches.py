"""The batch plan: one permutation per (SEED, epoch), cut into global batches shared out over ranks.

Labels here are the sample indices, so a batch's labels say exactly which samples it holds.
"""

import pytest
import torch
from torch.utils.data import Dataset

from ptengine.datasets.base import TensorSplit
from ptengine.datasets.batches import InMemoryBatches, apply_once, build_batches, epoch_order
from ptengine.datasets.transforms import BatchTransform, Normalize, RandomCrop, RandomHorizontalFlip, ToTensor

NUM_SAMPLES = 50


def indexed_split(num_samples=NUM_SAMPLES) -> TensorSplit:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (num_samples, 3, 8, 8), dtype=torch.uint8, generator=generator)
    return TensorSplit(images, torch.arange(num_samples))


def random_transform(seed=5) -> BatchTransform:
    return BatchTransform([RandomCrop(seed), RandomHorizontalFlip(seed), ToTensor()])


def source(batch_size=8, rank=0, world_size=1, shuffle=True, split=None) -> InMemoryBatches:
    return InMemoryBatches(split or indexed_split(), batch_size, random_transform(), "cpu", shuffle=shuffle, seed=7,
                           rank=rank, world_size=world_size)


@pytest.mark.parametrize("world_size, batch_size", [(2, 8), (3, 8), (4, 12), (3, 2)])
def test_what_all_ranks_see_together_is_what_one_process_sees(world_size, batch_size):
    for epoch in (0, 1):
        single = list(source(batch_size).epoch(epoch))
        per_rank = [list(source(batch_size, rank, world_size).epoch(epoch)) for rank in range(world_size)]

        assert all(len(batches) == len(single) for batches in per_rank)
        for index, whole in enumerate(single):
            parts = [batches[index] for batches in per_rank]
            assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
            assert torch.equal(torch.cat([p.images for p in parts]), whole.images)  # same crops and flips too
            assert all(p.global_size == whole.global_size == len(whole.labels) for p in parts)


def test_an_epoch_covers_every_sample_once_in_full_batches_but_the_last():
    batches = list(source(batch_size=8).epoch(0))
    assert [len(b.labels) for b in batches] == [8] * 6 + [2]
    assert len(source(batch_size=8)) == 7
    assert sorted(torch.cat([b.labels for b in batches]).tolist()) == list(range(NUM_SAMPLES))
    assert [source(batch_size=8).global_batch_size(i) for i in range(7)] == [8] * 6 + [2]


def test_the_order_is_fixed_by_seed_and_epoch():
    assert torch.equal(epoch_order(100, seed=7, epoch=2, shuffle=True), epoch_order(100, seed=7, epoch=2, shuffle=True))
    assert not torch.equal(epoch_order(100, 7, 2, True), epoch_order(100, 7, 3, True))
    assert not torch.equal(epoch_order(100, 7, 2, True), epoch_order(100, 8, 2, True))
    assert torch.equal(epoch_order(100, 7, 2, shuffle=False), torch.arange(100))

    torch.manual_seed(0)
    first = [b.labels for b in source().epoch(4)]
    torch.manual_seed(1)  # the global RNG plays no part
    assert all(torch.equal(a, b.labels) for a, b in zip(first, source().epoch(4), strict=True))


def test_evaluation_order_is_the_dataset_order():
    batches = list(source(batch_size=16, shuffle=False).epoch(3))
    assert torch.equal(torch.cat([b.labels for b in batches]), torch.arange(NUM_SAMPLES))


def test_starting_mid_epoch_skips_exactly_the_batches_already_done():
    whole = list(source().epoch(2))
    rest = list(source().epoch(2, start=4))
    assert len(rest) == len(whole) - 4
    for a, b in zip(whole[4:], rest, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


class IndexedImages(Dataset):
    """A folder-like dataset: (uint8 [C, H, W], label) items, read one at a time."""

    def __init__(self, split: TensorSplit):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        return self.split.images[index], int(self.split.labels[index])


def test_a_dataset_read_through_a_dataloader_follows_the_same_plan():
    split = indexed_split()
    in_memory = build_batches(split, 8, random_transform(), "cpu", shuffle=True, seed=7, rank=1, world_size=2)
    loaded = build_batches(IndexedImages(split), 8, random_transform(), "cpu", shuffle=True, seed=7, num_workers=0,
                           rank=1, world_size=2)

    assert type(in_memory) is not type(loaded)
    for a, b in zip(in_memory.epoch(1), loaded.epoch(1), strict=True):
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images)
        assert a.global_size == b.global_size


@pytest.mark.parametrize("steps", [
    lambda: [ToTensor(), Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])],  # all deterministic: done once
    lambda: [ToTensor(), RandomCrop(5), Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])],  # to_tensor done once
    lambda: [RandomCrop(5), RandomHorizontalFlip(5), ToTensor(), Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])],
])
def test_pretransforming_the_split_once_gives_the_same_batches_bit_for_bit(steps):
    split = indexed_split(NUM_SAMPLES)
    once = InMemoryBatches(split, 8, BatchTransform(steps()), "cpu", shuffle=True, seed=7, pretransform=True)
    every_batch = InMemoryBatches(split, 8, BatchTransform(steps()), "cpu", shuffle=True, seed=7, pretransform=False)

    for epoch in (0, 1):
        for a, b in zip(once.epoch(epoch), every_batch.epoch(epoch), strict=True):
            assert a.images.dtype == b.images.dtype == torch.float32
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_pretransform_moves_pointwise_steps_before_crops_and_flips_and_pads_with_what_zero_becomes():
    split = indexed_split(NUM_SAMPLES)
    normalized = InMemoryBatches(split, 8, BatchTransform([ToTensor()]), "cpu", shuffle=False, seed=7)
    augmented = InMemoryBatches(split, 8, BatchTransform([RandomCrop(5), RandomHorizontalFlip(5), ToTensor(),
                                                          Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.5])]),
                                "cpu", shuffle=True, seed=7)
    only_moved = InMemoryBatches(split, 8, BatchTransform([RandomCrop(5), RandomHorizontalFlip(5)]), "cpu",
                                 shuffle=True, seed=7)

    assert normalized.images.dtype == torch.float32 and normalized.transform.steps == []
    assert torch.equal(normalized.images, split.images.float() / 255)
    assert augmented.images.dtype == torch.float32  # normalized once; the crop pads with (0 - mean) / std
    (remap_step,) = augmented.transform.steps
    assert torch.equal(remap_step.fill.flatten(), torch.tensor([-2.5, -1.6, -0.6]))
    assert only_moved.images.dtype == torch.uint8  # nothing to do once


def test_pretransform_works_through_a_split_larger_than_one_chunk():
    images = torch.arange(10 * 3 * 2 * 2, dtype=torch.float32).view(10, 3, 2, 2)
    doubled = apply_once(BatchTransform([Doubler()]), images, chunk=3)
    assert torch.equal(doubled, images * 2)


class Doubler:
    random = False

    def __call__(self, images, indices, epoch):
        return images * 2
