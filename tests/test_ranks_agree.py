"""What the ranks of a DDP run must agree on, checked in two real processes joined by a Gloo group on the CPU:
resuming a folder whose checkpoints cannot be read (rank 0 alone sets them aside; every rank then starts fresh),
the BatchNorm statistics an evaluation uses (rank 0's: those it saves), and waiting for rank 0 where it works
alone (longer than a collective may take).

``on_two_ranks(function, *args)`` runs ``function(rank, *args)`` in two spawned processes of one Gloo group and
returns what each returned (or raises what one raised), in rank order.
"""

import logging
import pickle
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from fault_utils import free_port

from engine.checkpoint import Checkpointer, CheckpointError
from engine.distributed import create_wait_group, wait_for_main_process
from engine.evaluation import evaluate
from engine.run import find_resume_point
from ptengine.datasets.base import TensorSplit
from ptengine.datasets.batches import InMemoryBatches
from ptengine.datasets.transforms import BatchTransform, ToTensor


def _join_and_call(rank: int, port: int, results: Path, timeout: timedelta, function, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timeout)
    try:
        outcome = ("returned", function(rank, *args))
    except Exception as error:
        outcome = ("raised", f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()
    (results / f"rank{rank}.pickle").write_bytes(pickle.dumps(outcome))


def on_two_ranks(tmp_path: Path, function, *args, timeout: timedelta = timedelta(minutes=5)) -> list:
    """``timeout``: the process group's, for its collectives."""
    results = tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.start_processes(_join_and_call, args=(free_port(), results, timeout, function, args),
                                          nprocs=2, start_method="spawn")
    outcomes = [pickle.loads((results / f"rank{rank}.pickle").read_bytes()) for rank in (0, 1)]
    failures = [f"rank {rank}: {value}" for rank, (kind, value) in enumerate(outcomes) if kind == "raised"]
    assert not failures, "\n".join(failures)
    return [value for _, value in outcomes]


def _resume(rank: int, output_dir: Path) -> list[str]:
    """What ``find_resume_point`` told this rank (its log lines), as tools/run.py calls it."""
    told = []
    handler = logging.Handler()
    handler.emit = lambda record: told.append(record.getMessage())
    logging.getLogger("engine").addHandler(handler)
    checkpointer = Checkpointer(output_dir, enabled=rank == 0)  # rank 0 alone writes
    assert find_resume_point(checkpointer, lambda saved, path: None) is None
    return told


def test_unreadable_checkpoints_are_set_aside_by_rank_0_alone_and_every_rank_starts_fresh(tmp_path):
    output_dir = tmp_path / "output"
    output_dir.mkdir()
    damaged = {f"checkpoint_{iteration:08d}.pth": f"not a checkpoint {iteration}".encode() for iteration in range(8)}
    for name, content in damaged.items():
        (output_dir / name).write_bytes(content)
    (output_dir / "last_checkpoint").write_text("checkpoint_00000007.pth")

    told = on_two_ranks(tmp_path, _resume, output_dir)  # a rank renaming a file another renamed first fails

    set_aside = f"none of the 8 checkpoints in {output_dir} could be read; they are kept as"
    assert all(any(set_aside in line for line in lines) for lines in told), told  # every rank knows what happened
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(f"{name}.unreadable" for name in damaged)
    for name, content in damaged.items():
        assert (output_dir / f"{name}.unreadable").read_bytes() == content


def _resume_from_own_folder(rank: int, folders: list[Path]) -> str:
    try:
        find_resume_point(Checkpointer(folders[rank], enabled=rank == 0), lambda saved, path: None)
    except CheckpointError as error:
        return str(error)
    return "resumed"


def test_ranks_that_find_different_checkpoints_all_stop_with_the_same_error(tmp_path):
    folders = [tmp_path / "node0", tmp_path / "node1"]  # e.g. OUTPUT_DIR not on a shared filesystem
    for folder in folders:
        folder.mkdir()
    torch.save({"iteration": 5}, folders[1] / "checkpoint_00000005.pth")

    told = on_two_ranks(tmp_path, _resume_from_own_folder, folders)

    for rank, message in enumerate(told):  # each names the folder it looked in
        assert message.startswith(f"--resume: the ranks found different checkpoints in {folders[rank]} "), told
        assert message.endswith("(rank 0: None, rank 1: checkpoint_00000005.pth); give every node the same "
                                "OUTPUT_DIR on a shared filesystem"), told


def model_with_rank_statistics(rank: int) -> torch.nn.Module:
    """The same weights on every rank, and BatchNorm statistics of each rank's own (as after a DDP step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(3))
    model(torch.zeros(2, 3, 8, 8))  # materializes the lazy layer, and updates the statistics a first time
    with torch.no_grad():
        model[1].running_mean.fill_(0.5 * rank)
        model[1].running_var.fill_(1.0 + rank)
    return model


def _evaluate_shared_out(rank: int, world_size: int = 2) -> tuple[dict, dict]:
    model = model_with_rank_statistics(rank)
    generator = torch.Generator().manual_seed(3)
    split = TensorSplit(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=generator),
                        torch.randint(0, 3, (40,), generator=generator))
    batches = InMemoryBatches(split, 8, BatchTransform([ToTensor()]), "cpu", shuffle=False, seed=0, rank=rank,
                              world_size=world_size)
    results = evaluate(model, batches, 3, "cpu")
    return {key: results[key] for key in ("loss", "acc1")}, {k: v.clone() for k, v in model.state_dict().items()}


def test_ddp_ranks_evaluate_the_batchnorm_statistics_of_rank_0(tmp_path):
    (results_0, state_0), (results_1, state_1) = on_two_ranks(tmp_path, _evaluate_shared_out)

    saved_by_rank_0 = model_with_rank_statistics(0).state_dict()
    for name, value in saved_by_rank_0.items():
        assert torch.equal(state_0[name], value) and torch.equal(state_1[name], value), name
    alone, _ = _evaluate_shared_out(0, world_size=1)  # one process, rank 0's model, every batch
    assert results_0 == results_1
    assert results_0["acc1"] == alone["acc1"]
    assert results_0["loss"] == pytest.approx(alone["loss"], rel=1e-6)  # float32 sums of other batch shares


def _wait_while_rank_0_works_alone(rank: int, seconds: float) -> dict:
    """Rank 0 works alone for ``seconds`` (a download, logging the model) while rank 1 waits for it, once in the
    engine's wait and once in a barrier of the default group, whose timeout (set short here) is shorter."""
    create_wait_group()  # as init_distributed does after joining
    if rank == 0:
        time.sleep(seconds)
    wait_for_main_process()
    outcome = {"wait_for_main_process": "returned"}
    if rank == 0:
        time.sleep(seconds)
    try:
        dist.barrier()
        outcome["barrier"] = "returned"
    except RuntimeError as error:
        outcome["barrier"] = f"timed out: {str(error).splitlines()[0]}"
    return outcome


def test_the_other_ranks_wait_for_rank_0_longer_than_a_collective_timeout(tmp_path):
    outcomes = on_two_ranks(tmp_path, _wait_while_rank_0_works_alone, 6.0, timeout=timedelta(seconds=2))

    assert [outcome["wait_for_main_process"] for outcome in outcomes] == ["returned", "returned"]
    assert outcomes[1]["barrier"].startswith("timed out"), outcomes  # what NCCL's 10 minutes did to every rank
