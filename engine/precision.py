"""Mixed precision: which autocast type runs where (``TRAIN.AMP``, ``TRAIN.AMP_DTYPE``)."""

import functools

import torch

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_runs_on(device, dtype: torch.dtype) -> bool:
    """bfloat16 autocast runs on CUDA and on the CPU; float16 on CUDA only (on the CPU it would be slow, and its
    GradScaler is a CUDA tool): there the run stays in float32."""
    return torch.device(device).type == "cuda" or dtype == torch.bfloat16


def needs_grad_scaler(dtype: torch.dtype) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none."""
    return dtype == torch.float16


def in_callers_autocast(replicas, device_type: str) -> list:
    """``replicas`` (callables) made to run under the autocast type of the calling thread, in any thread.

    DataParallel runs each replica in a thread of its own, entering autocast there without a type: the thread's
    default (float16 on CUDA) then ran instead of the caller's bfloat16, without the loss scaling float16 needs,
    while the run's record said bfloat16. Outside autocast the replicas are returned as they are.
    """
    if not torch.is_autocast_enabled(device_type):
        return list(replicas)
    dtype = torch.get_autocast_dtype(device_type)
    return [functools.partial(_call_in_autocast, replica, device_type, dtype) for replica in replicas]


def _call_in_autocast(replica, device_type: str, dtype: torch.dtype, *args, **kwargs):
    with torch.autocast(device_type, dtype):
        return replica(*args, **kwargs)
