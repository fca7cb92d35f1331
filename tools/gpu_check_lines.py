"""The lines of ``make gpu-check``: one function per GPU path, each a Verdict against an exact or tight reference.

The trainings are digits with ResNet-18 (BatchNorm) as tools/train_net.py runs them (tools/gpu_check_runs.py);
a few lines build the engine's objects in this process instead (the batch sources, the benchmark's modes). Every
comparison of float32 results runs without TensorFloat-32, so that they agree to float32 rounding
(tools/gpu_check_hooks.py --float32-exact). Runs that several lines compare with are made once (``Check``).
"""

import functools
import math
import re
import shutil
import signal
from pathlib import Path

import torch

from ptengine.tools.gpu_check_inprocess import (
    FOLDER_TRAIN_IMAGES,
    compare_folder_and_memory_batches,
    compare_logged_model,
    engine_against_bare_loop,
    write_image_folder,
)
from ptengine.tools.gpu_check_runs import TORCHRUN_SIGNALS, Finished, Workspace, progress, wait_for
from ptengine.tools.gpu_check_table import Verdict, skipped, verdict

LOSS_STEPS = 10  # the first steps whose train_loss two float32 runs must share
LOSS_TOLERANCE = 1e-3  # their largest relative difference (float32 rounding grows to ~1e-5 in 10 steps)
ACCURACY_TOLERANCE = 0.03  # val_acc1 of bfloat16 against float32 after 3 epochs: 13 of 449 images
DATA_ITEMS = 1348  # training images of config/digits.yaml
FLOAT32 = ("TRAIN.GPUS", "1", "TRAIN.AMP", "False", "TRAIN.CHANNELS_LAST", "True", "TRAIN.MAX_EPOCHS", "3")
EXACT = ("--float32-exact",)
SPEED_TARGET = 0.95
# Checkpoint entries two runs of the same training may differ in: the config names OUTPUT_DIR, the MLflow run is
# each run's own, and the random states are per process (nothing draws from them in these trainings).
NOT_COMPARED = {"config", "rng", "mlflow_run_id"}


def global_batch(gpus: int) -> int:
    """A global batch every process count of the check divides (N, and 1 for the fewer-GPU resume)."""
    return 64 if 64 % gpus == 0 else 8 * gpus


