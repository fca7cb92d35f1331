#!/usr/bin/env python
"""`make gpu-check`: check once, on your GPU machine, the code paths that only run on CUDA (about 5 minutes).

Every check prints one line, PASS or FAIL, with what it saw. The exit code is 0 when every check passed, 1
when one failed, and 2 when no CUDA device is visible. Each training is config/digits.yaml for 3 epochs,
run as a user runs it (tools/train_net.py in its own process), into a temporary folder with its own MLflow
store, removed at the end (``--keep`` keeps it and prints where).

    digits on CUDA: float32, AMP, AMP + TRAIN.CHANNELS_LAST    exit 0, and the model learns
    TRAIN.DISTRIBUTED_BACKEND dp on every visible GPU
    torchrun --nproc_per_node 1 with ddp: NCCL, a one-rank group (and one process per GPU with several)
    kill -9 mid-run, then --resume                   final weights bit-identical to the float32 run
    --eval-only of the float32 run's model_final     its last val_loss and val_acc1
    forced fp16 overflow                             the step is skipped, its loss is not NaN
    tools/benchmark.py --device cuda, small

``python tools/gpu_check.py --child kill|overflow ARGS`` is a training with a hook that kills it with SIGKILL
after step KILL_AT, or forces the GradScaler's scale so high that step OVERFLOW_AT overflows; the check starts
it itself.
"""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # as tools/train_net.py does

