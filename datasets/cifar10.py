"""CIFAR-10: 60,000 32x32 colour images in 10 classes, read from the official python-pickle batches.

The archive is downloaded once into ``DATA.CACHE_DIR``. We read the batches ourselves rather than through
torchvision's ``CIFAR10`` class, which md5-checks every batch (so it rejects the small batches the tests
fabricate) and unpickles them with plain ``pickle.load`` (so a tampered file in the cache could run code).
"""

import codecs
import http.client
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import torch

from ptengine.datasets.base import DatasetError, DatasetSplits, TensorSplit, channel_stats, split_train_val

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{number}" for number in range(1, 6)]
TEST_BATCH = "test_batch"
IMAGE_SHAPE = (3, 32, 32)  # each row of a batch is the R plane, then G, then B, each 32x32 row-major
NUM_CLASSES = 10


def build_cifar10(cfg) -> DatasetSplits:
    if cfg.DATA.INPUT_DIM != 3:
        raise DatasetError(f"CIFAR-10 images have 3 channels but DATA.INPUT_DIM is {cfg.DATA.INPUT_DIM}; "
                           "set DATA.INPUT_DIM 3")
    folder = find_or_download(Path(cfg.DATA.CACHE_DIR))
    all_train = read_batches(folder, TRAIN_BATCHES)
    test = read_batches(folder, [TEST_BATCH])
    train, val = split_train_val(all_train, cfg.DATA.VALIDATION_SIZE, cfg.SEED)
    mean, std = channel_stats(train.images)
    return DatasetSplits(train=train, val=val, test=test, mean=mean, std=std, num_classes=NUM_CLASSES,
                         source=CIFAR10_URL)


def find_or_download(cache_dir: Path) -> Path:
    """Return ``cache_dir/cifar-10-batches-py``, downloading and extracting the archive if it is missing."""
    folder = cache_dir / FOLDER_NAME
    if folder.is_dir():
        return folder
    from torchvision.datasets.utils import download_and_extract_archive  # here: a slow import, rarely needed

    try:
        # Reuses an intact archive already in cache_dir, so a hand-downloaded one works offline too.
        download_and_extract_archive(CIFAR10_URL, download_root=str(cache_dir), filename=ARCHIVE_NAME, md5=CIFAR10_MD5)
    except (OSError, RuntimeError, http.client.HTTPException, tarfile.TarError) as error:
        raise DatasetError(
            f"CIFAR-10 was not found in {folder} and the download from {CIFAR10_URL} failed ({_reason(error)}); "
            f"download {ARCHIVE_NAME} yourself and extract it into {cache_dir} so that {folder / TRAIN_BATCHES[0]} "
            f"exists (or set DATA.CACHE_DIR to a folder that already holds {FOLDER_NAME}/)"
        ) from error
    return folder


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.URLError):
        return f"{error.reason}"  # e.g. "[Errno -3] Temporary failure in name resolution", not the whole repr
    if type(error) is RuntimeError:  # torchvision's only RuntimeError: the downloaded file failed its md5 check
        return f"the downloaded {ARCHIVE_NAME} does not match its md5 checksum {CIFAR10_MD5}"
    return f"{type(error).__name__}: {error}"


def read_batches(folder: Path, names: list[str]) -> TensorSplit:
    """Concatenate the named batch files into one uint8 [N, 3, 32, 32] split."""
    batches = [read_batch(folder / name) for name in names]
    images = np.concatenate([images for images, _ in batches])  # a writable copy, which torch wants
    labels = np.concatenate([labels for _, labels in batches])
    return TensorSplit(torch.from_numpy(images).reshape(-1, *IMAGE_SHAPE), torch.from_numpy(labels))


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (uint8 [N, 3072] pixels, int64 [N] labels)."""
    if not path.is_file():
        raise DatasetError(f"the CIFAR-10 batch file {path} is missing; delete the folder {path.parent} so that it "
                           "is downloaded and extracted again, or extract the archive there yourself")
    try:
        with path.open("rb") as file:
            # The official files were pickled by Python 2; "bytes" keeps their str values as bytes.
            batch = CifarUnpickler(file, encoding="bytes").load()
    except Exception as error:  # a damaged pickle can fail in many ways; each means the same to the user
        raise _unreadable(path, f"{type(error).__name__}: {error}") from error
    return _check_batch(batch, path)


def _check_batch(batch, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(batch, dict):
        raise _unreadable(path, f"it holds a {type(batch).__name__}, not a dict")
    # Python 2 files give bytes keys (b"data"), files written by Python 3 code may give str keys.
    entries = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = entries.get("data"), entries.get("labels")
    pixels = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise _unreadable(path, f"'data' is not a uint8 array of shape [N, {pixels}]")
    labels = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else None
    if labels is None or labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise _unreadable(path, f"'labels' is not a list of {len(data)} integers")
    if len(labels) == 0:
        raise _unreadable(path, "it holds no images")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise _unreadable(path, f"it holds labels outside 0..{NUM_CLASSES - 1}")
    return data, labels.astype(np.int64)


def _unreadable(path: Path, reason: str) -> DatasetError:
    return DatasetError(f"cannot read the CIFAR-10 batch file {path} ({reason}); it is corrupt or not a CIFAR-10 "
                        f"python batch: delete the folder {path.parent} so that it is downloaded again")


# numpy's array-rebuilding function, found through public API: numpy 1 calls it
# numpy.core.multiarray._reconstruct, numpy 2 numpy._core.multiarray._reconstruct, and files name either.
_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes (the pixel buffer) at protocol 2
}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, strings, numbers and numpy arrays.

    A plain unpickler imports and calls any global a file names (``os.system`` included); this one refuses
    every global except the few numpy needs to rebuild an array.
    """

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}', which a CIFAR-10 batch never holds")
        return allowed
