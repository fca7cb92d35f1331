"""The recipe (EMA, label smoothing, mixup and cutmix all on) under DDP: two processes train the model and the
weight average one process trains.

The recipe is on in every fault test (fault_utils.SMALL_RUN): test_resume proves that kills and resumes keep
its state bit for bit, test_signals and test_mlflow_outage run with it too. Here the small digits run goes
under torchrun with 2 processes (Gloo) and is compared with the shared uninterrupted reference.
"""

import time

import pytest
from fault_utils import (
    MAX_ITER,
    TRAIN_NET,
    empty_store,
    load_weights,
    process_env,
    shared_reference_run,
    small_run_args,
)
from torchrun_utils import TORCHRUN, Launch

WAIT = 240


@pytest.fixture(scope="module")
def trainings(tmp_path_factory):
    reference = shared_reference_run(tmp_path_factory)
    ddp_dir = tmp_path_factory.mktemp("recipe_ddp")
    args = small_run_args(ddp_dir / "output", empty_store(ddp_dir / "store"), "TRAIN.DISTRIBUTED_BACKEND", "ddp")
    ddp = Launch([TORCHRUN, "--standalone", "--nproc_per_node", "2", TRAIN_NET, *args], ddp_dir,
                 ddp_dir / "torchrun.log", process_env())
    try:
        code = ddp.wait(time.monotonic() + WAIT)
        assert code == 0, ddp.output_tail()
        yield {"reference": reference.result().output_dir, "ddp": ddp_dir / "output"}
    finally:
        ddp.kill()


def test_two_ddp_processes_train_the_model_and_the_ema_of_one_process(trainings):
    final = load_weights(trainings["ddp"] / f"checkpoint_{MAX_ITER:08d}.pth")
    expected = load_weights(trainings["reference"] / f"checkpoint_{MAX_ITER:08d}.pth")
    for weights, reference in [(final["model"], expected["model"]),
                               (final["hooks"]["EMAHook"]["model"], expected["hooks"]["EMAHook"]["model"])]:
        assert weights.keys() == reference.keys()
        assert max((weights[k].double() - reference[k].double()).abs().max().item() for k in reference) <= 1e-4
    assert len(final["rng"]) == 2  # it did run as two processes
