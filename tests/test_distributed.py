"""Training under torchrun: two processes (Gloo on the CPU) train the model one process trains.

Every training runs the same ``tools/train_net.py`` command line (config/digits.yaml for 2 epochs) and is
started once per module by ``trainings``, all at the same time (each spends most of its ~30 s starting up):

    python tools/train_net.py ...                                           one process, the reference
    torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0,1} \\
             --master_addr 127.0.0.1 --master_port PORT tests/fault_utils.py ...   DDP: two "nodes" on one host
    torchrun --standalone --nproc_per_node 2 --max-restarts 1 ...           rank 0 SIGKILLed mid-training
    torchrun --standalone --nproc_per_node 1 ...                            a one-rank process group
    torchrun --standalone --nproc_per_node 2 tests/fault_utils.py ...       rank 1's loss becomes NaN

plus two launches that must stop with a clear error. How every rank shares out the batches is tested
without processes in test_batches.py.

The DDP training is launched as two nodes, so that one launch covers both the rendezvous over TCP and DDP
itself; the standalone two-process launch is the restarted one. After the SIGKILL, torchrun restarts both
workers and the engine resumes from the newest checkpoint. The DDP and restarted trainings run through
tests/fault_utils.py with its ``RankNoise`` hook: each rank draws from
torch's global generator every step, as dropout would, so that each rank's random stream can be followed.
"""

import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import torch
from fault_utils import DIGITS_CONFIG, TRAIN_NET, empty_store, free_port, process_env, sqlite_uri
from torchrun_utils import TORCHRUN, Launch

from engine.checkpoint import load_file
from ptengine.config import load_config
from ptengine.datasets import build_datasets

ITERS_PER_EPOCH = 22  # digits: 1,348 training images in batches of 64
MAX_ITER = 2 * ITERS_PER_EPOCH
RUN_OPTS = ["TRAIN.DISTRIBUTED_BACKEND", "ddp", "TRAIN.MAX_EPOCHS", "2", "LOG.PROGRESS_BAR", "False",
            "MLFLOW.LOG_MODEL", "False"]
WAIT = 300  # seconds for all trainings together; they take 60-120 s on two busy cores
RESTART_WAIT = 150  # seconds a restarted run may take after the kill (an uninterrupted run takes ~60 s)
RESTARTED = "restarted by torchrun"
ONE_RANK = "one rank under torchrun"
NAN_ON_RANK_1 = "nan on rank 1"
NO_RESTART = "a config error with restarts allowed"
FAULT_SCRIPT = Path(__file__).resolve().parent / "fault_utils.py"  # train_net.py with hooks chosen by FAULT_* variables
NOISE = process_env(FAULT_RANK_NOISE=".")  # RankNoise writes noise_rank<r>.txt into the training's folder


def torchrun(*flags, script=TRAIN_NET) -> list:
    return [TORCHRUN, *flags, script]


def needs_gpus(count: int):
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(available < count, reason="needs CUDA" if available == 0 else f"needs {count} GPUs")


