"""User images in the ImageFolder layout: ROOT/train/<class>/*.png, ROOT/val/..., optional ROOT/test/."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ptengine.config import load_config
from ptengine.datasets import DatasetError, build_datasets
from ptengine.datasets.image_folder import IMAGENET_MEAN, IMAGENET_STD, build_image_folder

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}  # one plain colour per class, so resizing keeps it exact
SIZES = [(20, 20), (40, 24), (9, 13)]  # different sizes and aspect ratios: every image is resized


def make_split(root: Path, split: str, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", SIZES[index % len(SIZES)], COLOURS[name]).save(folder / f"{index:04d}.png")


def make_dataset(root: Path, test: bool = False) -> Path:
    make_split(root, "train", {"cat": 3, "dog": 2})
    make_split(root, "val", {"cat": 1, "dog": 1})
    if test:
        make_split(root, "test", {"cat": 1, "dog": 2})
    return root


def folder_config(root, *opts):
    return load_config(None, ["DATA.DATASET_TYPE", "image_folder", "DATA.ROOT", str(root), "DATA.IMAGE_SIZE", "16",
                              "DATA.CLASSES", "['cat', 'dog']", *opts])


def test_items_are_resized_uint8_images_with_sorted_class_labels(tmp_path):
    splits = build_image_folder(folder_config(make_dataset(tmp_path)))

    assert splits.train.classes == ["cat", "dog"]
    assert (len(splits.train), len(splits.val), splits.test) == (5, 2, None)
    assert splits.num_classes == 2
    items = [splits.train[index] for index in range(len(splits.train))]
    assert [label for _, label in items] == [0, 0, 0, 1, 1]
    for image, label in items:
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
        expected = torch.tensor(COLOURS[splits.train.classes[label]], dtype=torch.uint8)
        assert torch.equal(image, expected.view(3, 1, 1).expand(3, 16, 16))
    assert (splits.mean, splits.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_grey_input_gives_one_channel(tmp_path):
    splits = build_image_folder(folder_config(make_dataset(tmp_path), "DATA.INPUT_DIM", "1"))
    image, label = splits.val[0]
    assert (image.shape, label) == ((1, 16, 16), 0)
    assert (image == 76).all()  # pure red in PIL's "L" mode: 0.299 * 255
    assert (splits.mean, splits.std) == ((0.5,), (0.25,))


def test_an_optional_test_folder_becomes_the_test_split(tmp_path):
    splits = build_datasets(folder_config(make_dataset(tmp_path, test=True)))
    assert [label for _, label in splits.test] == [0, 1, 1]


def test_items_batch_through_a_dataloader(tmp_path):
    splits = build_image_folder(folder_config(make_dataset(tmp_path)))
    images, labels = next(iter(DataLoader(splits.train, batch_size=5)))
    assert images.shape == (5, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1]


def test_an_empty_root_says_to_set_it():
    with pytest.raises(DatasetError, match="DATA.ROOT is empty"):
        build_image_folder(folder_config(""))


def test_a_missing_root_is_named(tmp_path):
    with pytest.raises(DatasetError, match=f"DATA.ROOT {tmp_path / 'nowhere'} is not a folder"):
        build_image_folder(folder_config(tmp_path / "nowhere"))


def test_a_missing_val_folder_is_named(tmp_path):
    make_split(tmp_path, "train", {"cat": 1, "dog": 1})
    with pytest.raises(DatasetError, match=f"{tmp_path / 'val'} is missing"):
        build_image_folder(folder_config(tmp_path))


def test_a_class_folder_without_images_is_reported(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    with pytest.raises(DatasetError, match=r"no images found in .*train: .*bird"):
        build_image_folder(folder_config(tmp_path))


def test_images_without_class_folders_are_reported(tmp_path):
    make_split(tmp_path, "train", {"cat": 1, "dog": 1})
    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "cat.png")  # loose in val/, not in val/cat/
    with pytest.raises(DatasetError, match=r"no images found in .*val: Couldn't find any class folder.*per class"):
        build_image_folder(folder_config(tmp_path))


def test_val_classes_must_match_train_classes(tmp_path):
    make_split(tmp_path, "train", {"cat": 1, "dog": 1})
    make_split(tmp_path, "val", {"cat": 1})
    with pytest.raises(DatasetError, match="missing: dog; not in train: none"):
        build_image_folder(folder_config(tmp_path))


@pytest.mark.parametrize("classes", ["['dog', 'cat']", "['cat', 'cow']", "['cat', 'dog', 'bird']", "['Cat', 'Dog']"])
def test_class_names_must_be_the_folder_names_in_sorted_order(tmp_path, classes):
    make_dataset(tmp_path)
    expected = (f"DATA.CLASSES {classes} does not match the class folders of {tmp_path / 'train'}, which define the "
                "labels in sorted order: ['cat', 'dog']; set DATA.CLASSES \"['cat', 'dog']\"")
    cfg = folder_config(tmp_path, "DATA.CLASSES", classes)
    with pytest.raises(DatasetError) as raised:
        build_datasets(cfg)
    assert str(raised.value) == expected


def test_an_input_dim_other_than_1_or_3_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="set DATA.INPUT_DIM 3 or 1"):
        build_image_folder(folder_config(make_dataset(tmp_path), "DATA.INPUT_DIM", "2"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_unreadable_image_is_named_with_the_fix(tmp_path, damage):
    splits = build_image_folder(folder_config(make_dataset(tmp_path)))
    path = tmp_path / "train" / "dog" / "0001.png"
    content = b"not an image at all" if damage == "garbage" else path.read_bytes()[:60]
    path.write_bytes(content)

    with pytest.raises(DatasetError, match=f"cannot read the image {path} .*remove or replace the file"):
        splits.train[4]


def test_an_unreadable_image_error_survives_a_dataloader_worker(tmp_path):
    splits = build_image_folder(folder_config(make_dataset(tmp_path)))
    path = tmp_path / "train" / "cat" / "0000.png"
    path.write_bytes(b"garbage")

    with pytest.raises(DatasetError, match=f"cannot read the image {path}"):
        list(DataLoader(splits.train, batch_size=2, num_workers=1))