import torch  # noqa: E402

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TRAIN_NET = str(REPO / "tools" / "train_net.py")
KILL_AT, OVERFLOW_AT, HUGE_SCALE = 33, 3, 2.0**40
MIN_ACCURACY = 0.8  # digits after 3 epochs: about 0.9; chance is 0.1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return run_child(argv[1], argv[2:])
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "run it on a machine with an NVIDIA GPU and its driver", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        failed = GpuCheck(root).run_all()
    finally:
        if "--keep" in argv:
            print(f"gpu-check: everything is in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


class Training:
    """One finished process: its folder, exit code, output and MLflow run."""

    def __init__(self, name: str, output_dir: Path, code: int, output: str, seconds: float, store: str):
        self.name, self.output_dir, self.code, self.output, self.seconds = name, output_dir, code, output, seconds
        self.store = store

    def run(self):
        import mlflow

        return mlflow.MlflowClient(self.store).get_run((self.output_dir / "mlflow_run_id").read_text().strip())

    def metric(self, key: str) -> float:
        return self.run().data.metrics[key]

    def history(self, key: str) -> list[float]:
        import mlflow

        values = mlflow.MlflowClient(self.store).get_metric_history(self.run().info.run_id, key)
        return [m.value for m in sorted(values, key=lambda m: m.step)]

    def weights(self) -> dict:
        return torch.load(self.output_dir / "model_final.pth", map_location="cpu", weights_only=True)

    def summary(self) -> str:
        if self.code != 0:
            return f"exit code {self.code}: " + " | ".join(self.output.strip().splitlines()[-3:])
        return f"val_acc1 {self.metric('val_acc1'):.3f} in {self.seconds:.0f} s"


class GpuCheck:
    def __init__(self, root: Path):
        self.root, self.store = root, f"sqlite:///{root / 'mlflow.db'}"
        self.gpus = torch.cuda.device_count()
        self.failed: list[str] = []

    def train(self, name: str, *opts: str, launcher=(PYTHON, TRAIN_NET), timeout: float = 600) -> Training:
        output_dir = self.root / name
        args = ["--config-file", str(REPO / "config" / "digits.yaml"), "TRAIN.MAX_EPOCHS", "3",
                "LOG.PROGRESS_BAR", "False", "MLFLOW.LOG_MODEL", "False", "MLFLOW.TRACKING_URI", self.store,
                "MLFLOW.EXPERIMENT_NAME", "gpu-check", "OUTPUT_DIR", str(output_dir), *opts]
        return self.execute(name, [*launcher, *args], output_dir, timeout)

    def execute(self, name: str, command: list, output_dir: Path, timeout: float = 600) -> Training:
        started = time.monotonic()
        try:
            done = subprocess.run([str(part) for part in command], cwd=self.root, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            code, output = -1, f"still running after {timeout:.0f} s: {error.stderr or ''}"
        return Training(name, output_dir, code, output, time.monotonic() - started, self.store)

    def report(self, name: str, passed: bool, detail: str) -> None:
        print(f"{'PASS' if passed else 'FAIL'}  {name:<42} {detail}", flush=True)
        if not passed:
            self.failed.append(name)

    def check(self, name: str, function, *args) -> None:
        try:
            passed, detail = function(*args)
        except Exception as error:  # a check that breaks is a failed check, and the others still run
            passed, detail = False, f"{type(error).__name__}: {error}"
        self.report(name, passed, detail)

    def run_all(self) -> list[str]:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(self.gpus))
        print(f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, {self.gpus} GPU(s): {names}")
        reference = self.train("float32", "TRAIN.GPUS", "1", "TRAIN.AMP", "False")
        self.check("digits on CUDA, float32", learned, reference)
        self.check("digits on CUDA, AMP", learned, self.train("amp", "TRAIN.GPUS", "1", "TRAIN.AMP", "True"))
        self.check("digits on CUDA, AMP + channels_last", learned, self.train(
            "channels_last", "TRAIN.GPUS", "1", "TRAIN.AMP", "True", "TRAIN.CHANNELS_LAST", "True"))
        self.check(f"dp backend on {self.gpus} GPU(s)", learned, self.train(
            "dp", "TRAIN.DISTRIBUTED_BACKEND", "dp", "TRAIN.GPUS", "-1"))
        self.check("torchrun, 1 process, ddp over NCCL", self.torchrun_ddp, 1, reference)
        if self.gpus > 1:
            self.check(f"torchrun, {self.gpus} processes, ddp over NCCL", self.torchrun_ddp, self.gpus, reference)
        self.check("kill -9 mid-run, then --resume", self.kill_and_resume, reference)
        self.check("--eval-only of model_final.pth", self.eval_only, reference)
        self.check("forced fp16 overflow", self.overflow)
        self.check("tools/benchmark.py --device cuda, small", self.benchmark)
        print(f"gpu-check: {len(self.failed)} check(s) failed" if self.failed else "gpu-check: every check passed")
        return self.failed

    def torchrun_ddp(self, processes: int, reference: Training):
        batch = 64 if 64 % processes == 0 else 16 * processes  # the global batch divides over the processes
        launcher = (TORCHRUN, "--standalone", "--nproc_per_node", str(processes), TRAIN_NET)
        run = self.train(f"ddp{processes}", "TRAIN.DISTRIBUTED_BACKEND", "ddp", "TRAIN.BATCH_SIZE", str(batch),
                         launcher=launcher)
        passed, detail = learned(run)
        if not passed:
            return passed, detail
        tags = run.run().data.tags
        warned = "barrier(): using the device" in run.output or "device_id" in run.output
        passed = tags["distributed_backend"] == "nccl" and tags["world_size"] == str(processes) and not warned
        detail += f", backend {tags['distributed_backend']}, world_size {tags['world_size']}"
        if processes == 1:
            difference = max_difference(run.weights(), reference.weights())
            passed, detail = passed and difference <= 1e-3, detail + f", weights within {difference:.1e} of float32"
        return passed, detail + (", warned about device ids" if warned else "")

    def kill_and_resume(self, reference: Training):
        opts = ("TRAIN.GPUS", "1", "TRAIN.AMP", "False", "CHECKPOINT.PERIOD", "10")
        killed = self.train("killed", *opts, launcher=(PYTHON, __file__, "--child", "kill"))
        if killed.code != -signal.SIGKILL:
            return False, f"the run was not killed: {killed.summary()}"
        resumed = self.train("killed", *opts, "--resume")
        found = re.search(r"resumed from (checkpoint_\d+\.pth)", resumed.output)
        if resumed.code != 0 or not found:
            return False, f"--resume: {resumed.summary()}"
        weights, expected = resumed.weights(), reference.weights()
        different = [name for name in expected if not torch.equal(weights[name], expected[name])]
        detail = f"killed after step {KILL_AT}, resumed from {found.group(1)}"
        return not different, detail + (f"; differs in {different}" if different else ", bit-identical")

    def eval_only(self, reference: Training):
        weights = reference.output_dir / "model_final.pth"
        run = self.train("eval_only", "TRAIN.GPUS", "1", "TRAIN.AMP", "False", "--eval-only",
                         "MODEL.WEIGHTS", str(weights))
        if run.code != 0:
            return False, run.summary()
        got = run.metric("val_acc1"), run.metric("val_loss")
        expected = reference.metric("val_acc1"), reference.metric("val_loss")
        passed = got[0] == expected[0] and abs(got[1] - expected[1]) <= 1e-5
        return passed, f"val_acc1 {got[0]:.4f} / {expected[0]:.4f}, val_loss {got[1]:.6f} / {expected[1]:.6f}"

    def overflow(self):
        run = self.train("overflow", "TRAIN.GPUS", "1", "TRAIN.AMP", "True", "LOG.PERIOD", "1",
                         launcher=(PYTHON, __file__, "--child", "overflow"))
        skipped = re.search(r"gpu-check: step \d+ skipped, weights unchanged, scale .*", run.output)
        if run.code != 0 or not skipped:
            return False, run.summary() if run.code else "the forced overflow did not skip the step"
        losses = run.history("train_loss")
        finite = all(math.isfinite(value) for value in losses)
        return finite, skipped.group(0)[len("gpu-check: "):] + (
            f"; all {len(losses)} train_loss values finite" if finite else "; a train_loss is NaN or inf")

    def benchmark(self):
        command = [PYTHON, REPO / "tools" / "benchmark.py", "--device", "cuda", "--images", "2048", "--epochs", "1",
                   "--repeats", "1", "--modes", "bare,engine"]
        run = self.execute("benchmark", command, self.root / "benchmark")
        lines = run.output.strip().splitlines()
        return run.code == 0, lines[-1] if run.code == 0 and lines else run.summary()


def learned(run: Training):
    if run.code != 0:
        return False, run.summary()
    return run.metric("val_acc1") >= MIN_ACCURACY, run.summary()


def max_difference(weights: dict, reference: dict) -> float:
    return max((weights[k].double() - reference[k].double()).abs().max().item() for k in reference)


# ---- --child: a training with a hook -----------------------------------------------------------------------
def run_child(kind: str, argv: list[str]) -> int:
    from engine.hooks import HookBase
    from ptengine.tools.train_net import main as train_net

    class KillAfterStep(HookBase):
        def after_step(self):
            if self.trainer.iter == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)

    class ForceOverflow(HookBase):
        """Before step OVERFLOW_AT, a loss scale no fp16 gradient survives; afterwards the scale of before."""

        def before_step(self):
            if self.trainer.iter + 1 == OVERFLOW_AT:
                self.scale = self.trainer.scaler.get_scale()
                self.weights = [p.detach().clone() for p in self.trainer.unwrapped_model.parameters()]
                self.trainer.scaler.update(new_scale=HUGE_SCALE)

        def after_step(self):
            if self.trainer.iter == OVERFLOW_AT:
                after = self.trainer.scaler.get_scale()
                now = list(self.trainer.unwrapped_model.parameters())
                if after < HUGE_SCALE and all(torch.equal(a, b) for a, b in zip(self.weights, now, strict=True)):
                    print(f"gpu-check: step {OVERFLOW_AT} skipped, weights unchanged, scale 2^40 -> "
                          f"2^{math.log2(after):.0f}", flush=True)
                self.trainer.scaler.update(new_scale=self.scale)

    hooks = {"kill": KillAfterStep, "overflow": ForceOverflow}
    if kind not in hooks:
        print(f"error: --child {kind}: choose kill or overflow", file=sys.stderr)
        return 2
    return train_net(argv, hooks=[hooks[kind]()])


if __name__ == "__main__":
    sys.exit(main())