@dataclass
class Training:
    """One training: its launchers (one per node), OUTPUT_DIR, MLflow store, and what was killed in it."""

    workdir: Path
    launches: list[Launch] = field(default_factory=list)
    killed_at: list[str] = field(default_factory=list)  # checkpoints that existed when a worker was killed

    @property
    def output_dir(self) -> Path:
        return self.workdir / "output"

    @property
    def tracking_uri(self) -> str:
        return sqlite_uri(self.workdir / "store")

    @property
    def returncodes(self) -> list[int | None]:
        return [launch.returncode for launch in self.launches]

    def report(self) -> str:
        return "\n".join(launch.output_tail() for launch in self.launches)

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(self.output_dir / "model_final.pth")

    def mlflow_runs(self) -> list:
        client = mlflow.MlflowClient(self.tracking_uri)
        return client.search_runs([e.experiment_id for e in client.search_experiments()])

    def history(self, key: str) -> dict[int, float]:
        """``{step: value}`` of one metric of the (only) MLflow run, by step; a step logged twice raises."""
        (run,) = self.mlflow_runs()
        metrics = mlflow.MlflowClient(self.tracking_uri).get_metric_history(run.info.run_id, key)
        steps = sorted(m.step for m in metrics)
        assert len(set(steps)) == len(steps), f"{key} logged twice at a step: {steps}"
        return {m.step: m.value for m in sorted(metrics, key=lambda m: m.step)}

    def noise(self) -> dict[int, dict[int, str]]:
        """``{rank: {iteration: numbers}}`` drawn by the RankNoise hook; a step run twice keeps its last draw."""
        return {rank: {int(line.split()[0]): line.split(" ", 1)[1]
                       for line in (self.workdir / f"noise_rank{rank}.txt").read_text().splitlines()}
                for rank in (0, 1)}

    def worker_stderr(self) -> list[str]:
        """What each worker printed on stderr (launched with ``--log-dir workers --redirects 3``)."""
        return [path.read_text() for path in sorted(self.workdir.glob("workers/*/attempt_0/*/stderr.log"))]


def start(root: Path, name: str, commands: list[list], *opts: str, env=None, store=True) -> Training:
    """Start ``commands`` (``train_net.py`` under a launcher, one per node) in ``root/name`` with RUN_OPTS;
    ``store``: in a copy of an empty MLflow store (else the run must never create one)."""
    training = Training(root / name.replace(" ", "_"))
    training.workdir.mkdir()
    if store:
        empty_store(training.workdir / "store")
    args = ["--config-file", DIGITS_CONFIG, *RUN_OPTS, "OUTPUT_DIR", training.output_dir,
            "MLFLOW.TRACKING_URI", training.tracking_uri, *opts]
    for node, command in enumerate(commands):
        training.launches.append(Launch([*command, *args], training.workdir, training.workdir / f"node{node}.log",
                                        env or process_env()))
    return training


def kill_rank0_after_the_first_checkpoint(trainings: list[Training], timeout: float) -> None:
    """SIGKILL rank 0 (it owns the MLflow run and writes the checkpoints) as soon as a checkpoint exists."""
    deadline = time.monotonic() + timeout
    waiting = list(trainings)
    while waiting and time.monotonic() < deadline:
        for training in list(waiting):
            checkpoints = sorted(p.name for p in training.output_dir.glob("checkpoint_*.pth"))
            rank0 = training.launches[0].workers().get(0)
            if checkpoints and rank0:
                os.kill(rank0, signal.SIGKILL)
                training.killed_at = checkpoints
            if training.killed_at or training.launches[0].process.poll() is not None:
                waiting.remove(training)
        time.sleep(0.02)


@pytest.fixture(scope="module")
def trainings(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    two_processes = ["--standalone", "--nproc_per_node", "2"]
    port = free_port()
    runs: dict[str, Training] = {}

    def launch(name, commands, *opts, env=None, store=True):
        runs[name] = start(root, name, commands, *opts, env=env, store=store)

    try:
        launch("one process", [[sys.executable, TRAIN_NET]])
        launch("ddp", [torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                                "--master_addr", "127.0.0.1", "--master_port", str(port), script=FAULT_SCRIPT)
                       for node in (0, 1)], env=NOISE)
        restart = [torchrun(*two_processes, "--max-restarts", "1", script=FAULT_SCRIPT)]
        launch(RESTARTED, restart, "CHECKPOINT.PERIOD", "5", env=NOISE)
        worker_logs = ("--log-dir", "workers", "--redirects", "3")
        with_worker_logs = torchrun(*two_processes, *worker_logs)
        launch("dp backend", [with_worker_logs], "TRAIN.DISTRIBUTED_BACKEND", "dp", store=False)
        launch("odd batch size", [with_worker_logs], "TRAIN.BATCH_SIZE", "63", store=False)
        launch(NO_RESTART, [torchrun(*two_processes, *worker_logs, "--max-restarts", "2")], "TRAIN.BATCH_SIZE", "63",
               store=False)
        launch(ONE_RANK, [torchrun("--standalone", "--nproc_per_node", "1")], "TRAIN.MAX_EPOCHS", "1")
        # Metrics are checked every 5 steps: the check after step 5 is where rank 1 alone has a NaN loss.
        launch(NAN_ON_RANK_1, [torchrun(*two_processes, *worker_logs, script=FAULT_SCRIPT)], "LOG.PERIOD", "5",
               env=process_env(FAULT_NAN_ON_RANK=1, FAULT_NAN_AT_STEP=5))

        deadline = time.monotonic() + WAIT
        kill_rank0_after_the_first_checkpoint([runs[RESTARTED]], WAIT)
        restart_deadline = min(deadline, time.monotonic() + RESTART_WAIT)
        for name, training in runs.items():
            for each in training.launches:
                each.wait(restart_deadline if name == RESTARTED else deadline)
        yield runs
    finally:
        for training in runs.values():
            for each in training.launches:
                each.kill()


