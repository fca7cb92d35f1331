"""Every global random stream of a process, saved in checkpoints and restored on resume (one entry per rank)."""

import io
import logging
import random

import numpy as np
import torch

from engine.distributed import all_gather_objects, get_rank, get_world_size, in_process_group

logger = logging.getLogger("engine")


def capture_rng_state() -> dict:
    """The global random streams training draws from, in types that ``torch.load(weights_only=True)`` accepts.

    Python's ``random`` is recorded but never seeded or restored: other libraries draw from it (MLflow's run
    names), and training does not.
    """
    numpy_state = np.random.get_state()
    return {
        "python": _to_lists(random.getstate()),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def gather_rng_states() -> list[dict]:
    """Every rank's ``capture_rng_state()``, in rank order (a collective under DDP).

    Sent as ``torch.save`` bytes and read back with ``weights_only=True``: tensors inside objects do not
    survive ``all_gather_object`` itself.
    """
    state = capture_rng_state()
    if not in_process_group():
        return [state]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return [torch.load(io.BytesIO(data), weights_only=True) for data in all_gather_objects(buffer.getvalue())]


def restore_rng_state(state: dict) -> None:
    """Set the global random streams from ``capture_rng_state``'s result (Python's ``random`` is left alone).

    CUDA states are restored for the GPUs visible now: a checkpoint of more GPUs (``TRAIN.GPUS`` may change
    on resume) gives its first ones, a checkpoint written on the CPU leaves the GPUs' streams alone.
    """
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    saved, visible = state["cuda"], torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, cuda_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(cuda_state, index)
    if saved and len(saved) != visible:
        logger.info(f"the checkpoint holds the CUDA random states of {len(saved)} GPU(s), {visible} visible now: "
                    f"restored {min(len(saved), visible)}")


def rng_state_of_this_rank(saved) -> dict:
    """This rank's entry of a checkpoint's ``rng`` (one per rank; older checkpoints hold one for all ranks).

    With more ranks than entries (resumed on more processes) the extra ranks take rank 0's.
    """
    states = saved if isinstance(saved, list) else [saved]
    rank, world_size = get_rank(), get_world_size()
    if len(states) != world_size and rank == 0:
        logger.debug(f"the checkpoint holds the random states of {len(states)} process(es), this run has "
                    f"{world_size}")
    return states[rank] if rank < len(states) else states[0]


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value
