"""CIFAR-10 from the official python-pickle batches: format, split, download and safety.

Every test fabricates tiny batches (20 images each) in the real format, so nothing touches the network.
"""

import functools
import hashlib
import http.server
import os
import pickle
import socket
import struct
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import ptengine.datasets.cifar10 as cifar10
from ptengine.config import load_config
from ptengine.datasets import DatasetError, build_datasets

IMAGES_PER_BATCH = 20
BATCH_NAMES = [*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH]


def make_batch(first_id: int, seed: int) -> dict:
    """A batch like the official ones: image i carries its id in pixel 0 so tests can follow it."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(IMAGES_PER_BATCH, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(first_id, first_id + IMAGES_PER_BATCH)
    labels = [int(label) for label in rng.integers(0, 10, size=IMAGES_PER_BATCH)]
    return {b"batch_label": b"fabricated", b"labels": labels, b"data": data,
            b"filenames": [f"image_{i}.png".encode() for i in range(IMAGES_PER_BATCH)]}


def dump_protocol_2(batch: dict, file) -> None:
    pickle.dump(batch, file, protocol=2)  # the protocol of the official files


def write_batches(cache_dir: Path, dump=dump_protocol_2) -> dict[str, dict]:
    """Write data_batch_1..5 and test_batch into cache_dir/cifar-10-batches-py; return them by name."""
    folder = cache_dir / cifar10.FOLDER_NAME
    folder.mkdir(parents=True)
    batches = {name: make_batch(first_id=20 * index, seed=index) for index, name in enumerate(BATCH_NAMES)}
    for name, batch in batches.items():
        with (folder / name).open("wb") as file:
            dump(batch, file)
    return batches


def cifar_config(cache_dir: Path, *opts):
    return load_config(None, ["DATA.DATASET_TYPE", "cifar10", "DATA.CACHE_DIR", str(cache_dir), *opts])


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{cifar10.ARCHIVE_NAME}"  # nothing listens there once the probe closes


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Point the download at a closed local port and ignore proxies: no test may reach the internet."""
    monkeypatch.setattr(cifar10, "CIFAR10_URL", closed_port_url())
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_batches_become_uint8_splits_with_a_test_split(tmp_path):
    batches = write_batches(tmp_path)
    splits = cifar10.build_cifar10(cifar_config(tmp_path))

    assert splits.train.images.shape == (75, 3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert splits.val.images.shape == (25, 3, 32, 32)  # DATA.VALIDATION_SIZE 0.25 of the 100 training images
    assert splits.num_classes == 10
    test_batch = batches["test_batch"]
    assert torch.equal(splits.test.images.reshape(20, -1), torch.from_numpy(test_batch[b"data"]))
    assert splits.test.labels.tolist() == test_batch[b"labels"]
    assert splits.test.labels.dtype == torch.int64
    assert (splits.mean, splits.std) == cifar10.channel_stats(splits.train.images)


def test_each_row_is_the_red_then_green_then_blue_plane(tmp_path):
    batches = write_batches(tmp_path)
    red = np.arange(1024, dtype=np.uint8).reshape(32, 32)  # values wrap every 256, distinct per row position
    first_test_image = np.concatenate([red.ravel(), np.full(1024, 7, np.uint8), np.full(1024, 9, np.uint8)])
    batches["test_batch"][b"data"][0] = first_test_image
    with (tmp_path / cifar10.FOLDER_NAME / "test_batch").open("wb") as file:
        dump_protocol_2(batches["test_batch"], file)

    image = cifar10.build_cifar10(cifar_config(tmp_path)).test.images[0]

    assert torch.equal(image[0], torch.from_numpy(red))
    assert image[0, 1, 0].item() == 32  # row 1, column 0 is the 33rd value of the red plane
    assert (image[1] == 7).all() and (image[2] == 9).all()


def test_train_and_val_partition_the_five_batches_in_order_with_matching_labels(tmp_path):
    batches = write_batches(tmp_path)
    all_labels = [label for name in cifar10.TRAIN_BATCHES for label in batches[name][b"labels"]]
    splits = cifar10.build_cifar10(cifar_config(tmp_path))

    train_ids, val_ids = splits.train.images[:, 0, 0, 0].tolist(), splits.val.images[:, 0, 0, 0].tolist()
    assert sorted(train_ids + val_ids) == list(range(100))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)
    assert splits.train.labels.tolist() == [all_labels[i] for i in train_ids]
    assert splits.val.labels.tolist() == [all_labels[i] for i in val_ids]


def test_the_split_depends_on_the_seed_only(tmp_path):
    write_batches(tmp_path)

    def val_ids(seed):
        return cifar10.build_cifar10(cifar_config(tmp_path, "SEED", str(seed))).val.images[:, 0, 0, 0].tolist()

    assert val_ids(1) == val_ids(1)
    assert val_ids(1) != val_ids(2)


def test_str_keys_are_accepted_too(tmp_path):
    def dump_with_str_keys(batch, file):
        pickle.dump({key.decode(): value for key, value in batch.items()}, file, protocol=2)

    write_batches(tmp_path, dump=dump_with_str_keys)
    assert len(cifar10.build_cifar10(cifar_config(tmp_path)).test) == 20


_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]


