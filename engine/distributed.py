"""Devices and processes: which device a run uses, rank/world helpers, process-group set-up, model wrapping,
and the collectives through which ranks agree (on a stop, an error, the random states of a checkpoint)."""

import logging
import os
import signal
import threading
from contextlib import contextmanager
from datetime import timedelta

import torch
from torch import nn

from engine.compile import uncompiled
from engine.precision import in_callers_autocast
from ptengine.config import ConfigError

logger = logging.getLogger("engine")

# How long the other ranks wait for rank 0 where it works alone: preparing the dataset (a download from a slow
# mirror), and the end of a run (logging the model, MLflow's last deliveries). The default group's timeout (NCCL:
# 10 minutes) aborted every rank there; a rank 0 that dies instead ends the job through torchrun at once.
LONG_WAIT = timedelta(hours=24)
_wait_group = None  # a Gloo group with the LONG_WAIT timeout, for wait_for_main_process
# Files an NVIDIA driver creates: where one exists and CUDA does not start, something is wrong.
NVIDIA_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0")


def in_process_group() -> bool:
    """True under torchrun with TRAIN.DISTRIBUTED_BACKEND ddp, also with a single process (a one-rank group)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_world_size() -> int:
    return torch.distributed.get_world_size() if in_process_group() else 1


def get_rank() -> int:
    return torch.distributed.get_rank() if in_process_group() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started, however many it started (torchrun sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def select_device(gpus: int, backend: str, available: int | None = None) -> tuple[torch.device, int]:
    """Return the device of this process and the number of GPUs it drives (0 = CPU).

    ``gpus``: -1 = all visible (the CPU when there is no CUDA, said once), 0 = CPU, N = the first N GPUs.
    ``available``: the number of visible GPUs (default: what torch sees). Under ``ddp`` each process drives
    one GPU, its LOCAL_RANK.
    """
    available = visible_gpus() if available is None else available
    if gpus > available:
        raise ConfigError(f"TRAIN.GPUS {gpus} asks for more GPUs than the {available} visible; "
                          f"set TRAIN.GPUS to at most {available} (-1 = all, 0 = CPU)")
    if gpus == 0 or available == 0:
        if gpus == -1:
            failure = cuda_start_failure()
            if failure:
                logger.warning(f"TRAIN.GPUS -1 is training on the CPU: {failure} (TRAIN.GPUS 0 asks for the CPU)")
            else:
                logger.info("no CUDA device found: running on the CPU")
        return torch.device("cpu"), 0
    if backend == "ddp":
        device = ddp_device(gpus, available)
        torch.cuda.set_device(device)
        return device, 1
    return torch.device("cuda", 0), available if gpus == -1 else gpus


def cuda_start_failure() -> str | None:
    """Why CUDA did not start on a machine that shows an NVIDIA driver (None: CUDA works, or there is no sign of
    a GPU). A driver too old for the wheel's CUDA, or a CPU-only torch, would otherwise train on the CPU silently."""
    if torch.cuda.is_available():
        return None
    shown_by = next((path for path in NVIDIA_DRIVER_FILES if os.path.exists(path)), None)
    if shown_by is None:
        return None
    if torch.version.cuda is None:
        return (f"{shown_by} shows an NVIDIA driver, but torch {torch.__version__} is a CPU-only build; install "
                "a CUDA build of torch")
    try:
        torch.cuda.init()  # raises the reason is_available() keeps to itself
        reason = "no GPU is visible"
    except Exception as error:
        reason = str(error).strip().splitlines()[0]
    return (f"{shown_by} shows an NVIDIA driver, but CUDA did not start ({reason}); torch {torch.__version__} "
            f"needs a driver that supports CUDA {torch.version.cuda}: check nvidia-smi and CUDA_VISIBLE_DEVICES")