class Check:
    """The lines, sharing the workspace and the runs that several of them compare with."""

    def __init__(self, workspace: Workspace):
        self.workspace, self.gpus = workspace, workspace.gpus
        self.batch = global_batch(self.gpus)
        self.iters_per_epoch = math.ceil(DATA_ITEMS / self.batch)
        self.batch_opts = ("TRAIN.BATCH_SIZE", str(self.batch))

    def train(self, name: str, opts, hooks=(), processes: int = 0, resume: bool = False) -> Finished:
        return self.workspace.train(name, [*self.batch_opts, *opts], hooks, processes, resume)

    def started(self, name: str, opts, hooks=(), processes: int = 0, torchrun_options=()):
        return self.workspace.start(name, [*self.batch_opts, *opts], hooks, processes, torchrun_options)

    @functools.cached_property
    def float32_cuda(self) -> Finished:
        """One GPU, float32, channels_last, 3 epochs, the model logged: the reference of several lines."""
        return self.finished(self.train("float32-cuda", [*FLOAT32, "MLFLOW.LOG_MODEL", "True"], EXACT))

    @functools.cached_property
    def ddp_all_gpus(self) -> Finished:
        """The same under torchrun on every GPU (NCCL), each rank recording its BatchNorm statistics."""
        return self.finished(self.train("ddp", FLOAT32, (*EXACT, "--record-bn"), processes=self.gpus))

    @functools.cached_property
    def ddp_sync_bn(self) -> Finished:
        return self.finished(self.train("ddp-sync-bn", [*FLOAT32, "TRAIN.SYNC_BN", "True"], EXACT,
                                        processes=self.gpus))

    @staticmethod
    def finished(run: Finished) -> Finished:
        if run.code != 0:
            raise RuntimeError(run.summary())
        return run

    # ---- float32 -----------------------------------------------------------------------------------------
    def float32_channels_last_against_cpu(self) -> Verdict:
        cpu = self.finished(self.train("float32-cpu", ["TRAIN.GPUS", "0", "TRAIN.MAX_EPOCHS", "1"]))
        gpu, reference = self.float32_cuda.history("train_loss"), cpu.history("train_loss")
        first = relative_difference(gpu[:LOSS_STEPS], reference[:LOSS_STEPS])
        rest = relative_difference(gpu[LOSS_STEPS:len(reference)], reference[LOSS_STEPS:])
        return verdict(first <= LOSS_TOLERANCE, f"train_loss of steps 1-{LOSS_STEPS} within {first:.1e} of the "
                       f"CPU's (<= {LOSS_TOLERANCE:g}); steps {LOSS_STEPS + 1}-{len(reference)}: {rest:.1e}")

    # ---- float16 with a GradScaler ----------------------------------------------------------------------
    def float16_grad_scaler(self) -> Verdict:
        total = 2 * math.ceil(math.ceil(DATA_ITEMS / 64) / 2)  # 2 epochs of ACCUM_STEPS 2
        kill_at = total * 3 // 4 + (1 if total * 3 // 4 % 4 == 0 else 0)  # not a checkpoint step (period 4)
        forced = (3, total - 3)
        opts = ("TRAIN.BATCH_SIZE", "64", "TRAIN.GPUS", "1", "TRAIN.AMP", "True", "TRAIN.AMP_DTYPE", "float16",
                "TRAIN.ACCUM_STEPS", "2", "TRAIN.CLIP_GRAD_NORM", "1.0", "TRAIN.MAX_EPOCHS", "2",
                "CHECKPOINT.PERIOD", "4")
        hooks = ("--record-scale", "--overflow-at", ",".join(map(str, forced)))
        reference = self.finished(self.workspace.train("float16", opts, hooks))
        killed = self.workspace.train("float16-resumed", opts, (*hooks, "--kill-at", str(kill_at)))
        if killed.code != -signal.SIGKILL:
            return verdict(False, f"the run was not killed at iteration {kill_at}: {killed.summary()}")
        resumed = self.finished(self.workspace.train("float16-resumed", opts, hooks, resume=True))
        return compare_float16_runs(reference, resumed, forced)

    # ---- bfloat16 --------------------------------------------------------------------------------------
    def bfloat16_autocast(self) -> Verdict:
        opts = [*FLOAT32, "TRAIN.AMP", "True", "TRAIN.AMP_DTYPE", "bfloat16"]
        run = self.finished(self.train("bfloat16", opts, ("--record-dtypes",)))
        problem = dtype_problem(run, "bfloat16", [0])
        accuracy, reference = run.metric("val_acc1"), self.float32_cuda.metric("val_acc1")
        close = abs(accuracy - reference) <= ACCURACY_TOLERANCE
        detail = ("every Conv2d/Linear output bfloat16 in training and evaluation; " if not problem else
                  f"{problem}; ") + f"val_acc1 {accuracy:.4f}, float32 {reference:.4f} (+-{ACCURACY_TOLERANCE:g})"
        return verdict(not problem and close, detail)

    def data_parallel_amp(self, dtype: str) -> Verdict:
        if self.gpus < 2:
            return skipped(f"DataParallel needs 2 or more GPUs; {self.gpus} visible")
        opts = ["TRAIN.DISTRIBUTED_BACKEND", "dp", "TRAIN.GPUS", "-1", "TRAIN.AMP", "True", "TRAIN.AMP_DTYPE", dtype,
                "TRAIN.MAX_EPOCHS", "1"]
        run = self.finished(self.train(f"dp-{dtype}", opts, ("--record-dtypes",)))
        problem = dtype_problem(run, dtype, range(self.gpus))
        recorded = run.mlflow_run().data.tags.get("amp_dtype")
        if recorded != dtype:
            problem = f"{problem + '; ' if problem else ''}the run's tag amp_dtype is {recorded}"
        finite = all(math.isfinite(value) for value in run.history("train_loss"))
        detail = problem or (f"every replica on {self.gpus} GPUs ran {dtype}, training and evaluation; "
                             f"tag amp_dtype {dtype}")
        return verdict(not problem and finite, detail + ("" if finite else "; a train_loss is not finite"))

    # ---- DDP -------------------------------------------------------------------------------------------
    def ddp_batchnorm(self) -> Verdict:
        run, reference = self.ddp_all_gpus, self.float32_cuda
        tags = run.mlflow_run().data.tags
        problems = [] if (tags.get("distributed_backend"), tags.get("world_size")) == ("nccl", str(self.gpus)) else \
            [f"tags say backend {tags.get('distributed_backend')}, world_size {tags.get('world_size')}"]
        problems += batchnorm_problems(run, self.gpus)
        one_process = self.ddp_sync_bn if self.gpus > 1 else run
        difference = relative_difference(one_process.history("train_loss")[:LOSS_STEPS],
                                         reference.history("train_loss")[:LOSS_STEPS])
        if difference > LOSS_TOLERANCE:
            problems.append(f"train_loss of the first {LOSS_STEPS} steps {difference:.1e} from one GPU's")
        evaluated = self.finished(self.workspace.train(
            "ddp-eval-only", [*self.batch_opts, *FLOAT32, "--eval-only", "MODEL.WEIGHTS",
                              str(run.output_dir / "model_final.pth")], EXACT))
        logged, again = run.metric("val_acc1"), evaluated.metric("val_acc1")
        if logged != again:
            problems.append(f"--eval-only of model_final.pth gives val_acc1 {again:.4f}, the run logged {logged:.4f}")
        compared = "SyncBatchNorm " if self.gpus > 1 else ""
        return verdict(not problems, "; ".join(problems) or (
            f"NCCL, {self.gpus} rank(s): BatchNorm statistics equal on every rank at every evaluation; {compared}"
            f"train_loss within {difference:.1e} of one GPU's; --eval-only repeats val_acc1 {logged:.4f}"))

    def ddp_resume(self) -> Verdict:
        reference = self.ddp_all_gpus
        kill_at = 2 * self.iters_per_epoch - 3
        opts = (*FLOAT32, "CHECKPOINT.PERIOD", "10")
        killed = self.train("ddp-resumed", opts, (*EXACT, "--kill-at", str(kill_at)), processes=self.gpus)
        if killed.code == 0:
            return verdict(False, f"the run was not killed at iteration {kill_at}")
        resumed = self.finished(self.train("ddp-resumed", opts, EXACT, processes=self.gpus, resume=True))
        return compare_resumed(resumed, reference, 1e-6, f"{self.gpus} rank(s) killed with SIGKILL at {kill_at}")

    def resume_on_fewer_gpus(self) -> Verdict:
        if self.gpus < 2:
            return skipped(f"needs 2 or more GPUs to save on; {self.gpus} visible")
        kill_at = 2 * self.iters_per_epoch - 3
        opts = (*FLOAT32, "TRAIN.SYNC_BN", "True", "CHECKPOINT.PERIOD", "10")
        killed = self.train("fewer-gpus", opts, (*EXACT, "--kill-at", str(kill_at)), processes=self.gpus)
        if killed.code == 0:
            return verdict(False, f"the run was not killed at iteration {kill_at}")
        resumed = self.finished(self.train("fewer-gpus", opts, EXACT, processes=1, resume=True))
        return compare_resumed(resumed, self.ddp_sync_bn, 1e-3, f"saved by {self.gpus} ranks, resumed on 1")

    # ---- torch.compile, EMA, mixup / cutmix --------------------------------------------------------------
    def compile_ema_mixup_resume(self) -> Verdict:
        # 517 validation images leave 1,280 to train on: 20 full batches, so one compiled shape.
        opts = ("TRAIN.BATCH_SIZE", "64", "DATA.VALIDATION_SIZE", "0.2877", "TRAIN.GPUS", "1", "TRAIN.AMP", "True",
                "TRAIN.AMP_DTYPE", "bfloat16", "TRAIN.CHANNELS_LAST", "True", "TRAIN.COMPILE", "True",
                "TRAIN.EMA_DECAY", "0.99", "TRAIN.MIXUP_ALPHA", "0.2", "TRAIN.CUTMIX_ALPHA", "1.0",
                "TRAIN.LABEL_SMOOTHING", "0.1", "TRAIN.MAX_EPOCHS", "2", "CHECKPOINT.PERIOD", "10")
        train = self.workspace.train
        reference = self.finished(train("compiled", opts))
        killed = train("compiled-resumed", opts, ("--kill-at", "25"))
        if killed.code != -signal.SIGKILL:
            return verdict(False, f"the run was not killed at iteration 25: {killed.summary()}")
        root = self.workspace.root
        shutil.copytree(root / "compiled-resumed", root / "eager-resumed")
        compiled = self.finished(train("compiled-resumed", opts, resume=True))
        eager = self.finished(train("eager-resumed", [*opts, "TRAIN.COMPILE", "False"], resume=True))
        expected = reference.checkpoint(40)
        different = different_entries(compiled.checkpoint(40), expected)
        drift = update_difference(eager.checkpoint(40), expected, eager.checkpoint(20))
        eager_state = eager.checkpoint(40)
        counted = eager_state["hooks"]["EMAHook"]["updates"] == 40 and eager_state["iteration"] == 40
        passed = not different and drift <= 0.2 and counted
        return verdict(passed, (f"compiled resume differs in {different[:3]}; " if different else
                                "compiled resume bit-identical (weights, EMA, optimizer); ")
                       + f"eager resume: weights' update within {drift:.1%} of the compiled run's (<= 20%)"
                       + ("" if counted else f", but at iteration {eager_state['iteration']} with "
                                             f"{eager_state['hooks']['EMAHook']['updates']} EMA updates"))

    # ---- image-folder data -----------------------------------------------------------------------------------
    def image_folder_batches(self) -> Verdict:
        return compare_folder_and_memory_batches(self.image_folder, torch.device("cuda", 0))

    @functools.cached_property
    def image_folder(self) -> Path:
        return write_image_folder(self.workspace.root / "images")

    def stop_signal_under_torchrun(self, signum: int) -> Verdict:
        name = signal.Signals(signum).name
        classes = sorted(path.name for path in (self.image_folder / "train").iterdir())
        opts = ("DATA.DATASET_TYPE", "image_folder", "DATA.ROOT", str(self.image_folder), "DATA.INPUT_DIM", "3",
                "DATA.CLASSES", repr(classes), "DATA.NUM_WORKERS", "2", "TRAIN.MAX_EPOCHS", "3", "LOG.PERIOD", "2")
        iters_per_epoch = math.ceil(FOLDER_TRAIN_IMAGES / self.batch)
        run_name = f"signal-{name}"
        launch = self.started(run_name, opts, ("--progress", "--slow-step", "0.2"), processes=self.gpus,
                              torchrun_options=TORCHRUN_SIGNALS)
        records = self.workspace.root / f"{run_name}.records"
        wait_for(lambda: progress(records) >= iters_per_epoch + 3, "the second epoch (after an evaluation)", launch)
        if signum == signal.SIGTERM:
            launch.process.send_signal(signum)  # to torchrun, which passes it on to each worker's process group
        else:
            launch.signal_tree(signum)  # to every process, as Slurm's scancel --signal does
        run = Finished(self.workspace, run_name, launch.wait(120), launch.seconds)
        return judge_stop(run, self.gpus)

    # ---- the logged model ----------------------------------------------------------------------------------
    def logged_model_on_the_cpu(self) -> Verdict:
        return compare_logged_model(self.workspace, self.float32_cuda)

    # ---- speed -----------------------------------------------------------------------------------------------
    def speed(self) -> Verdict:
        engine, bare = engine_against_bare_loop(self.workspace.root / "benchmark")
        ratio = engine / bare
        return verdict(ratio >= SPEED_TARGET, f"engine {engine:,.0f} img/s, bare loop {bare:,.0f} img/s: "
                       f"{ratio:.3f}x (>= {SPEED_TARGET:g}x)")


