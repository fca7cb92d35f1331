#!/usr/bin/env python
"""The trainings of ``make gpu-check``: tools/train_net.py with hooks that record what ran, or break the run.

    python tools/gpu_check_hooks.py [OPTIONS] -- TRAIN_NET_ARGUMENTS...
    torchrun --nproc_per_node N tools/gpu_check_hooks.py [OPTIONS] -- TRAIN_NET_ARGUMENTS...

The hooks join the run through ``train_net.main(hooks=...)``, the public way a user adds hooks. Every record is a
JSON file of this rank in the folder given by ``--records`` (default: OUTPUT_DIR), written at each epoch end:

    --float32-exact        no TensorFloat-32 in cuDNN convolutions and cuBLAS matmuls, so that float32 results
                           compare with the CPU's to float32 rounding
    --record-dtypes        dtypes_rank<r>.json: how many outputs of each Conv2d / Linear forward, per
                           "train|eval <device> <dtype>"; DataParallel's replicas share the hooks, so each GPU's
                           replica is counted under its own device
    --record-bn            bn_rank<r>.json: per evaluation (its iteration), a digest of every BatchNorm layer's
                           running statistics as the evaluation's forward passes saw them
    --record-scale         scale_rank<r>.jsonl: per step, the GradScaler's scale before and after it
    --progress             progress_rank<r>: the last finished iteration, rewritten after every step
    --kill-at N            every rank sends itself SIGKILL after iteration N (a crash, a power cut)
    --overflow-at N[,M]    before iteration N the loss scale is forced to 2**40, so that every float16 gradient
                           overflows: the step must be skipped; the scale of before is put back after it
    --slow-step SECONDS    every step starts that much later (a moment to aim a signal at)
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # as tools/train_net.py does

import torch  # noqa: E402

from engine.distributed import get_rank  # noqa: E402
from engine.hooks import HookBase  # noqa: E402

HUGE_SCALE = 2.0**40


class Float32Exact(HookBase):
    """TF32 off for cuDNN and cuBLAS, set after the engine's own settings (before the first forward)."""

    def before_train(self):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


class RecordFile(HookBase):
    """A hook that writes one JSON file of this rank in ``folder``."""

    name = "record"

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def path(self) -> Path:
        return self.folder / f"{self.name}_rank{get_rank()}.json"

    def write(self, value) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(value, indent=1, sort_keys=True))
        temporary.replace(self.path)


class RecordDtypes(RecordFile):
    """Counts the output dtype of every Conv2d and Linear forward, by mode and device (thread-safe: DataParallel
    runs its replicas in threads, and they share these hooks)."""

    name = "dtypes"

    def before_train(self):
        self.counts, self.lock = Counter(), threading.Lock()
        for module in self.trainer.unwrapped_model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                module.register_forward_hook(self.count)

    def count(self, module, inputs, output):
        with self.lock:
            self.counts[f"{'train' if module.training else 'eval'} {output.device} {output.dtype}"] += 1

    def after_epoch(self):
        with self.lock:
            self.write(dict(self.counts))


class RecordBatchNormAtEvaluation(RecordFile):
    """A digest of each BatchNorm layer's running statistics whenever an evaluation (eval mode) runs it."""

    name = "bn"

    def before_train(self):
        self.seen: dict[str, set[str]] = {}
        self.evaluations: dict[str, dict[str, list[str]]] = {}
        for name, module in self.trainer.unwrapped_model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                # A closure, not a bound method: a deepcopy of the model (an EMA) would copy a bound method's object.
                module.register_forward_pre_hook(self.recorder(name))

    def recorder(self, name: str):
        seen = self.seen

        def record(module, inputs):
            if not module.training:
                seen.setdefault(name, set()).add(buffer_digest(module))

        return record

    def after_epoch(self):
        if self.seen:
            self.evaluations[str(self.trainer.iter)] = {name: sorted(d) for name, d in self.seen.items()}
            self.seen.clear()
            self.write(self.evaluations)