def ddp_device(gpus: int, available: int) -> torch.device:
    """The GPU of this DDP process (LOCAL_RANK), after checking that every process of the node has one.

    Checked on every process alike, so that each prints the same error instead of a CUDA error on a few.
    """
    usable = available if gpus == -1 else min(gpus, available)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if per_node > usable:
        raise ConfigError(f"torchrun starts {per_node} processes per node but {usable} GPU(s) are usable "
                          f"(TRAIN.GPUS {gpus}, {available} visible); DDP needs one GPU per process: use "
                          f"--nproc_per_node {usable}, or TRAIN.GPUS 0 to train on the CPU")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def wrap_model(model: nn.Module, device: torch.device, num_gpus: int, backend: str,
               sync_bn: bool = False) -> nn.Module:
    """DataParallel over ``num_gpus`` GPUs for the ``dp`` backend; DDP when the process group is up."""
    if in_process_group():
        if sync_bn and device.type != "cuda":
            raise ConfigError("TRAIN.SYNC_BN True needs GPUs (SyncBatchNorm does not run on the CPU); "
                              "set TRAIN.SYNC_BN False")
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if sync_bn:
        logger.info(f"TRAIN.SYNC_BN applies under DDP only (torchrun ... TRAIN.DISTRIBUTED_BACKEND ddp); "
                    f"ignored with TRAIN.DISTRIBUTED_BACKEND {backend}")
    if backend == "dp" and num_gpus > 1:
        return AutocastDataParallel(model, device_ids=list(range(num_gpus)))
    return model


class AutocastDataParallel(nn.DataParallel):
    """DataParallel whose replicas run the autocast type of the caller (TRAIN.AMP_DTYPE), for training and
    evaluation alike: DataParallel's own replica threads would enter float16 (see ``in_callers_autocast``)."""

    def parallel_apply(self, replicas, inputs, kwargs):
        return super().parallel_apply(in_callers_autocast(replicas, self.src_device_obj.type), inputs, kwargs)