# ---- comparisons ------------------------------------------------------------------------------------------------
def relative_difference(values: list[float], reference: list[float]) -> float:
    if len(values) != len(reference) or not reference:
        return math.inf
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(values, reference, strict=True))


def different_entries(state: dict, expected: dict, prefix: str = "") -> list[str]:
    """The keys (nested, dotted) whose values are not bit-identical."""
    if isinstance(expected, dict):
        if not isinstance(state, dict) or state.keys() != expected.keys():
            return [prefix or "(keys)"]
        found = []
        for key in expected:
            if key not in NOT_COMPARED:
                found += different_entries(state[key], expected[key], f"{prefix}.{key}" if prefix else str(key))
        return found
    if isinstance(expected, torch.Tensor):
        same = isinstance(state, torch.Tensor) and state.dtype == expected.dtype and torch.equal(state, expected)
        return [] if same else [prefix]
    if isinstance(expected, list | tuple):
        if len(state) != len(expected):
            return [prefix]
        return [name for i, (a, b) in enumerate(zip(state, expected, strict=True))
                for name in different_entries(a, b, f"{prefix}[{i}]")]
    return [] if state == expected else [prefix]


def update_difference(state: dict, expected: dict, start: dict) -> float:
    """How far ``state``'s weights are from ``expected``'s, relative to how far ``expected`` moved from ``start``."""
    keys = [k for k, v in expected["model"].items() if v.is_floating_point()]
    apart = sum((state["model"][k].double() - expected["model"][k].double()).square().sum() for k in keys)
    moved = sum((expected["model"][k].double() - start["model"][k].double()).square().sum() for k in keys)
    return float((apart / moved).sqrt()) if moved > 0 else math.inf