def buffer_digest(module: torch.nn.Module) -> str:
    data = b"".join(buffer.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                    for buffer in module.buffers())
    return hashlib.sha256(data).hexdigest()[:20]


class RecordScale(HookBase):
    """One JSON line per step: the iteration, the loss scale before and after it (a skipped step halves it)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def before_step(self):
        self.before = self.trainer.scaler.get_scale()

    def after_step(self):
        line = {"iter": self.trainer.iter, "before": self.before, "after": self.trainer.scaler.get_scale()}
        with open(self.folder / f"scale_rank{get_rank()}.jsonl", "a") as file:
            file.write(json.dumps(line) + "\n")


class ForceOverflow(HookBase):
    """Before each iteration of ``steps``, a loss scale no float16 gradient survives; afterwards the scale of
    before, and a line saying whether the step left the weights unchanged (it must have been skipped)."""

    def __init__(self, folder: Path, steps: set[int]):
        self.folder, self.steps = folder, steps

    def before_step(self):
        if self.trainer.iter + 1 in self.steps:
            self.scale = self.trainer.scaler.get_scale()
            self.weights = [p.detach().clone() for p in self.trainer.unwrapped_model.parameters()]
            self.trainer.scaler.update(new_scale=HUGE_SCALE)

    def after_step(self):
        if self.trainer.iter in self.steps:
            now = list(self.trainer.unwrapped_model.parameters())
            unchanged = all(torch.equal(a, b) for a, b in zip(self.weights, now, strict=True))
            line = {"iter": self.trainer.iter, "weights_unchanged": unchanged,
                    "scale_after": self.trainer.scaler.get_scale()}
            with open(self.folder / f"overflow_rank{get_rank()}.jsonl", "a") as file:
                file.write(json.dumps(line) + "\n")
            self.trainer.scaler.update(new_scale=self.scale)


class Progress(HookBase):
    def __init__(self, folder: Path):
        self.folder = folder

    def after_step(self):
        (self.folder / f"progress_rank{get_rank()}").write_text(str(self.trainer.iter))


class KillAt(HookBase):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


class SlowSteps(HookBase):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def before_step(self):
        time.sleep(self.seconds)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("error: separate this script's options from train_net.py's arguments with --")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, help="folder of the record files (default: OUTPUT_DIR)")
    for flag in ("--float32-exact", "--record-dtypes", "--record-bn", "--record-scale", "--progress"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--overflow-at", default="")
    parser.add_argument("--slow-step", type=float, default=0.0)
    return parser.parse_args(argv[:split]), argv[split + 1:]


def build_hooks(options: argparse.Namespace, folder: Path) -> list[HookBase]:
    folder.mkdir(parents=True, exist_ok=True)
    chosen = [
        (options.float32_exact, lambda: Float32Exact()),
        (options.record_dtypes, lambda: RecordDtypes(folder)),
        (options.record_bn, lambda: RecordBatchNormAtEvaluation(folder)),
        (options.record_scale, lambda: RecordScale(folder)),
        (options.overflow_at, lambda: ForceOverflow(folder, {int(n) for n in options.overflow_at.split(",")})),
        (options.progress, lambda: Progress(folder)),
        (options.slow_step > 0, lambda: SlowSteps(options.slow_step)),
        (options.kill_at is not None, lambda: KillAt(options.kill_at)),  # last: the others have run for that step
    ]
    return [make() for wanted, make in chosen if wanted]


def main(argv: list[str]) -> int:
    from ptengine.tools.train_net import exit_at_once
    from ptengine.tools.train_net import main as train_net

    options, train_args = parse_args(argv)
    output_dir = train_args[train_args.index("OUTPUT_DIR") + 1] if "OUTPUT_DIR" in train_args else "."
    hooks = build_hooks(options, options.records or Path(output_dir))
    if options.float32_exact:  # now too: --eval-only runs no hook
        Float32Exact().before_train()
    sys.argv = [str(Path(__file__).resolve().parent / "train_net.py"), *train_args]
    exit_at_once(train_net(train_args, hooks=hooks))


if __name__ == "__main__":
    main(sys.argv[1:])
