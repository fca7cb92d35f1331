"""A stop signal that reaches DataLoader workers too (torchrun signals the process group, Slurm every process of
the step, a terminal's Ctrl+C its foreground group): the workers ignore it, and the training process finishes its
step, checkpoints and ends the MLflow run KILLED, as it does with in-memory data."""

import os
import signal
import threading

import psutil
import pytest
import torch
from fault_utils import Training, empty_store, load_weights, runs_of, wait_for, wait_for_log
from PIL import Image
from torch.utils.data import Dataset

from ptengine.datasets.batches import STOP_SIGNALS, LoaderBatches
from ptengine.datasets.transforms import BatchTransform


class SignalledWhileLoading(Dataset):
    """Each item is loaded after its process got SIGINT, SIGTERM and SIGUSR1; its label says which process."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        for signum in STOP_SIGNALS:
            os.kill(os.getpid(), signum)
        return torch.zeros(1, 2, 2, dtype=torch.uint8), os.getpid()


def test_dataloader_workers_survive_the_stop_signals():
    batches = LoaderBatches(SignalledWhileLoading(), 4, BatchTransform([]), "cpu", shuffle=False, seed=0,
                            num_workers=2)
    try:
        for epoch in (0, 1):  # the same (persistent) workers again
            loaded_by = torch.cat([batch.labels for batch in batches.epoch(epoch)])
            assert len(loaded_by) == 8 and os.getpid() not in loaded_by.tolist()
    finally:
        batches.close()  # as a run does at its end (else the garbage collector waits 5 s for each worker)


class KilledWhileLoading(Dataset):
    """The worker that loads item 5 is killed, as the out-of-memory killer or a bus error would."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        if index == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(1, 2, 2, dtype=torch.uint8), index


def test_closing_a_source_whose_worker_was_killed_returns_and_ends_the_other_workers():
    batches = LoaderBatches(KilledWhileLoading(), 4, BatchTransform([]), "cpu", shuffle=False, seed=0, num_workers=2)
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        for _ in batches.epoch(0):
            pass
    closing = threading.Thread(target=batches.close, daemon=True)
    closing.start()
    closing.join(timeout=60)  # a close() that waited for the killed worker would never return
    assert not closing.is_alive()
    wait_for(lambda: not [child for child in psutil.Process().children()
                          if child.name() == "pt_data_worker" and child.status() != psutil.STATUS_ZOMBIE],
             "the other worker to exit")


def image_folder(root, size=32, per_class=24):
    """Two classes of plain-coloured images (simple_cnn takes 32x32) in train/ and val/."""
    for split in ("train", "val"):
        for name, colour in (("cat", (250, 10, 10)), ("dog", (10, 10, 250))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                Image.new("RGB", (size, size), colour).save(folder / f"{index:03d}.png")
    return root


def test_sigterm_to_the_process_group_of_an_image_folder_run_checkpoints_and_ends_killed(tmp_path):
    data, output_dir = image_folder(tmp_path / "images"), tmp_path / "output"
    tracking_uri = empty_store(tmp_path / "store")
    args = ["DATA.DATASET_TYPE", "image_folder", "DATA.ROOT", data, "DATA.CLASSES", "['cat', 'dog']",
            "DATA.IMAGE_SIZE", "32", "DATA.NUM_WORKERS", "2", "TRAIN.BATCH_SIZE", "8", "TRAIN.MAX_EPOCHS", "3",
            "LOG.PERIOD", "1", "LOG.PROGRESS_BAR", "False", "MLFLOW.LOG_MODEL", "False",
            "OUTPUT_DIR", output_dir, "MLFLOW.TRACKING_URI", tracking_uri]
    with Training(args, tmp_path, "image-folder", slow_step=2, slow_steps=[3]) as training:
        wait_for_log(output_dir, "fault: step 3 starts", training)
        training.send(signal.SIGTERM, group=True)  # the training process and its DataLoader workers
        code = training.wait()

    assert code == 130, training.tail(30)
    assert "killed by signal" not in training.stderr
    assert "stopped by SIGTERM at iteration 3" in training.stderr
    assert load_weights(output_dir / (output_dir / "last_checkpoint").read_text())["iteration"] == 3
    assert [run.info.status for run in runs_of(tracking_uri, "images")] == ["KILLED"]  # named after the folder
