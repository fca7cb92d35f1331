"""The code paths that differ on GPUs, checked on the CPU: fake device counts and CUDA random states, an
enabled GradScaler, a one-rank Gloo group in this process, and `make gpu-check` refusing to run without CUDA.

What only a GPU can show (NCCL, AMP, channels_last, a bit-identical resume on CUDA) is `make gpu-check`'s job
(tools/gpu_check.py), and that of the GPU tests at the end of test_distributed.py.
"""

import io
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import isolated_training
from fault_utils import assert_same_weights, load_weights
from test_trainer import make_split, make_trainer
from torch import nn

from engine.distributed import module_to_evaluate, select_device, wrap_model
from engine.rng import capture_rng_state, restore_rng_state
from engine.run import configure_reproducibility
from engine.tracking import MLflowTracker, ModelCard
from ptengine.config import ConfigError
from ptengine.tools.train_net import main

REPO = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FAKE_CUDA_STATES = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)]


# ---- devices and processes -------------------------------------------------------------------------------
@pytest.mark.parametrize("local_rank", ["0", "2"])
def test_more_processes_per_node_than_gpus_is_one_config_error_on_every_rank(monkeypatch, local_rank):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", local_rank)

    with pytest.raises(ConfigError, match=r"torchrun starts 3 processes per node but 2 GPU\(s\) are usable .*"
                                          r"--nproc_per_node 2, or TRAIN.GPUS 0"):
        select_device(-1, "ddp", available=2)


def test_ddp_on_fewer_gpus_than_visible_counts_the_gpus_it_may_use(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")

    with pytest.raises(ConfigError, match=r"2 processes per node but 1 GPU\(s\) are usable \(TRAIN.GPUS 1, 4 visible"):
        select_device(1, "ddp", available=4)


@pytest.fixture
def one_rank_group():
    """A Gloo process group of this process alone, as ``torchrun --nproc_per_node 1`` gives a worker."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_evaluation_runs_the_module_inside_ddp_and_keeps_data_parallel(one_rank_group):
    model = nn.Linear(4, 2)
    ddp = wrap_model(model, torch.device("cpu"), 0, "ddp")
    assert isinstance(ddp, nn.parallel.DistributedDataParallel)

    assert module_to_evaluate(ddp) is model
    data_parallel = nn.DataParallel(model)
    assert module_to_evaluate(data_parallel) is data_parallel


def test_sync_bn_on_the_cpu_under_ddp_is_a_config_error_before_training(one_rank_group):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(ConfigError, match="TRAIN.SYNC_BN True needs GPUs .* set TRAIN.SYNC_BN False"):
        wrap_model(model, torch.device("cpu"), 0, "ddp", sync_bn=True)


# ---- random states ---------------------------------------------------------------------------------------
def test_cuda_random_states_of_more_gpus_than_visible_restore_the_first(monkeypatch):
    state = capture_rng_state()
    state["cuda"] = list(FAKE_CUDA_STATES)  # written on two GPUs, resumed on one (TRAIN.GPUS may change)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device: restored.append((device, new_state)))

    restore_rng_state(state)

    assert restored == [(0, FAKE_CUDA_STATES[0])]


def test_a_checkpoint_with_the_cuda_states_of_two_gpus_resumes_on_the_cpu(small_run_opts, run_dir):
    small_run_opts = [*small_run_opts, "MLFLOW.ENABLED", "False"]  # about the checkpoint: no MLflow run needed
    straight = [*small_run_opts, "TRAIN.MAX_EPOCHS", "2", "OUTPUT_DIR", str(run_dir / "straight")]
    assert main(straight) == 0
    assert main(small_run_opts) == 0  # one epoch into run_dir/output
    checkpoint_path = run_dir / "output" / "checkpoint_00000006.pth"
    checkpoint = load_weights(checkpoint_path)
    assert len(checkpoint["rng"]) == 1  # one entry per rank
    checkpoint["rng"][0]["cuda"] = list(FAKE_CUDA_STATES)  # as torch.cuda.get_rng_state_all() gives them
    torch.save(checkpoint, checkpoint_path)

    assert main([*small_run_opts, "TRAIN.MAX_EPOCHS", "2", "--resume"]) == 0

    log = (run_dir / "output" / "log.txt").read_text()
    assert "resumed from checkpoint_00000006.pth at iteration 6" in log
    assert "the checkpoint holds the CUDA random states of 2 GPU(s), 0 visible now: restored 0" in log
    assert_same_weights(run_dir / "output" / "model_final.pth", run_dir / "straight" / "model_final.pth")


# ---- AMP, cuDNN, MLflow ------------------------------------------------------------------------------------
def test_a_checkpoint_written_without_amp_resumes_with_amp_on():
    split = make_split(16)
    without_amp = make_trainer(split, batch_size=8)
    without_amp.train()
    with_amp = make_trainer(split, batch_size=8)
    with_amp.scaler = torch.amp.GradScaler("cpu", enabled=True)  # as TRAIN.AMP True on a GPU has it

    with_amp.load_state_dict(without_amp.state_dict())

    assert with_amp.iter == 2
    assert with_amp.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()  # the initial scale


def test_deterministic_false_lets_cudnn_pick_the_fastest_algorithms(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # put back afterwards, whatever the code sets
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        configure_reproducibility(0, deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic

        configure_reproducibility(0, deterministic=False)

        assert torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


@needs_cuda
def test_a_checkpoint_written_on_the_cpu_resumes_on_a_gpu_with_amp_on(small_run_opts, run_dir):
    with_amp = [*small_run_opts, "TRAIN.AMP", "True"]  # ignored on the CPU: the GradScaler state is empty
    assert main([*with_amp, "TRAIN.GPUS", "0"]) == 0

    assert main([*with_amp, "TRAIN.GPUS", "1", "TRAIN.MAX_EPOCHS", "2", "--resume"]) == 0
    log = (run_dir / "output" / "log.txt").read_text()
    assert "the checkpoint was written without AMP: the GradScaler starts from its initial scale" in log


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_logging_the_model_leaves_the_live_model_as_it_was(tmp_path, device):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).to(device).train()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    parameters = list(model.parameters())
    with isolated_training(tmp_path):
        tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "models")
        tracker.start({})
        try:
            card = ModelCard({"class_names": ["a", "b"], "channels": 1, "height": 2, "width": 2, "mean": [0.0],
                              "std": [1.0]}, example=tiny_png())
            model_uri = tracker.log_model(model, torch.zeros(2, 1, 2, 2), card)
        finally:
            tracker.end()

    assert model_uri is not None
    assert model.training  # still training: log_model evaluates a copy
    assert list(model.parameters()) == parameters and all(p.device.type == device for p in parameters)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id).info.status == "FINISHED"


def tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- make gpu-check ----------------------------------------------------------------------------------------
# (without CUDA: tests/test_gpu_check.py)
def test_make_gpu_check_runs_the_check():
    done = subprocess.run(["make", "-n", "gpu-check"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "tools/gpu_check.py" in done.stdout