def max_weight_difference(weights: dict, reference: dict) -> float:
    """The largest difference of any float tensor, relative to that tensor's largest magnitude."""
    return max(((weights[k].double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-12)).item()
               for k, v in reference.items() if v.is_floating_point())


def compare_resumed(resumed: Finished, reference: Finished, tolerance: float, story: str) -> Verdict:
    found = re.search(r"resumed from (checkpoint_\d+\.pth) at iteration (\d+)", resumed.output)
    if not found:
        return verdict(False, f"{story}: the resumed run did not say where it resumed from")
    difference = max_weight_difference(resumed.model_final(), reference.model_final())
    same_run = resumed.mlflow_run().info.status == "FINISHED"
    detail = (f"{story}, resumed from {found.group(1)}: final weights within {difference:.1e} of the uninterrupted "
              f"run's (<= {tolerance:g}); MLflow run {'FINISHED' if same_run else 'not FINISHED'}")
    return verdict(difference <= tolerance and same_run, detail)


def compare_float16_runs(reference: Finished, resumed: Finished, forced: tuple[int, ...]) -> Verdict:
    problems = []
    overflows = {line["iter"]: line for line in reference.record_lines("overflow")}
    for step in forced:
        line = overflows.get(step, {})
        if not line.get("weights_unchanged") or line.get("scale_after") != 2.0**39:
            problems.append(f"the forced overflow at step {step} was not skipped ({line or 'no record'})")
    scales = reference.record_lines("scale")
    natural = [line["iter"] for line in scales if line["after"] < line["before"] and line["iter"] not in forced]
    losses = reference.history("train_loss") + resumed.history("train_loss")
    if not all(math.isfinite(value) for value in losses):
        problems.append("a train_loss is NaN or inf")
    last = max(line["iter"] for line in scales)
    different = different_entries(resumed.checkpoint(last), reference.checkpoint(last))
    if different:
        problems.append(f"after kill -9 and --resume, checkpoint {last} differs in {different[:4]}")
    after = {line["iter"]: line["after"] for line in resumed.record_lines("scale")}
    if any(after.get(line["iter"]) != line["after"] for line in scales):
        problems.append("the loss scale after some step differs between the resumed and the uninterrupted run")
    return verdict(not problems, "; ".join(problems) or (
        f"steps {', '.join(map(str, forced))} forced to overflow: skipped, weights unchanged, scale halved; "
        f"{len(natural)} other step(s) skipped; losses finite; after kill -9, checkpoint {last} (scaler "
        f"{reference.checkpoint(last)['scaler'].get('scale')}, weights, optimizer) bit-identical"))


