"""Checkpoint files: atomic writes, weights-only loads, the newest valid checkpoint, and keep-N pruning."""

import collections
import os
import threading

import pytest
import torch
from torch import nn

from engine.checkpoint import POINTER, Checkpointer, CheckpointError, atomic_write_bytes, load_file, save_file


def state(iteration: int) -> dict:
    return {"iteration": iteration, "model": {"weight": torch.full((2, 2), float(iteration))}}


def saved_names(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_save_leaves_only_the_checkpoint_and_the_pointer(tmp_path):
    path = Checkpointer(tmp_path).save(7, state(7))

    assert path == tmp_path / "checkpoint_00000007.pth"
    assert saved_names(tmp_path) == ["checkpoint_00000007.pth", POINTER]  # no temporary file left behind
    assert (tmp_path / POINTER).read_text() == "checkpoint_00000007.pth"
    assert torch.equal(load_file(path)["model"]["weight"], torch.full((2, 2), 7.0))


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "model.pth"
    save_file({"version": torch.tensor(1)}, target)

    def disk_full(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(CheckpointError, match=r"could not write .*model.pth: No space left on device"):
        save_file({"version": torch.tensor(2)}, target)

    assert saved_names(tmp_path) == ["model.pth"]
    assert load_file(target)["version"] == 1


def test_atomic_write_replaces_the_whole_file(tmp_path):
    target = tmp_path / "note"
    atomic_write_bytes(target, b"first, longer content")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert saved_names(tmp_path) == ["note"]


class NotAWeight:
    pass


def test_loading_refuses_anything_but_weights(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "payload": NotAWeight()}, path)  # would need unpickling a class to load
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*unsafe.pth"):
        load_file(path)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nothing.pth"):
        load_file(tmp_path / "nothing.pth")


def test_a_truncated_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=5)
    for iteration in (10, 20, 30):
        checkpointer.save(iteration, state(iteration))
    newest = tmp_path / "checkpoint_00000030.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    path, loaded = checkpointer.load_newest_valid()
    assert path.name == "checkpoint_00000020.pth"
    assert loaded["iteration"] == 20


def test_the_pointer_names_the_newest_even_when_a_stray_file_sorts_later(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=5)
    checkpointer.save(20, state(20))
    checkpointer.save(10, state(10))  # e.g. a run restarted from iteration 10 in the same folder
    path, loaded = checkpointer.load_newest_valid()
    assert path.name == "checkpoint_00000010.pth" and loaded["iteration"] == 10


