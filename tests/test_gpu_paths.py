"""GPU paths whose mechanism can be checked on the CPU: the autocast type of DataParallel's replica threads.

DataParallel runs each replica in a thread of its own that enters autocast without a type, as
``torch.nn.parallel.parallel_apply`` does; the thread's default type then ran (float16 on CUDA) instead of the
configured bfloat16. On the CPU the default is bfloat16, so asking for float16 shows the same mistake.
"""

import threading

import pytest
import torch

from engine.distributed import wrap_model
from engine.precision import in_callers_autocast


def matmul_dtype(images: torch.Tensor) -> torch.dtype:
    """A replica: the type its matrix product ran in (autocast decides it)."""
    return torch.mm(images, images).dtype


def in_a_replica_thread(replica, images: torch.Tensor):
    """``replica(images)`` as torch.nn.parallel.parallel_apply calls it: in a new thread that enters autocast
    (enabled as in the caller's thread) without a type."""
    enabled, result = torch.is_autocast_enabled("cpu"), {}

    def worker():
        with torch.amp.autocast("cpu", enabled=enabled):
            result["output"] = replica(images)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    return result["output"]


@pytest.mark.parametrize("configured", [torch.float16, torch.bfloat16])
def test_replicas_run_the_autocast_type_of_their_caller(configured):
    with torch.autocast("cpu", configured):
        (replica,) = in_callers_autocast([matmul_dtype], "cpu")
        assert in_a_replica_thread(replica, torch.ones(4, 4)) == configured


def test_replicas_outside_autocast_run_in_float32():
    (replica,) = in_callers_autocast([matmul_dtype], "cpu")
    assert replica is matmul_dtype
    assert replica(torch.ones(4, 4)) == torch.float32


class ComputeDtype(torch.nn.Module):
    """Returns, for every sample, a code of the type its convolution ran in (0 float32, 1 float16, 2 bfloat16)."""

    CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, images):
        code = self.CODES[self.conv(images).dtype]
        return torch.full((len(images),), code, device=images.device)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs CUDA with 2 GPUs")
@pytest.mark.parametrize("configured", [torch.float16, torch.bfloat16])
def test_data_parallel_replicas_run_the_configured_amp_dtype(configured):
    model = wrap_model(ComputeDtype().cuda(), torch.device("cuda", 0), 2, "dp")
    assert isinstance(model, torch.nn.DataParallel)
    with torch.autocast("cuda", configured):
        codes = model(torch.ones(8, 3, 4, 4, device="cuda"))
    assert codes.tolist() == [ComputeDtype.CODES[configured]] * 8
