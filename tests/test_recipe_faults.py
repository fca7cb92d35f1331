"""The recipe (EMA, label smoothing, mixup and cutmix all on) keeps the engine's guarantees: a run killed with
SIGKILL at three moments and resumed ends bit for bit as the uninterrupted run, EMA state included, and two DDP
processes train what one process trains.

One module fixture starts three trainings of config/digits.yaml for 3 epochs (a checkpoint every 4 iterations)
at once: the uninterrupted reference, the same under torchrun with 2 processes (Gloo), and a chain of processes
killed one after the other (kill 1 in epoch 1, kill 2 in epoch 2, kill 3 during epoch 2's evaluation), each
continued with --resume.
"""

import random
import re
import time

import pytest
import torch
from fault_utils import (
    MAX_ITER,
    TRAIN_NET,
    Training,
    load_weights,
    log_size,
    log_text,
    metric_history,
    process_env,
    runs_of,
    small_run_args,
    sqlite_uri,
    wait_for_log,
)
from torchrun_utils import TORCHRUN, Launch

RECIPE = ["TRAIN.EMA_DECAY", "0.99", "TRAIN.LABEL_SMOOTHING", "0.1", "TRAIN.MIXUP_ALPHA", "0.2",
          "TRAIN.CUTMIX_ALPHA", "1.0", "MLFLOW.SYSTEM_METRICS", "False"]
EPOCH_ENDS = [22, 44, MAX_ITER]
WAIT = 240


class Chain:
    """One OUTPUT_DIR trained by successive processes, each killed but the last."""

    def __init__(self, workdir):
        self.workdir, self.output_dir, self.tracking_uri = workdir, workdir / "output", sqlite_uri(workdir / "store")
        self.processes: list[Training] = []
        self.logs: list[str] = []
        self._log_start = 0

    def start(self, **faults) -> None:
        resume = ["--resume"] if self.processes else []
        self._log_start = log_size(self.output_dir)
        self.processes.append(Training(small_run_args(self.output_dir, self.tracking_uri, *RECIPE, *resume),
                                       self.workdir, f"process-{len(self.processes) + 1}", **faults).start())

    def kill_after_log(self, text: str, seconds: float) -> None:
        wait_for_log(self.output_dir, text, self.processes[-1], self._log_start)
        time.sleep(seconds)
        self.processes[-1].kill()
        self.logs.append(log_text(self.output_dir)[self._log_start:])

    def finish(self) -> int:
        code = self.processes[-1].wait(WAIT)
        self.logs.append(log_text(self.output_dir)[self._log_start:])
        return code


@pytest.fixture(scope="module")
def trainings(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_faults")
    reference_dir, ddp_dir = root / "reference", root / "ddp"
    reference = Training(small_run_args(reference_dir / "output", sqlite_uri(reference_dir / "store"), *RECIPE),
                         reference_dir, "reference").start()
    ddp_dir.mkdir()
    ddp = Launch([TORCHRUN, "--standalone", "--nproc_per_node", "2", TRAIN_NET,
                  *small_run_args(ddp_dir / "output", sqlite_uri(ddp_dir / "store"), *RECIPE,
                                  "TRAIN.DISTRIBUTED_BACKEND", "ddp")],
                 ddp_dir, ddp_dir / "torchrun.log", process_env())
    chain = Chain(root / "chain")
    pause = random.Random(15).uniform  # seeded: the same moments on every test run
    try:
        chain.start(slow_step=0.1, slow_steps=range(9, 17))  # kill 1: mid-epoch 1, after checkpoint 8
        chain.kill_after_log("saved checkpoint checkpoint_00000008.pth", pause(0.05, 0.3))
        chain.start(slow_step=0.1, slow_steps=range(29, 37))  # kill 2: mid-epoch 2, after checkpoint 28
        chain.kill_after_log("saved checkpoint checkpoint_00000028.pth", pause(0.05, 0.3))
        chain.start(slow_eval=3)  # kill 3: at the end of epoch 2, evaluated but not yet checkpointed
        chain.kill_after_log("fault: the epoch end at iteration 44 takes", pause(0.2, 2.0))
        chain.start()
        codes = {"chain": chain.finish(), "reference": reference.wait(WAIT),
                 "ddp": ddp.wait(time.monotonic() + WAIT)}
        assert codes == {"chain": 0, "reference": 0, "ddp": 0}, (codes, reference.tail(), ddp.output_tail())
        yield {"reference": reference_dir / "output", "ddp": ddp_dir / "output", "chain": chain,
               "reference_uri": sqlite_uri(reference_dir / "store")}
    finally:
        for process in [reference, *chain.processes]:
            process.kill()
        ddp.kill()


def resumed_at(log: str) -> int | None:
    found = re.search(r"resumed from checkpoint_\d+\.pth at iteration (\d+)", log)
    return int(found.group(1)) if found else None


def assert_equal(weights: dict, expected: dict) -> None:
    assert weights.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(weights[name], expected[name])]
    assert not different, different


def test_three_kills_and_resumes_end_with_the_uninterrupted_model_and_ema(trainings):
    chain = trainings["chain"]
    assert [process.poll() for process in chain.processes] == [-9, -9, -9, 0]
    points = [resumed_at(log) for log in chain.logs]
    assert points[0] is None and points[1] in (8, 12) and points[2] in (28, 32) and points[3] == 40

    assert_equal(load_weights(chain.output_dir / "model_final.pth"),
                 load_weights(trainings["reference"] / "model_final.pth"))
    final = load_weights(chain.output_dir / f"checkpoint_{MAX_ITER:08d}.pth")
    expected = load_weights(trainings["reference"] / f"checkpoint_{MAX_ITER:08d}.pth")
    assert final["hooks"]["EMAHook"]["updates"] == expected["hooks"]["EMAHook"]["updates"] == MAX_ITER
    assert_equal(final["hooks"]["EMAHook"]["model"], expected["hooks"]["EMAHook"]["model"])
    assert_equal(final["model"], expected["model"])


def test_the_resumed_mlflow_run_has_every_step_once_with_the_uninterrupted_values(trainings):
    chain = trainings["chain"]
    (run,) = runs_of(chain.tracking_uri)
    (reference,) = runs_of(trainings["reference_uri"])
    for key in ("train_loss", "lr", "val_acc1", "val_loss", "val_acc1_raw", "val_loss_raw"):
        history = metric_history(chain.tracking_uri, run.info.run_id, key)
        steps = [step for step, _ in history]
        assert steps == (list(range(1, MAX_ITER + 1)) if key in ("train_loss", "lr") else EPOCH_ENDS), key
        assert history == metric_history(trainings["reference_uri"], reference.info.run_id, key), key


def test_two_ddp_processes_train_the_model_and_the_ema_of_one_process(trainings):
    final = load_weights(trainings["ddp"] / f"checkpoint_{MAX_ITER:08d}.pth")
    expected = load_weights(trainings["reference"] / f"checkpoint_{MAX_ITER:08d}.pth")
    for weights, reference in [(final["model"], expected["model"]),
                               (final["hooks"]["EMAHook"]["model"], expected["hooks"]["EMAHook"]["model"])]:
        assert weights.keys() == reference.keys()
        assert max((weights[k].double() - reference[k].double()).abs().max().item() for k in reference) <= 1e-4
    assert len(final["rng"]) == 2  # it did run as two processes
