"""Crash a training as often as you like: ``--resume`` ends with the same model and the same MLflow run.

One run of ``config/digits.yaml`` (3 epochs, a checkpoint every 4 iterations, the recipe on: an EMA of the
weights, label smoothing, mixup and cutmix) is killed with SIGKILL at five
different moments: before its first checkpoint, mid-epoch, in the middle of writing a checkpoint, and between
the periodic and the epoch-end checkpoint of an epoch's last iteration. After each kill the same command plus
``--resume`` continues it. The final ``model_final.pth`` and the EMA state must equal, bit for bit, those of an
uninterrupted run (the shared reference run of fault_utils), and the one MLflow run must hold every step once,
with the uninterrupted run's values.
"""

import random
import re
import shutil
import time

import pytest
import torch
from conftest import isolated_training
from fault_utils import (
    ITERS_PER_EPOCH,
    MAX_ITER,
    Training,
    assert_same_weights,
    empty_store,
    load_weights,
    log_size,
    log_text,
    metric_history,
    mlflow_client,
    runs_of,
    shared_reference_run,
    small_run_args,
    sqlite_uri,
    wait_for,
    wait_for_log,
)

from ptengine.tools.train_net import main

EPOCH_ENDS = [ITERS_PER_EPOCH, 2 * ITERS_PER_EPOCH, MAX_ITER]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (started in the background; ``.result()`` waits for it)."""
    return shared_reference_run(tmp_path_factory)


class CrashedRun:
    """One OUTPUT_DIR trained by a chain of processes: each is started with the same command (plus --resume
    after the first) and killed, until the last one finishes. ``logs[i]`` is what process i logged."""

    def __init__(self, workdir):
        self.workdir, self.output_dir, self.tracking_uri = workdir, workdir / "output", empty_store(workdir / "store")
        self.processes: list[Training] = []
        self.logs: list[str] = []
        self.newest_at_kill: list[str | None] = []  # the newest checkpoint when each kill came
        self.notes: dict = {}

    def start(self, **faults) -> Training:
        resume = ["--resume"] if self.processes else []
        self._log_start = log_size(self.output_dir)
        training = Training(small_run_args(self.output_dir, self.tracking_uri, *resume), self.workdir,
                            f"process-{len(self.processes) + 1}", **faults).start()
        self.processes.append(training)
        return training

    def wait_for_log(self, text: str) -> None:
        wait_for_log(self.output_dir, text, self.processes[-1], self._log_start)

    def kill_after(self, seconds: float) -> None:
        time.sleep(seconds)
        self.processes[-1].kill()
        assert self.processes[-1].poll() == -9, "the process ended before it could be killed"
        self.logs.append(log_text(self.output_dir)[self._log_start:])
        pointer = self.output_dir / "last_checkpoint"
        self.newest_at_kill.append(pointer.read_text() if pointer.is_file() else None)

    def finish(self) -> None:
        code = self.processes[-1].wait()
        self.logs.append(log_text(self.output_dir)[self._log_start:])
        assert code == 0, self.processes[-1].tail()

    def files(self) -> list[str]:
        return sorted(path.name for path in self.output_dir.iterdir())

    def pointer(self) -> str:
        return (self.output_dir / "last_checkpoint").read_text()

    def stop(self) -> None:
        for process in self.processes:
            process.kill()


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, reference):
    run = CrashedRun(tmp_path_factory.mktemp("crashed"))
    pause = random.Random(20240605).uniform  # seeded: the same five moments on every test run
    try:
        # 1. Training has just begun: no checkpoint yet, only OUTPUT_DIR/mlflow_run_id knows the MLflow run.
        # (steps 1-4 slowed to 0.1 s each, so that the kill lands before the first checkpoint at step 4)
        run.start(slow_step=0.1, slow_steps=range(1, 5))
        run.wait_for_log("training for 3 epochs (66 iterations), starting at 0")
        run.kill_after(pause(0, 0.05))
        run.notes["files after the first kill"] = run.files()

        # 2. Mid-epoch, a step or two after a periodic checkpoint (steps 13-20 slowed to 0.1 s each: the
        #    checkpoint is written in the background while training goes on, and the next kill must be later).
        run.start(slow_step=0.1, slow_steps=range(13, 21))
        run.wait_for_log("saved checkpoint checkpoint_00000012.pth")
        run.kill_after(pause(0.02, 0.12))
        assert run.pointer() in ("checkpoint_00000012.pth", "checkpoint_00000016.pth")

        # 3. While checkpoint_00000020.pth is being written (its write is made to last 2 s), with an MLflow
        #    store too slow to take anything meanwhile: the metrics wait in OUTPUT_DIR/mlflow_pending.jsonl.
        run.start(slow_save="checkpoint_00000020.pth", slow_mlflow=60)
        wait_for(lambda: list(run.output_dir.glob(".checkpoint_00000020.pth.*.tmp")), "the temporary file",
                 process=run.processes[-1])
        run.kill_after(pause(0.2, 1.0))
        run.notes["files after the killed save"] = run.files()
        run.notes["pointer after the killed save"] = newest = run.pointer()
        run.notes["newest checkpoint loads"] = load_weights(run.output_dir / newest)["iteration"]
        # ... and then the newest checkpoint turns out cut short (a copy interrupted, a disk that lied):
        data = (run.output_dir / newest).read_bytes()
        (run.output_dir / newest).write_bytes(data[: len(data) // 2])

        # 4. Mid-epoch 2 (steps slowed for the same reason).
        run.start(slow_step=0.1, slow_steps=range(33, 41))
        run.wait_for_log("saved checkpoint checkpoint_00000032.pth")
        run.kill_after(pause(0, 0.3))
        assert run.pointer() in ("checkpoint_00000032.pth", "checkpoint_00000036.pth")

        # 5. At the end of epoch 2: its last step and evaluation are done, its checkpoint is not (the epoch end
        #    is made to last 3 s more).
        run.start(slow_eval=3)
        run.wait_for_log("fault: the epoch end at iteration 44 takes")
        run.kill_after(pause(0.1, 2.5))
        assert run.pointer() == "checkpoint_00000040.pth"  # the epoch-end checkpoint was never written

        # And once more, to the end.
        run.start()
        run.finish()
    finally:
        run.stop()
    return run


def resumed_from(log: str) -> tuple[str, int] | None:
    found = re.search(r"resumed from (checkpoint_\d+\.pth) at iteration (\d+)", log)
    return (found.group(1), int(found.group(2))) if found else None


def mlflow_run_ids(log: str) -> list[str]:
    return re.findall(r"MLflow run (\w+) in experiment", log)


def test_five_kills_and_resumes_end_with_the_uninterrupted_model(crashed_run, reference):
    assert [p.poll() for p in crashed_run.processes] == [-9] * 5 + [0]
    moments = crashed_run.newest_at_kill
    assert moments[0] is None and moments[1:] == sorted(set(moments[1:]))  # each kill further on than the last
    assert [resumed_from(log) is not None for log in crashed_run.logs] == [False, False] + [True] * 4
    assert_same_weights(crashed_run.output_dir / "model_final.pth", reference.model_final)


def test_the_weight_average_survives_the_kills_bit_for_bit(crashed_run, reference):
    last = f"checkpoint_{MAX_ITER:08d}.pth"
    final, expected = load_weights(crashed_run.output_dir / last), load_weights(reference.output_dir / last)
    assert final["hooks"]["EMAHook"]["updates"] == expected["hooks"]["EMAHook"]["updates"] == MAX_ITER
    for name, average in expected["hooks"]["EMAHook"]["model"].items():
        assert torch.equal(final["hooks"]["EMAHook"]["model"][name], average), name


def test_the_resumed_mlflow_run_has_every_step_with_the_uninterrupted_values(crashed_run, reference):
    (run,) = runs_of(crashed_run.tracking_uri)  # every process re-attached the same run
    assert {run_id for log in crashed_run.logs for run_id in mlflow_run_ids(log)} == {run.info.run_id}
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "lr"):
        history = sorted(set(metric_history(crashed_run.tracking_uri, run.info.run_id, key)))
        assert history == reference.history(key), key  # every step, with the same value


def test_the_resumed_mlflow_run_logs_no_step_twice(crashed_run):
    (run,) = runs_of(crashed_run.tracking_uri)
    for key in ("train_loss", "lr"):
        steps = [step for step, _ in metric_history(crashed_run.tracking_uri, run.info.run_id, key)]
        assert steps == list(range(1, MAX_ITER + 1)), key


def test_params_are_logged_once_and_not_changed_by_the_resumes(crashed_run, reference):
    (run,) = runs_of(crashed_run.tracking_uri)
    expected = mlflow_client(reference.tracking_uri).get_run(reference.run_id).data.params
    assert {k: v for k, v in run.data.params.items() if k != "OUTPUT_DIR" and "TRACKING_URI" not in k} == {
        k: v for k, v in expected.items() if k != "OUTPUT_DIR" and "TRACKING_URI" not in k}


def test_the_resumed_run_keeps_every_epoch_end_evaluation(crashed_run, reference):
    (run,) = runs_of(crashed_run.tracking_uri)
    for key in ("val_loss", "val_acc1", "val_loss_raw", "val_acc1_raw", "epoch"):  # raw: the weights, not the EMA
        history = metric_history(crashed_run.tracking_uri, run.info.run_id, key)
        assert history == reference.history(key), key  # reference: one value at each of 22, 44, 66


def test_a_crash_before_the_first_checkpoint_reattaches_the_same_mlflow_run(crashed_run):
    assert not [name for name in crashed_run.notes["files after the first kill"] if name.startswith("checkpoint_")]
    assert "mlflow_run_id" in crashed_run.notes["files after the first kill"]
    second = crashed_run.logs[1]
    assert f"--resume: no checkpoint in {crashed_run.output_dir}, starting from scratch" in second
    assert mlflow_run_ids(second) == mlflow_run_ids(crashed_run.logs[0])


def test_a_save_killed_midway_leaves_the_previous_checkpoint_in_place(crashed_run):
    files = crashed_run.notes["files after the killed save"]
    assert "checkpoint_00000020.pth" not in files
    assert [name for name in files if name.startswith(".checkpoint_00000020.pth.")]  # the write never finished
    assert crashed_run.notes["pointer after the killed save"] == "checkpoint_00000016.pth"
    assert crashed_run.notes["newest checkpoint loads"] == 16


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_one_used(crashed_run):
    after_truncation = crashed_run.logs[3]
    assert re.search(r"cannot read checkpoint \S*/checkpoint_00000016\.pth", after_truncation)
    assert resumed_from(after_truncation) == ("checkpoint_00000012.pth", 12)


def test_a_kill_during_the_epoch_end_evaluation_resumes_before_it(crashed_run):
    assert resumed_from(crashed_run.logs[5]) == ("checkpoint_00000040.pth", 40)


# ---- the checkpoints themselves ----------------------------------------------------------------------------
def test_a_checkpoint_holds_the_whole_training_state_and_loads_weights_only(reference):
    output_dir = reference.result().output_dir
    checkpoint = torch.load(output_dir / "checkpoint_00000066.pth", map_location="cpu", weights_only=True)

    assert checkpoint["iteration"] == MAX_ITER
    assert {"model", "optimizer", "scaler", "rng", "hooks", "config"} <= checkpoint.keys()
    assert checkpoint["optimizer"]["state"]  # SGD momentum buffers
    assert checkpoint["hooks"]["LRScheduler"]["last_epoch"] == MAX_ITER  # the per-iteration schedule
    (rng,) = checkpoint["rng"]  # one entry per process
    assert {"python", "numpy", "torch", "cuda"} <= rng.keys()
    assert checkpoint["hooks"]["MetricWriter"]["mlflow_run_id"] == reference.run_id  # the run a resume re-attaches
    assert "MAX_EPOCHS: 3" in checkpoint["config"]
    final = load_weights(output_dir / "model_final.pth")  # with TRAIN.EMA_DECAY on: the weight average
    assert all(torch.equal(final[name], tensor) for name, tensor in checkpoint["hooks"]["EMAHook"]["model"].items())


def test_the_epoch_end_checkpoint_remembers_the_best_accuracy_so_far(reference):
    checkpoint = load_weights(reference.result().output_dir / "checkpoint_00000066.pth")
    best = max(value for _, value in reference.history("val_acc1"))  # that of epoch 3, evaluated at iteration 66
    assert checkpoint["hooks"]["BestCheckpointer"]["best"] == best


def test_checkpoints_come_every_period_and_at_epoch_ends_and_only_the_newest_are_kept(reference):
    output_dir = reference.result().output_dir
    saved = [int(n) for n in re.findall(r"saved checkpoint checkpoint_(\d+)\.pth", log_text(output_dir))]
    assert sorted(set(saved)) == sorted(set(range(4, MAX_ITER + 1, 4)) | set(EPOCH_ENDS))
    assert sorted(p.name for p in output_dir.glob("checkpoint_*.pth")) == [
        "checkpoint_00000060.pth", "checkpoint_00000064.pth", "checkpoint_00000066.pth"]  # CHECKPOINT.KEEP 3
    assert (output_dir / "last_checkpoint").read_text() == "checkpoint_00000066.pth"
    assert not list(output_dir.glob("*.tmp"))


def test_model_best_is_the_model_of_the_best_validation_accuracy(reference):
    accuracies = reference.result().history("val_acc1")
    best_step = max(accuracies, key=lambda item: item[1])[0]
    assert best_step == MAX_ITER  # digits keeps improving over 3 epochs, so the best is the last
    assert_same_weights(reference.output_dir / "model_best.pth", reference.model_final)


# ---- what a resume may and may not change ---------------------------------------------------------------------
@pytest.fixture
def copy_of_reference(reference, tmp_path):
    """The finished reference run (OUTPUT_DIR and MLflow store) copied, to resume without touching the original."""
    reference.result()
    shutil.copytree(reference.workdir / "output", tmp_path / "output")
    shutil.copytree(reference.workdir / "store", tmp_path / "store")
    return tmp_path


@pytest.mark.parametrize("change, detail", [
    (["TRAIN.LR", "0.05"], "TRAIN.LR 0.02 -> 0.05"),
    (["TRAIN.BATCH_SIZE", "32"], "TRAIN.BATCH_SIZE 64 -> 32"),
    (["TRAIN.MODEL_TYPE", "resnet18"], "TRAIN.MODEL_TYPE 'simple_cnn' -> 'resnet18'"),
])
def test_a_resume_that_would_change_the_trajectory_is_refused(copy_of_reference, capfd, change, detail):
    output_dir = copy_of_reference / "output"
    before = {p.name: p.read_bytes() for p in output_dir.glob("checkpoint_*.pth")}

    with isolated_training(copy_of_reference):
        code = main([*small_run_args(output_dir, sqlite_uri(copy_of_reference / "store")), *change, "--resume"])

    assert code == 2
    assert capfd.readouterr().err.splitlines() == [
        f"error: cannot resume from checkpoint_00000066.pth: the config changes the training trajectory ({detail}); "
        "resume with the original values, or start a new run in another OUTPUT_DIR"]
    assert {p.name: p.read_bytes() for p in output_dir.glob("checkpoint_*.pth")} == before


def test_a_resume_may_raise_max_epochs_and_continues_the_same_mlflow_run(copy_of_reference, reference):
    output_dir, tracking_uri = copy_of_reference / "output", sqlite_uri(copy_of_reference / "store")
    start = log_size(output_dir)

    with isolated_training(copy_of_reference):
        code = main([*small_run_args(output_dir, tracking_uri), "TRAIN.MAX_EPOCHS", "4", "--resume"])

    assert code == 0
    log = log_text(output_dir)[start:]
    assert "resumed from checkpoint_00000066.pth at iteration 66" in log
    assert "training for 4 epochs (88 iterations), starting at 66" in log
    (run,) = runs_of(tracking_uri)
    assert run.info.run_id == reference.run_id and run.info.status == "FINISHED"
    history = metric_history(tracking_uri, run.info.run_id, "train_loss")
    assert [step for step, _ in history] == list(range(1, 88 + 1))
    assert history[:MAX_ITER] == reference.history("train_loss")
    assert run.data.params["TRAIN.MAX_EPOCHS"] == "3"  # params are never logged twice (MLflow keeps the first)


def test_a_failed_save_stops_the_run_with_one_clear_line_and_the_previous_checkpoint_resumes(
        tmp_path, capfd, monkeypatch, reference):
    import os

    from engine import checkpoint

    output_dir, tracking_uri = tmp_path / "output", sqlite_uri(tmp_path / "store")
    args = small_run_args(output_dir, tracking_uri)
    real_replace = os.replace

    def disk_full_at_checkpoint_12(source, destination):
        if str(destination).endswith("checkpoint_00000012.pth"):
            raise OSError(28, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(checkpoint.os, "replace", disk_full_at_checkpoint_12)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the reference process (OMP_NUM_THREADS=1): the same bits
    try:
        with isolated_training(tmp_path):
            assert main(args) == 2
        err = capfd.readouterr().err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            f"error: could not write {output_dir / 'checkpoint_00000012.pth'}: No space left on device; free disk "
            "space or fix the folder's permissions (earlier checkpoints are intact)"]
        assert "Traceback" not in err
        assert (output_dir / "last_checkpoint").read_text() == "checkpoint_00000008.pth"
        assert not list(output_dir.glob("*.tmp"))
        (run,) = runs_of(tracking_uri)
        assert run.info.status == "FAILED"

        monkeypatch.setattr(checkpoint.os, "replace", real_replace)  # space was freed
        with isolated_training(tmp_path):
            assert main([*args, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "resumed from checkpoint_00000008.pth at iteration 8" in log_text(output_dir)
    assert_same_weights(output_dir / "model_final.pth", reference.model_final)
    (run,) = runs_of(tracking_uri)
    assert run.info.status == "FINISHED"
    assert metric_history(tracking_uri, run.info.run_id, "train_loss") == reference.history("train_loss")