def dtype_problem(run: Finished, dtype: str, devices) -> str:
    """What differs from: every Conv2d/Linear output in ``dtype``, training and evaluation, on each device."""
    counts = run.record("dtypes")
    expected = {f"{mode} cuda:{device} torch.{dtype}" for mode in ("train", "eval") for device in devices}
    others = sorted(key for key in counts if key not in expected)
    missing = sorted(expected - set(counts))
    if others:
        return f"outputs ran as {', '.join(others[:3])}"
    return f"nothing ran as {', '.join(missing[:3])}" if missing else ""


def batchnorm_problems(run: Finished, ranks: int) -> list[str]:
    """Every rank saw the same BatchNorm statistics at every evaluation (one set per layer, rank 0's)."""
    records = [run.record("bn", rank) for rank in range(ranks)]
    problems = []
    for iteration, layers in records[0].items():
        if any(len(digests) != 1 for digests in layers.values()):
            problems.append(f"at the evaluation of iteration {iteration}, statistics changed during it")
        for rank, record in enumerate(records[1:], 1):
            if record.get(iteration) != layers:
                problems.append(f"rank {rank}'s BatchNorm statistics differ from rank 0's at the evaluation of "
                                f"iteration {iteration}")
                break
    return problems or ([] if records[0] else ["no evaluation was recorded"])