def unwrapped(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile's wrapper and DataParallel / DistributedDataParallel."""
    model = uncompiled(model)
    return getattr(model, "module", model)


def module_to_evaluate(model: nn.Module) -> nn.Module:
    """What evaluation runs: the plain module inside DDP (each rank evaluates its own share of the batches,
    with no collective per forward), but DataParallel as it is (it splits every batch over the GPUs). Never the
    torch.compile wrapper: evaluation runs eagerly, so it triggers no compile (engine/compile.py)."""
    model = uncompiled(model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def init_distributed(backend_name: str, gpus: int) -> tuple[int, int]:
    """Join the process group when torchrun started this process with TRAIN.DISTRIBUTED_BACKEND ddp, also
    as its only process; return ``(rank, world_size)``. NCCL when this process drives a GPU, Gloo on the CPU.
    """
    if not launched_by_torchrun():
        return 0, 1
    world_size = int(os.environ["WORLD_SIZE"])
    if backend_name != "ddp":
        if world_size == 1:
            return 0, 1  # one process: dp and none work as they do without torchrun
        raise ConfigError(f"launched by torchrun with {world_size} processes but "
                          f"TRAIN.DISTRIBUTED_BACKEND is '{backend_name}'; add TRAIN.DISTRIBUTED_BACKEND ddp")
    if not in_process_group():
        available = visible_gpus()
        if gpus != 0 and available > 0:
            # The group is bound to this process's GPU: its barriers and object collectives use that one.
            device = ddp_device(gpus, available)
            torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl", device_id=device, **_fresh_store_after_restart())
        else:
            torch.distributed.init_process_group("gloo", **_fresh_store_after_restart())
        create_wait_group()
    return get_rank(), get_world_size()


def create_wait_group() -> None:
    """The Gloo group of ``wait_for_main_process`` (every rank calls this once, after joining the process group)."""
    global _wait_group
    _wait_group = torch.distributed.new_group(backend="gloo", timeout=LONG_WAIT)


def wait_for_main_process() -> None:
    """A barrier that waits up to LONG_WAIT: for the phases where rank 0 works alone while the others wait.

    A CPU barrier on a Gloo group of its own, whatever the backend: the default group's timeout (NCCL's 10
    minutes) would abort every rank while rank 0 is still downloading or logging. Outside a process group (or
    in one this engine did not create) it is the ordinary ``barrier``.
    """
    if _wait_group is None or not in_process_group():
        barrier()
        return
    torch.distributed.barrier(group=_wait_group)


@contextmanager
def process_group(backend_name: str, gpus: int, leave_together: tuple[type[BaseException], ...] = ()):
    """Join the process group (see ``init_distributed``) for the block, and leave it at the end.

    ``leave_together``: errors that every rank raises at the same point (a stop, an agreed failure). On those,
    the ranks wait for each other before leaving: torchrun stops all workers as soon as one exits with an
    error, and rank 0 must first finish its way out (the checkpoint on disk, the MLflow run's final status).
    After a run that ends without an error they also leave together. After those errors, and after a
    ConfigError, torchrun does not restart the workers (``_leave_without_restart``): the error would repeat.
    """
    try:
        init_distributed(backend_name, gpus)
        yield
    except leave_together:
        wait_for_main_process()  # rank 0 writes the checkpoint and gives MLflow its last seconds
        _leave_without_restart()
        raise
    except ConfigError:  # the same mistake on every rank, and again after any restart
        _leave_without_restart()
        raise
    else:
        # A rank that tears its group down while another still finishes its run (rank 0 saves and logs the
        # model) can abort in Gloo's threads ("terminate called without an active exception", seen on rank 1
        # at the very end of a DDP run under load): leave together. Rank 0 may still log the model and deliver
        # MLflow's queue (MLFLOW.END_WAIT) for longer than a collective's timeout.
        wait_for_main_process()
    finally:
        destroy_process_group()


def _leave_without_restart() -> None:
    """On the way out with an error the ranks agreed on (a stop, a NaN loss, a checkpoint or config error): finish
    it, and end the torchrun job instead of letting ``--max-restarts`` repeat the same failure.

    torchrun restarts the workers after any failure, whatever their exit code (``_invoke_run`` in
    torch/distributed/elastic/agent/server/api.py); a signal it handles ends it for good instead (it stops its
    workers and exits non-zero). So each node's local rank 0 sends SIGTERM to its torchrun, the agent.
    """
    if not launched_by_torchrun() or threading.current_thread() is not threading.main_thread():
        return
    # torchrun stops the workers (SIGTERM) once one has exited with an error, or once it was told to: each rank is
    # on its way out already, and finishes it (its error line, its exit code) rather than die of that.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    restarts_left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - \
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts_left > 0 and os.environ.get("LOCAL_RANK") == "0" and _parent_is_torchrun():
        logger.warning("this error would repeat after a restart: ending the torchrun job (no restart)")
        os.kill(os.getppid(), signal.SIGTERM)


def _parent_is_torchrun() -> bool:
    """Whether the parent process is torchrun's agent (``torchrun`` or ``python -m torch.distributed.run``), not
    a shell or another launcher between them that a SIGTERM would end without a word."""
    try:
        command = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return False
    return "torchrun" in command or "torch.distributed.run" in command


def _fresh_store_after_restart() -> dict:
    """After ``torchrun --max-restarts`` restarted the workers, the agent's key-value store still holds the
    addresses the dead attempt published, and the new group may connect to them (pytorch#135712). Each
    attempt then gets its own key prefix in that store."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    agent_store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                             is_master=False, timeout=timedelta(minutes=10))
    return {"store": torch.distributed.PrefixStore(f"attempt_{restart}/", agent_store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


# ---- collectives: every rank calls them at the same point; outside a process group they cost nothing -------
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place."""
    if in_process_group():
        torch.distributed.all_reduce(tensor)
    return tensor


def broadcast_object(obj, source: int = 0):
    """Rank ``source``'s ``obj`` on every rank (e.g. the MLflow run id)."""
    if not in_process_group():
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=source)
    return holder[0]


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` outside a process group)."""
    if not in_process_group():
        return [obj]
    gathered = [None] * get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(module: nn.Module, source: int = 0) -> None:
    """Rank ``source``'s buffers (BatchNorm running statistics) in ``module`` on every rank, in place.

    DDP broadcasts rank 0's buffers at the start of every training forward, but that forward then updates each
    rank's statistics with its own share of the batch: without SyncBatchNorm the ranks end every step with
    slightly different ones. An evaluation shared out over the ranks would then measure a blend of models, none
    of them the one rank 0 saves (model_final.pth, model_best.pth, the checkpoints).
    """
    if not in_process_group():
        return
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer, src=source)


def raise_on_every_rank(error: BaseException | None, as_type: type[Exception], source: int = 0) -> None:
    """Raise rank ``source``'s ``error`` (None: nothing) on every rank with the same message: ``source`` raises
    its own, the others an ``as_type`` of its message.

    For failures that only one rank sees (rank 0 writes the checkpoints): raising there alone would leave the
    other ranks waiting in their next collective until torchrun's timeout.
    """
    message = broadcast_object(None if error is None else str(error), source)
    if error is not None:
        raise error
    if message is not None:
        raise as_type(message)


def barrier() -> None:
    if not in_process_group():
        return
    if torch.distributed.get_backend() == "nccl":
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def destroy_process_group() -> None:
    global _wait_group
    if in_process_group():
        torch.distributed.destroy_process_group()  # every group, the wait group too
    _wait_group = None