def finished(trainings: dict[str, Training], name: str) -> Training:
    training = trainings[name]
    assert training.returncodes == [0] * len(training.launches), training.report()
    return training


def max_abs_difference(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert weights.keys() == reference.keys()
    return max((weights[k].double() - reference[k].double()).abs().max().item() for k in reference)


def assert_one_finished_run_with_every_step_once(training: Training, world_size: int, backend: str) -> None:
    runs = training.mlflow_runs()
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["world_size"] == str(world_size)
    assert runs[0].data.tags["distributed_backend"] == backend
    for key in ("train_loss", "lr"):
        assert list(training.history(key)) == list(range(1, MAX_ITER + 1)), key
    for key in ("val_loss", "val_acc1", "epoch"):
        assert list(training.history(key)) == [ITERS_PER_EPOCH, MAX_ITER], key


# ---- DDP (two nodes on one host) -------------------------------------------------------------------------
def test_two_ddp_processes_train_the_weights_of_one_process(trainings):
    one, ddp = finished(trainings, "one process"), finished(trainings, "ddp")
    assert len(ddp.launches) == 2  # two "nodes", each torchrun exited 0

    assert max_abs_difference(ddp.weights(), one.weights()) <= 1e-4


def test_a_ddp_training_is_one_mlflow_run_with_every_step_logged_once(trainings):
    assert_one_finished_run_with_every_step_once(finished(trainings, "ddp"), world_size=2, backend="gloo")
    assert_one_finished_run_with_every_step_once(finished(trainings, "one process"), world_size=1, backend="none")


def test_the_logged_train_loss_is_the_mean_over_the_global_batch(trainings):
    one, ddp = finished(trainings, "one process"), finished(trainings, "ddp")

    first_steps = range(1, 11)
    assert [ddp.history("train_loss")[step] for step in first_steps] == pytest.approx(
        [one.history("train_loss")[step] for step in first_steps], abs=1e-5)


def test_validation_is_shared_out_over_ranks_and_summed_exactly(trainings):
    one, ddp = finished(trainings, "one process"), finished(trainings, "ddp")
    cfg = load_config(str(DIGITS_CONFIG))
    # The last global batch holds one image: rank 1 evaluates none of it.
    assert len(build_datasets(cfg).val) % cfg.TRAIN.BATCH_SIZE == 1

    assert ddp.history("val_acc1") == pytest.approx(one.history("val_acc1"), abs=1e-6)
    assert ddp.history("val_loss") == pytest.approx(one.history("val_loss"), abs=1e-5)


# ---- a worker killed mid-training ------------------------------------------------------------------------
def test_a_worker_killed_mid_training_is_restarted_and_ends_as_if_never_killed(trainings):
    uninterrupted, restarted = finished(trainings, "ddp"), trainings[RESTARTED]
    assert restarted.killed_at, "no worker was killed"
    assert f"checkpoint_{MAX_ITER:08d}.pth" not in restarted.killed_at  # killed before the end of training
    assert restarted.returncodes == [0], restarted.report()

    assert max_abs_difference(restarted.weights(), uninterrupted.weights()) <= 1e-4
    assert_one_finished_run_with_every_step_once(restarted, world_size=2, backend="gloo")
    assert restarted.history("train_loss") == pytest.approx(uninterrupted.history("train_loss"), abs=1e-6)


def test_after_a_restart_each_rank_continues_its_own_random_stream(trainings):
    uninterrupted, restarted = finished(trainings, "ddp"), finished(trainings, RESTARTED)
    expected, drawn = uninterrupted.noise(), restarted.noise()
    assert list(drawn[1]) == list(range(1, MAX_ITER + 1))
    assert drawn[1][1] != drawn[0][1]  # two streams: rank 1 draws two numbers a step, rank 0 one

    assert drawn[0] == expected[0]
    assert drawn[1] == expected[1]  # not rank 0's stream, restored on rank 1


# ---- one process under torchrun ----------------------------------------------------------------------------
def test_one_process_under_torchrun_with_ddp_is_a_one_rank_process_group(trainings):
    one_rank, one = finished(trainings, ONE_RANK), finished(trainings, "one process")
    (run,) = one_rank.mlflow_runs()

    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "1"
    assert run.data.tags["distributed_backend"] == "gloo"
    steps = range(1, ITERS_PER_EPOCH + 1)
    assert [one_rank.history("train_loss")[step] for step in steps] == pytest.approx(
        [one.history("train_loss")[step] for step in steps], abs=1e-6)


# ---- an error that one rank sees -----------------------------------------------------------------------------
def test_a_nan_loss_on_rank_1_alone_stops_every_rank_at_once_with_the_same_error(trainings):
    training = trainings[NAN_ON_RANK_1]
    assert None not in training.returncodes, "still running at the deadline:\n" + training.report()
    assert re.search(r"exitcode\s*:\s*2\b", training.report()), training.report()  # the user-error exit code
    printed = training.worker_stderr()

    assert len(printed) == 2 and not any("Traceback" in text for text in printed), printed
    last_lines = {text.strip().splitlines()[-1] for text in printed}
    assert len(last_lines) == 1, last_lines  # the same line on both ranks
    assert last_lines.pop().startswith("error: the training loss became NaN or inf at iteration 5 (epoch 1); ")
    (run,) = training.mlflow_runs()
    assert run.info.status == "FAILED"


# ---- mistakes under torchrun -----------------------------------------------------------------------------
def assert_every_worker_printed_one_error_line(training: Training, *fragments: str) -> None:
    assert training.returncodes != [0]
    printed = [text for text in training.worker_stderr() if text]  # torchrun may stop a worker before it prints
    assert printed, training.report()
    for text in printed:
        assert text.count("\n") == 1 and text.startswith("error: "), text
        assert all(fragment in text for fragment in fragments), text
    assert re.search(r"exitcode\s*:\s*2\b", training.report()), training.report()  # the user-error exit code
    assert not (training.workdir / "store").exists()  # no MLflow run was started


def test_an_error_every_rank_agreed_on_ends_the_job_without_a_restart(trainings):
    training = trainings[NO_RESTART]  # torchrun --max-restarts 2 would repeat the same error twice more
    assert None not in training.returncodes and training.returncodes != [0], training.report()
    attempts = sorted(path.name for path in training.workdir.glob("workers/*/attempt_*"))
    assert attempts == ["attempt_0"], training.report()
    printed = training.worker_stderr()
    assert len(printed) == 2 and all(text.startswith("error: TRAIN.BATCH_SIZE 63 ") for text in printed), printed
    told = "".join(path.read_text() for path in training.workdir.glob("workers/*/attempt_0/0/stdout.log"))
    assert "this error would repeat after a restart: ending the torchrun job (no restart)" in told


def test_the_dp_backend_under_torchrun_is_one_clear_error(trainings):
    assert_every_worker_printed_one_error_line(trainings["dp backend"], "TRAIN.DISTRIBUTED_BACKEND is 'dp'",
                                               "TRAIN.DISTRIBUTED_BACKEND ddp")


def test_a_batch_size_that_does_not_divide_over_the_processes_is_one_clear_error(trainings):
    assert_every_worker_printed_one_error_line(trainings["odd batch size"], "TRAIN.BATCH_SIZE 63",
                                               "multiple of 2")


# ---- GPUs ------------------------------------------------------------------------------------------------
def run_to_the_end(*trainings: Training) -> None:
    deadline = time.monotonic() + WAIT
    try:
        for training in trainings:
            for launch in training.launches:
                launch.wait(deadline)
    finally:
        for training in trainings:
            for launch in training.launches:
                launch.kill()
    for training in trainings:
        assert training.returncodes == [0] * len(training.launches), training.report()


# TF32 convolutions (on by default on recent GPUs) round differently for different batch splits.
GPU_TOLERANCE = 1e-3


@needs_gpus(2)
def test_nccl_ddp_on_two_gpus_trains_the_weights_of_one_gpu(tmp_path):
    one_gpu = start(tmp_path, "one gpu", [[sys.executable, TRAIN_NET]], "TRAIN.GPUS", "1")
    nccl = start(tmp_path, "nccl", [torchrun("--standalone", "--nproc_per_node", "2")])
    run_to_the_end(one_gpu, nccl)

    assert max_abs_difference(nccl.weights(), one_gpu.weights()) <= GPU_TOLERANCE
    assert_one_finished_run_with_every_step_once(nccl, world_size=2, backend="nccl")


@needs_gpus(2)
def test_data_parallel_on_two_gpus_trains_the_weights_of_one_gpu(tmp_path):
    one_gpu = start(tmp_path, "one gpu", [[sys.executable, TRAIN_NET]], "TRAIN.DISTRIBUTED_BACKEND", "dp",
                    "TRAIN.GPUS", "1")
    two_gpus = start(tmp_path, "data parallel", [[sys.executable, TRAIN_NET]], "TRAIN.DISTRIBUTED_BACKEND", "dp",
                     "TRAIN.GPUS", "2")
    run_to_the_end(one_gpu, two_gpus)

    assert max_abs_difference(two_gpus.weights(), one_gpu.weights()) <= GPU_TOLERANCE
    assert_one_finished_run_with_every_step_once(two_gpus, world_size=1, backend="none")


@needs_gpus(1)
def test_one_process_under_torchrun_on_a_gpu_is_a_one_rank_nccl_group_bound_to_its_device(tmp_path):
    one_rank = start(tmp_path, "nccl", [torchrun("--standalone", "--nproc_per_node", "1", "--log-dir", "workers",
                                                 "--redirects", "3")], "TRAIN.MAX_EPOCHS", "1")
    run_to_the_end(one_rank)

    (run,) = one_rank.mlflow_runs()
    assert (run.data.tags["world_size"], run.data.tags["distributed_backend"]) == ("1", "nccl")
    printed = "".join(one_rank.worker_stderr())
    assert "barrier(): using the device" not in printed and "device_id" not in printed, printed


@needs_gpus(1)
def test_more_processes_per_node_than_gpus_is_one_clear_error(tmp_path):
    processes = torch.cuda.device_count() + 1
    training = start(tmp_path, "too many", [torchrun("--standalone", "--nproc_per_node", str(processes),
                                                     "--log-dir", "workers", "--redirects", "3")])
    for launch in training.launches:
        launch.wait(time.monotonic() + WAIT)

    assert_every_worker_printed_one_error_line(training, f"torchrun starts {processes} processes per node",
                                               f"--nproc_per_node {processes - 1}")


@needs_gpus(1)
def test_ddp_with_gpus_0_trains_on_the_cpu_with_gloo_where_cuda_is_visible(tmp_path):
    cpu = start(tmp_path, "cpu", [torchrun("--standalone", "--nproc_per_node", "2")], "TRAIN.GPUS", "0")
    run_to_the_end(cpu)

    (run,) = cpu.mlflow_runs()
    assert run.data.tags["device"].startswith("cpu")
    assert_one_finished_run_with_every_step_once(cpu, world_size=2, backend="gloo")
