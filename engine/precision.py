"""Mixed precision: which autocast type runs where (``TRAIN.AMP``, ``TRAIN.AMP_DTYPE``)."""

import torch

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_runs_on(device, dtype: torch.dtype) -> bool:
    """bfloat16 autocast runs on CUDA and on the CPU; float16 on CUDA only (on the CPU it would be slow, and its
    GradScaler is a CUDA tool): there the run stays in float32."""
    return torch.device(device).type == "cuda" or dtype == torch.bfloat16


def needs_grad_scaler(dtype: torch.dtype) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none."""
    return dtype == torch.float16