def judge_stop(run: Finished, ranks: int) -> Verdict:
    output = run.output
    stopped = re.search(r"stopped by \S+ at iteration (\d+)", output)
    problems = []
    if run.code is None:
        problems.append("still running 120 s after the signal")
    if re.search(r"DataLoader worker \(pid[^)]*\) is killed by signal", output):
        problems.append("a DataLoader worker died of the signal")
    if not stopped:
        problems.append("no rank said 'stopped by ... at iteration N'")
    elif not (run.output_dir / f"checkpoint_{int(stopped.group(1)):08d}.pth").is_file():
        problems.append(f"no checkpoint of iteration {stopped.group(1)}")
    status = run.mlflow_run().info.status if (run.output_dir / "mlflow_run_id").is_file() else "(no run)"
    if status != "KILLED":
        problems.append(f"MLflow run {status}")
    return verdict(not problems, "; ".join(problems) or (
        f"{ranks} rank(s) with 2 DataLoader workers each: stopped at iteration {stopped.group(1)}, its checkpoint "
        f"written, MLflow run KILLED, exit code {run.code}"))


def line_functions(check: Check) -> list[tuple[str, object, tuple]]:
    """(name, function, arguments) of every line, in the order they run."""
    return [
        ("float32 resnet18 channels_last vs CPU", check.float32_channels_last_against_cpu, ()),
        ("float16 + GradScaler, accumulation, clipping", check.float16_grad_scaler, ()),
        ("bfloat16 autocast", check.bfloat16_autocast, ()),
        ("DataParallel + AMP float16", check.data_parallel_amp, ("float16",)),
        ("DataParallel + AMP bfloat16", check.data_parallel_amp, ("bfloat16",)),
        (f"DDP over NCCL, {check.gpus} rank(s), BatchNorm", check.ddp_batchnorm, ()),
        ("resume under DDP after kill -9", check.ddp_resume, ()),
        ("resume on fewer GPUs than saved", check.resume_on_fewer_gpus, ()),
        ("torch.compile, EMA, mixup/cutmix resume", check.compile_ema_mixup_resume, ()),
        ("image folder: workers, pinned, non_blocking", check.image_folder_batches, ()),
        ("SIGTERM under torchrun, DataLoader workers", check.stop_signal_under_torchrun, (signal.SIGTERM,)),
        ("SIGUSR1 under torchrun, DataLoader workers", check.stop_signal_under_torchrun, (signal.SIGUSR1,)),
        ("log_model of a GPU model, loaded on the CPU", check.logged_model_on_the_cpu, ()),
        ("speed: resnet18 AMP channels_last batch 256", check.speed, ()),
    ]