class Python2StylePickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official files: str as BINSTRING, numpy.core names."""

    dispatch = dict(pickle._Pickler.dispatch)
    global_names = {_RECONSTRUCT: b"numpy.core.multiarray\n_reconstruct\n",
                    np.ndarray: b"numpy\nndarray\n", np.dtype: b"numpy\ndtype\n"}

    def save_python2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("ascii")
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[bytes] = save_python2_str
    dispatch[str] = save_python2_str

    def save_global(self, obj, name=None):
        self.write(pickle.GLOBAL + self.global_names[obj])
        self.memoize(obj)


def test_files_pickled_by_python2_are_read(tmp_path):
    def dump_like_python2(batch, file):
        Python2StylePickler(file, protocol=2).dump(batch)

    batches = write_batches(tmp_path, dump=dump_like_python2)
    blob = (tmp_path / cifar10.FOLDER_NAME / "test_batch").read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in blob and b"_codecs" not in blob

    splits = cifar10.build_cifar10(cifar_config(tmp_path))
    assert torch.equal(splits.test.images.reshape(20, -1), torch.from_numpy(batches["test_batch"][b"data"]))


def test_the_cifer10_alias_reaches_the_same_builder(tmp_path):
    write_batches(tmp_path)
    cfg = load_config(None, ["DATA.DATASET_TYPE", "cifer10", "DATA.CACHE_DIR", str(tmp_path)])
    assert len(build_datasets(cfg).test) == 20


def test_grey_input_dim_is_refused_with_the_fix(tmp_path):
    write_batches(tmp_path)
    with pytest.raises(DatasetError, match="set DATA.INPUT_DIM 3"):
        cifar10.build_cifar10(cifar_config(tmp_path, "DATA.INPUT_DIM", "1"))


def test_a_missing_batch_file_is_named(tmp_path):
    write_batches(tmp_path)
    (tmp_path / cifar10.FOLDER_NAME / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3 is missing"):
        cifar10.build_cifar10(cifar_config(tmp_path))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_batch"])
def test_a_damaged_batch_file_is_named(tmp_path, damage):
    write_batches(tmp_path)
    path = tmp_path / cifar10.FOLDER_NAME / "data_batch_2"
    if damage == "garbage":
        path.write_bytes(b"this is not a pickle")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(pickle.dumps({b"data": [1, 2, 3]}, protocol=2))
    with pytest.raises(DatasetError, match=r"cannot read the CIFAR-10 batch file .*data_batch_2"):
        cifar10.build_cifar10(cifar_config(tmp_path))


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    batches = write_batches(tmp_path)
    marker = tmp_path / "code_ran"
    batches["data_batch_1"][b"batch_label"] = RunsCodeWhenUnpickled(marker)
    with (tmp_path / cifar10.FOLDER_NAME / "data_batch_1").open("wb") as file:
        dump_protocol_2(batches["data_batch_1"], file)

    with pytest.raises(DatasetError, match=r"data_batch_1 .*refusing to load '(posix|os)\.system'"):
        cifar10.build_cifar10(cifar_config(tmp_path))
    assert not marker.exists()


# --- download ---------------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve_folder(folder: Path):
    """An HTTP server on 127.0.0.1 for the files of ``folder``; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def make_archive(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """A real cifar-10-python.tar.gz (holding cifar-10-batches-py/...) in tmp_path/served."""
    batches = write_batches(tmp_path / "source")
    served = tmp_path / "served"
    served.mkdir()
    archive = served / cifar10.ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "source" / cifar10.FOLDER_NAME, arcname=cifar10.FOLDER_NAME)
    return archive, batches


def test_a_missing_dataset_is_downloaded_extracted_and_read(tmp_path, monkeypatch):
    archive, batches = make_archive(tmp_path)
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    with serve_folder(archive.parent) as base_url:
        monkeypatch.setattr(cifar10, "CIFAR10_URL", f"{base_url}/{cifar10.ARCHIVE_NAME}")
        splits = cifar10.build_cifar10(cifar_config(cache_dir))

    assert (cache_dir / cifar10.ARCHIVE_NAME).read_bytes() == archive.read_bytes()
    assert (cache_dir / cifar10.FOLDER_NAME / "data_batch_5").is_file()
    assert torch.equal(splits.test.images.reshape(20, -1), torch.from_numpy(batches["test_batch"][b"data"]))


def test_a_download_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    archive, _ = make_archive(tmp_path)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", "0" * 32)
    with serve_folder(archive.parent) as base_url:
        monkeypatch.setattr(cifar10, "CIFAR10_URL", f"{base_url}/{cifar10.ARCHIVE_NAME}")
        with pytest.raises(DatasetError, match="does not match its md5 checksum"):
            cifar10.build_cifar10(cifar_config(tmp_path / "cache"))
    assert not (tmp_path / "cache" / cifar10.FOLDER_NAME).exists()


def test_no_files_and_no_network_gives_one_message_with_the_fix(tmp_path):
    cache_dir = tmp_path / "cache"
    with pytest.raises(DatasetError) as raised:
        cifar10.build_cifar10(cifar_config(cache_dir))

    message = str(raised.value)
    assert f"CIFAR-10 was not found in {cache_dir / cifar10.FOLDER_NAME}" in message
    assert f"the download from {cifar10.CIFAR10_URL} failed" in message
    assert "refused" in message.lower()  # the short reason: nothing listens on the port
    assert f"extract it into {cache_dir} so that {cache_dir / cifar10.FOLDER_NAME / 'data_batch_1'} exists" in message
    assert "\n" not in message
