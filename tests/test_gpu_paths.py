"""GPU paths whose mechanism can be checked on the CPU: the autocast type of DataParallel's replica threads, and
the fast or exact kernels a run chooses (TRAIN.DETERMINISTIC) and records, and the warning when CUDA does not
start on a machine with an NVIDIA driver.

DataParallel runs each replica in a thread of its own that enters autocast without a type, as
``torch.nn.parallel.parallel_apply`` does; the thread's default type then ran (float16 on CUDA) instead of the
configured bfloat16. On the CPU the default is bfloat16, so asking for float16 shows the same mistake.
"""

import logging
import threading

import pytest
import torch
from fault_utils import runs_of

from engine import distributed
from engine.distributed import select_device, wrap_model
from engine.precision import in_callers_autocast
from engine.run import configure_reproducibility
from ptengine.config import load_config
from ptengine.tools.train_net import main


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


@pytest.fixture
def torch_settings(monkeypatch):
    """Puts back the global settings configure_reproducibility changes."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
    torch.use_deterministic_algorithms(before[2], warn_only=before[3])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[4:]


def test_a_gpu_run_takes_the_fast_path_by_default(torch_settings):
    assert not load_config(None, []).TRAIN.DETERMINISTIC
    assert configure_reproducibility(0, deterministic=False, device="cuda") == "fast"
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"  # readable: torch.export and inductor read it


@pytest.mark.parametrize("deterministic, device", [(True, "cuda"), (False, "cpu"), (True, "cpu")])
def test_deterministic_or_on_the_cpu_the_run_is_exact(torch_settings, deterministic, device):
    assert configure_reproducibility(0, deterministic, device) == "exact"
    assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


def test_the_run_record_says_which_mode_ran(small_run_opts, run_dir):
    assert main(small_run_opts) == 0  # on the CPU: exact, whatever TRAIN.DETERMINISTIC says
    (run,) = runs_of(f"sqlite:///{run_dir / 'store' / 'mlflow.db'}", experiment="synthetic")
    assert run.data.tags["reproducibility"] == "exact"


@pytest.fixture
def engine_warnings():
    """The warnings the engine logs during the test."""
    told = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: told.append(record.getMessage())
    logging.getLogger("engine").addHandler(handler)
    yield told
    logging.getLogger("engine").removeHandler(handler)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA starts here")
def test_all_gpus_on_a_machine_whose_driver_cuda_cannot_use_is_a_warning(tmp_path, monkeypatch, engine_warnings):
    driver_file = tmp_path / "version"  # as /proc/driver/nvidia/version on a machine with an NVIDIA driver
    driver_file.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02\n")
    monkeypatch.setattr(distributed, "NVIDIA_DRIVER_FILES", (str(driver_file),))

    assert select_device(-1, "dp") == (torch.device("cpu"), 0)

    (warning,) = engine_warnings
    assert warning.startswith(f"TRAIN.GPUS -1 is training on the CPU: {driver_file} shows an NVIDIA driver, but ")
    assert ("CPU-only build" if torch.version.cuda is None else "CUDA did not start") in warning


def test_all_gpus_on_a_machine_without_a_gpu_is_no_warning(tmp_path, monkeypatch, engine_warnings):
    monkeypatch.setattr(distributed, "NVIDIA_DRIVER_FILES", (str(tmp_path / "absent"),))
    select_device(-1, "dp")
    assert engine_warnings == []