def test_no_valid_checkpoint_gives_none(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.load_newest_valid() is None
    (tmp_path / "checkpoint_00000005.pth").write_bytes(b"garbage")
    assert checkpointer.load_newest_valid() is None


def test_only_the_newest_keep_checkpoints_remain(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=2)
    for iteration in range(1, 6):
        checkpointer.save(iteration, state(iteration))
        checkpointer.save_model("model_best.pth", nn.Linear(2, 2))

    assert [p.name for p in checkpointer.checkpoints()] == ["checkpoint_00000004.pth", "checkpoint_00000005.pth"]
    assert (tmp_path / "model_best.pth").is_file()  # named models are not pruned


def test_a_saved_model_is_a_plain_state_dict(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    path = Checkpointer(tmp_path).save_model("model_final.pth", model)
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"0.weight", "0.bias"}
    assert torch.equal(loaded["0.weight"], model[0].weight)


def test_a_disabled_checkpointer_writes_nothing(tmp_path):
    checkpointer = Checkpointer(tmp_path, enabled=False)  # e.g. ranks other than 0
    checkpointer.save(1, state(1))
    checkpointer.save_model("model_final.pth", nn.Linear(2, 2))
    assert saved_names(tmp_path) == []


def test_a_background_save_holds_the_state_of_the_moment_and_lands_after_its_before_write(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    weights = {"weight": torch.zeros(2, 2)}
    release, seen = threading.Event(), []

    def before_write():  # e.g. the MLflow records not yet delivered: on disk before the checkpoint
        seen.append((tmp_path / "checkpoint_00000003.pth").exists())
        release.wait(timeout=30)

    path = checkpointer.save(3, {"iteration": 3, "model": weights}, wait=False, before_write=before_write)
    weights["weight"].fill_(9.0)  # training goes on and changes the weights
    assert not path.exists()  # the writer thread is still held in before_write: the save did not wait for it
    release.set()
    checkpointer.wait()

    assert seen == [False]
    assert torch.equal(load_file(path)["model"]["weight"], torch.zeros(2, 2))  # serialized at save time
    assert (tmp_path / POINTER).read_text() == "checkpoint_00000003.pth"


def test_closing_lets_the_queued_saves_land(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    release = threading.Event()
    held = checkpointer.save(1, {"iteration": 1}, wait=False, before_write=lambda: release.wait(timeout=30))
    queued = checkpointer.save_model("model_final.pth", torch.nn.Linear(2, 2), wait=False)
    threading.Timer(0.2, release.set).start()  # the writer is still held when close() is called
    checkpointer.close()

    assert held.is_file() and queued.is_file()
    assert checkpointer.save(2, {"iteration": 2}).is_file()  # a later save starts a new writer


def test_a_background_save_holds_the_tensors_containers_and_values_of_the_moment(tmp_path):
    """Serialized later, on the writer thread: what it holds must not follow the training (the weights) nor a
    hook (its state may be its own list or dict, which it changes after the save returns)."""
    checkpointer = Checkpointer(tmp_path)
    history, counts = [0.5], collections.OrderedDict(seen=1)
    release = threading.Event()
    checkpointer.save(3, {}, wait=False, before_write=lambda: release.wait(timeout=30))  # holds the writer thread
    weights = torch.zeros(2)
    path = checkpointer.save(4, {"model": weights, "hooks": {"Mine": {"history": history, "counts": counts,
                                                                      "pair": (1, [2])}}},
                             wait=False)  # serialized behind the first one, after the changes below
    weights.fill_(9.0)
    history.append(0.25)
    counts["seen"] = 2
    release.set()
    checkpointer.wait()

    assert torch.equal(load_file(path)["model"], torch.zeros(2))
    saved = load_file(path)["hooks"]["Mine"]
    assert saved == {"history": [0.5], "counts": {"seen": 1}, "pair": (1, [2])}
    assert type(saved["counts"]) is collections.OrderedDict


def test_a_failed_background_write_is_raised_once_by_the_next_check(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, state(1))

    def disk_full(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    checkpointer.save(2, state(2), wait=False)
    with pytest.raises(CheckpointError, match=r"could not write .*checkpoint_00000002.pth: No space left"):
        checkpointer.wait()
    checkpointer.raise_if_failed()  # reported once
    checkpointer.wait()

    assert saved_names(tmp_path) == ["checkpoint_00000001.pth", POINTER]
    assert (tmp_path / POINTER).read_text() == "checkpoint_00000001.pth"


def test_background_saves_land_in_order_and_prune_the_oldest(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=2)
    for iteration in range(1, 6):
        checkpointer.save(iteration, state(iteration), wait=False)
    checkpointer.save_model("model_best.pth", nn.Linear(2, 2), wait=False)
    checkpointer.wait()

    assert saved_names(tmp_path) == ["checkpoint_00000004.pth", "checkpoint_00000005.pth", POINTER, "model_best.pth"]
    assert (tmp_path / POINTER).read_text() == "checkpoint_00000005.pth"


def test_a_save_queued_behind_a_failed_one_is_not_written(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=5)
    checkpointer.save(4, state(4))
    release = threading.Event()

    def full_disk():  # the write of checkpoint 8 fails once checkpoint 12 is queued behind it
        release.wait(60)
        raise CheckpointError("could not write checkpoint_00000008.pth: No space left on device")

    checkpointer.save(8, state(8), wait=False, before_write=full_disk)
    checkpointer.save(12, state(12), wait=False)  # the disk has room again by the time it would be written
    release.set()

    with pytest.raises(CheckpointError, match="No space left on device"):
        checkpointer.wait()
    assert (tmp_path / POINTER).read_text() == "checkpoint_00000004.pth"  # the run stops where it failed
    assert saved_names(tmp_path) == ["checkpoint_00000004.pth", POINTER]
