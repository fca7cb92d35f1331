"""Devices and processes: which device a run uses, rank/world helpers, and model wrapping."""

import logging
import os

import torch
from torch import nn

from config import ConfigError

logger = logging.getLogger("engine")


def get_world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def get_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def select_device(gpus: int, backend: str) -> tuple[torch.device, int]:
    """Return the device of this process and the number of GPUs it drives (0 = CPU).

    ``gpus``: -1 = all visible (the CPU when there is no CUDA, said once), 0 = CPU, N = the first N GPUs.
    """
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > available:
        raise ConfigError(f"TRAIN.GPUS {gpus} asks for more GPUs than the {available} visible; "
                          f"set TRAIN.GPUS to at most {available} (-1 = all, 0 = CPU)")
    if gpus == 0 or available == 0:
        if gpus == -1:
            logger.info("no CUDA device found: running on the CPU")
        return torch.device("cpu"), 0
    count = available if gpus == -1 else gpus
    if backend == "ddp" or launched_by_torchrun():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), 1
    return torch.device("cuda", 0), count


def wrap_model(model: nn.Module, device: torch.device, num_gpus: int, backend: str,
               sync_bn: bool = False) -> nn.Module:
    """DataParallel over ``num_gpus`` GPUs for the ``dp`` backend; DDP when the process group is up."""
    if torch.distributed.is_initialized():
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if backend == "dp" and num_gpus > 1:
        return nn.DataParallel(model, device_ids=list(range(num_gpus)))
    return model


def init_distributed(backend_name: str, gpus: int) -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); return ``(rank, world_size)``.

    NCCL when this process drives a GPU, Gloo on the CPU.
    """
    if not launched_by_torchrun():
        return 0, 1
    if backend_name != "ddp":
        raise ConfigError(f"launched by torchrun with {os.environ['WORLD_SIZE']} processes but "
                          f"TRAIN.DISTRIBUTED_BACKEND is '{backend_name}'; add TRAIN.DISTRIBUTED_BACKEND ddp")
    if not torch.distributed.is_initialized():
        use_cuda = torch.cuda.is_available() and gpus != 0
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", **_fresh_store_after_restart())
    return get_rank(), get_world_size()


def _fresh_store_after_restart() -> dict:
    """After ``torchrun --max-restarts`` restarted the workers, the agent's key-value store still holds the
    addresses the dead attempt published, and the new group may connect to them (pytorch#135712). Each
    attempt then gets its own key prefix in that store."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    from datetime import timedelta

    agent_store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                             is_master=False, timeout=timedelta(minutes=10))
    return {"store": torch.distributed.PrefixStore(f"attempt_{restart}/", agent_store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (a no-op in a single process)."""
    if get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def broadcast_object(obj, source: int = 0):
    """Rank ``source``'s ``obj`` on every rank (e.g. the MLflow run id)."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=source)
    return holder[0]


def barrier() -> None:
    if get_world_size() > 1:
        torch.distributed.barrier()


def destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
