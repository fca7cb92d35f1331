"""Batch transforms: exact values of to_tensor/normalize, and random crop/flip keyed by (seed, epoch, sample).

A transform is called as ``transform(images uint8 [B, C, H, W], sample indices [B], epoch)``.
"""

import pytest
import torch

from ptengine.config import ConfigError
from ptengine.datasets.transforms import (
    PAD,
    BatchTransform,
    RandomCrop,
    RandomHorizontalFlip,
    ToTensor,
    build_transform,
    remap,
)

MEAN, STD = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)


def random_images(count=64, size=8, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def build(names, train=True, seed=11):
    return build_transform(names, MEAN, STD, seed=seed, train=train)


def test_to_tensor_scales_uint8_to_the_unit_interval():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = build(["to_tensor"])(images, torch.tensor([0]), epoch=0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.2, 1.0]))


def test_normalize_subtracts_the_mean_and_divides_by_the_std_per_channel():
    images = torch.full((2, 3, 2, 2), 102, dtype=torch.uint8)  # 0.4 in every channel
    out = build(["to_tensor", "normalize"])(images, torch.arange(2), epoch=0)
    expected = [(0.4 - m) / s for m, s in zip(MEAN, STD, strict=True)]  # 0.3, -0.4, -2.8
    torch.testing.assert_close(out[:, :, 0, 0], torch.tensor([expected, expected]))
    torch.testing.assert_close(build(["normalize"])(images, torch.arange(2), 0), out)  # to_tensor is implied


def test_evaluation_drops_the_random_steps():
    images, indices = random_images(), torch.arange(64)
    names = ["random_crop", "random_horizontal_flip", "to_tensor", "normalize"]
    for_evaluation = build(names, train=False)(images, indices, 0)
    assert torch.equal(for_evaluation, build(["to_tensor", "normalize"])(images, indices, 0))
    assert not torch.equal(build(names, train=True)(images, indices, 0), for_evaluation)


def test_an_unknown_transform_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="unknown DATA.TRANSFORM_LIST 'random_rotate'; choose one of normalize, "):
        build(["to_tensor", "random_rotate"])


def crop_offsets(original: torch.Tensor, cropped: torch.Tensor) -> tuple[int, int]:
    """The (y, x) offset in the zero-padded image that ``cropped`` was cut from."""
    padded = torch.nn.functional.pad(original, (PAD, PAD, PAD, PAD))
    size = original.shape[-1]
    matches = [(y, x) for y in range(2 * PAD + 1) for x in range(2 * PAD + 1)
               if torch.equal(padded[:, y:y + size, x:x + size], cropped)]
    assert len(matches) == 1
    return matches[0]


def test_random_crop_cuts_a_window_of_the_padded_image_at_varied_offsets():
    images = random_images(count=200, size=12)
    cropped = RandomCrop(seed=1)(images, torch.arange(200), epoch=0)
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8

    offsets = [crop_offsets(image, crop) for image, crop in zip(images, cropped, strict=True)]
    assert {y for y, _ in offsets} == set(range(2 * PAD + 1))
    assert {x for _, x in offsets} == set(range(2 * PAD + 1))


def test_random_flip_mirrors_about_half_of_the_images():
    images = random_images(count=400)
    flipped = RandomHorizontalFlip(seed=1)(images, torch.arange(400), epoch=0)
    mirrored = [torch.equal(out, image.flip(-1)) for image, out in zip(images, flipped, strict=True)]
    unchanged = [torch.equal(out, image) for image, out in zip(images, flipped, strict=True)]
    assert all(m != u for m, u in zip(mirrored, unchanged, strict=True))  # each image is one or the other
    assert 150 < sum(mirrored) < 250


@pytest.mark.parametrize("name", ["random_crop", "random_horizontal_flip"])
def test_random_steps_depend_on_seed_epoch_and_sample_index_only(name):
    images, indices = random_images(count=64), torch.arange(100, 164)
    transform = build([name])
    reference = transform(images, indices, epoch=3)

    # The same samples in another order and in other batch sizes get exactly the same result.
    order = torch.randperm(64, generator=torch.Generator().manual_seed(9))
    shuffled = torch.cat([transform(images[part], indices[part], epoch=3) for part in order.split(5)])
    assert torch.equal(shuffled, reference[order])
    assert torch.equal(build([name])(images, indices, epoch=3), reference)  # a fresh transform agrees

    assert not torch.equal(transform(images, indices, epoch=4), reference)
    assert not torch.equal(build([name], seed=12)(images, indices, epoch=3), reference)
    assert not torch.equal(transform(images, indices + 1, epoch=3), reference)


def test_the_global_rng_plays_no_part():
    images, indices = random_images(), torch.arange(64)
    transform = build(["random_crop", "random_horizontal_flip", "to_tensor"])
    torch.manual_seed(0)
    first = transform(images, indices, epoch=1)
    torch.manual_seed(1)
    assert torch.equal(transform(images, indices, epoch=1), first)


def test_to_tensor_leaves_float_images_alone():
    images = torch.rand(2, 3, 4, 4)
    assert torch.equal(ToTensor()(images, torch.arange(2), 0), images)


@pytest.mark.parametrize("names", [
    ["random_crop", "random_horizontal_flip"],
    ["random_horizontal_flip", "random_crop"],
    ["random_crop", "random_crop"],  # a crop of a crop: zeros of the first padding can move inwards
])
def test_consecutive_crops_and_flips_run_as_one_gather_with_the_same_result(names):
    images, indices = random_images(count=32, size=10), torch.arange(32)
    fused = BatchTransform([build([name]).steps[0] for name in names])
    assert len(fused._fused) == 1  # one remap step for the whole run of crops and flips

    one_by_one = images
    for name in names:
        one_by_one = build([name])(one_by_one, indices, epoch=2).to(torch.uint8)
    assert torch.equal(fused(images, indices, epoch=2), one_by_one.float())


def test_remap_fills_coordinates_outside_the_image_with_zeros():
    images = torch.arange(1, 2 * 9 + 1, dtype=torch.float32).view(1, 2, 3, 3)
    rows = torch.tensor([[-1, 0, 2]])
    columns = torch.tensor([[2, 3, 1]])
    expected = torch.tensor([[[0.0, 0, 0], [3, 0, 2], [9, 0, 8]], [[0, 0, 0], [12, 0, 11], [18, 0, 17]]])
    assert torch.equal(remap(images, rows, columns), expected[None])
