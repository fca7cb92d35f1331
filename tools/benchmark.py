#!/usr/bin/env python
"""Training throughput of the engine against a bare PyTorch loop on the same data, model and optimizer.

    python tools/benchmark.py                                # CPU, 10,240 CIFAR-shaped images, every mode
    python tools/benchmark.py --modes bare,engine --epochs 3 --device cuda   # AMP on every side (--no-amp: off)
    python tools/benchmark.py --modes bare,engine --device cuda --model resnet18   # ResNet-18 instead of the LeNet

Modes, all run in this one process:
  bare                hand-written loop (forward, loss, backward, SGD step) over pre-normalized float tensors
                      in memory, no logging: the limit
  engine              the Trainer as tools/train_net.py builds it (tools/build.py): metrics to MLflow in a SQLite
                      store, a checkpoint at every epoch end, the progress bar (drawn into /dev/null),
                      DATA.TRANSFORM_LIST to_tensor, normalize
  engine_no_mlflow    engine without a tracker
  engine_augment      engine with random_crop and random_horizontal_flip
  engine_recipe       engine with the recipe's per-step extras: an EMA of the weights updated after every step,
                      mixup and cutmix on every batch, label smoothing (TRAIN.EMA_DECAY, TRAIN.MIXUP_ALPHA,
                      TRAIN.CUTMIX_ALPHA, TRAIN.LABEL_SMOOTHING)
  dataloader          engine reading the same images as PNG files (DATA.DATASET_TYPE image_folder,
                      DATA.NUM_WORKERS workers): the engine's DataLoader path
  torchvision_folder  torchvision.datasets.ImageFolder + DataLoader (ToTensor, Normalize in the workers) and the
                      bare loop

The engine's own cost per step, as a GPU would expose it (there the step's compute runs asynchronously and the
host only launches kernels): the same engine / engine without MLflow / bare loop, on a model whose compute is
negligible (one Linear layer on 1x8x8 images, batch 16, --tiny-steps steps per epoch), reported in microseconds
per step. These run with torch's default number of threads, as a user's run does:
  tiny_bare, tiny_engine, tiny_engine_no_mlflow

Every other mode uses the same number of torch threads (--threads). By default one core is left free per DataLoader
worker (1 thread on a 2-core machine): with more busy threads than cores, torch's OpenMP threads spin-wait for each
other and an epoch can take several times longer, which would drown the differences measured here.

Evaluation is off on every side: the val split holds one image (one per class for the folder) and the EvalHook
is removed, since it runs after the last epoch whatever EVAL.PERIOD says. Each run trains one warm-up epoch,
then --epochs timed epochs (an engine epoch ends after its last hook, checkpoint included); the order of the
modes is reversed every other repeat and the median epoch is reported. Everything is written under one
temporary folder that is removed at the end. The last line printed is ``engine/bare <ratio>``.
"""

import argparse
import gc
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script from any folder. Appended, not first: the project is imported as `ptengine` (ptengine/__init__.py)
# and its folders never shadow an installed package of the same name (Hugging Face's `datasets`).
sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.checkpoint import Checkpointer  # noqa: E402
from engine.distributed import select_device  # noqa: E402
from engine.hooks import EvalHook, HookBase, PeriodicCheckpointer, ProgressBar  # noqa: E402
from engine.run import RunFolder, configure_reproducibility, start_tracker  # noqa: E402
from ptengine.config import ConfigError, load_config  # noqa: E402
from ptengine.datasets import build_datasets  # noqa: E402
from ptengine.datasets.batches import dataloader_workers  # noqa: E402
from ptengine.datasets.image_folder import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from ptengine.networks import MODEL_REGISTRY  # noqa: E402
from ptengine.tools.build import (  # noqa: E402
    build_data,
    build_ema,
    build_model_for_training,
    build_run_record,
    build_trainer,
    make_tracker,
)

MODES = ("bare", "engine", "engine_no_mlflow", "engine_augment", "engine_recipe", "dataloader", "torchvision_folder")
TINY_MODES = ("tiny_bare", "tiny_engine", "tiny_engine_no_mlflow")
TINY_BATCH = 16
TINY_IMAGE = ["DATA.INPUT_DIM", "1", "DATA.IMAGE_SIZE", "8"]  # 64 inputs: the model's compute is negligible
TINY_TARGETS = (("tiny_engine", 50.0), ("tiny_engine_no_mlflow", 30.0))  # most microseconds per step over bare
DEFAULT_THREADS = torch.get_num_threads()  # what a user's run gets: read before main() changes it
AUGMENT = ["random_crop", "random_horizontal_flip", "to_tensor", "normalize"]  # the usual CIFAR recipe order
RECIPE = ["TRAIN.EMA_DECAY", "0.999", "TRAIN.MIXUP_ALPHA", "1.0", "TRAIN.CUTMIX_ALPHA", "1.0",
          "TRAIN.LABEL_SMOOTHING", "0.1"]  # as in config/cifar10_resnet18.yaml
TARGETS = (  # numerator, denominator, minimum ratio of images/s
    ("engine", "engine_no_mlflow", 0.98),
    ("engine_augment", "engine", 0.90),
    ("engine_recipe", "engine", 0.90),
    ("dataloader", "torchvision_folder", 0.95),
    ("engine", "bare", 0.95),
)
COST_SAMPLES = 5  # metric flushes and checkpoints timed after each engine run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10240, help="training images (default 10240)")
    parser.add_argument("--batch-size", type=int, default=128, help="TRAIN.BATCH_SIZE (default 128)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run, after one warm-up (default 2)")
    parser.add_argument("--repeats", type=int, default=8,
                        help="runs of every mode, the order reversed every other repeat (default 8)")
    parser.add_argument("--modes", default=",".join(MODES + TINY_MODES),
                        help=f"comma-separated subset of {', '.join(MODES + TINY_MODES)}")
    parser.add_argument("--tiny-steps", type=int, default=2560,
                        help="steps per epoch of the tiny_* modes (default 2560: 40,960 images of batch 16)")
    parser.add_argument("--model", default="simple_cnn", choices=sorted(MODEL_REGISTRY),
                        help="TRAIN.MODEL_TYPE of every mode but tiny_* (default simple_cnn, the LeNet)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="fp16 autocast + GradScaler in every mode (TRAIN.AMP); default: on with --device cuda")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last model and batches in every mode (TRAIN.CHANNELS_LAST; CUDA)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the folder modes (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (torch.set_num_threads) for every mode but tiny_*; default: one core per "
                             "DataLoader worker is left free, at least 1 thread")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) - args.workers)
    args.modes = [name.strip() for name in args.modes.split(",") if name.strip()]
    unknown = [name for name in args.modes if name not in MODES + TINY_MODES]
    if unknown or not args.modes:
        parser.error(f"unknown mode {unknown[0] if unknown else '(none)'!r} in --modes; "
                     f"choose from {', '.join(MODES + TINY_MODES)}")
    if args.images < 2 * args.batch_size or min(args.epochs, args.repeats, args.threads) < 1 or args.workers < 0:
        parser.error("use --images >= 2 batches, --epochs, --repeats and --threads >= 1, --workers >= 0")
    if args.tiny_steps < 2:
        parser.error("use --tiny-steps >= 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --device cpu")
    if args.device == "cpu" and (args.amp or args.channels_last):
        parser.error("--amp and --channels-last are for --device cuda (the engine trains in float32 on the CPU)")
    if args.amp is None:
        args.amp = args.device == "cuda"
    return args


class Workspace:
    """The benchmark's temporary folder: one MLflow store, one OUTPUT_DIR per run, the PNG tree."""

    def __init__(self, root: Path, args):
        self.root, self.args = root, args
        self.devnull = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
        self._runs = 0
        self._folder: Path | None = None

    def close(self) -> None:
        self.devnull.close()

    def config(self, mode: str, opts=()):
        """The run's frozen config: synthetic data whose train split holds exactly ``--images`` images (the
        tiny modes: ``--tiny-steps`` batches of TINY_BATCH tiny images)."""
        self._runs += 1
        tiny = mode in TINY_MODES
        batch_size = TINY_BATCH if tiny else self.args.batch_size
        images = self.args.tiny_steps * batch_size if tiny else self.args.images
        base = [
            "DATA.DATASET_TYPE", "synthetic", "DATA.SYNTHETIC_SIZE", str(images + 1),
            "DATA.VALIDATION_SIZE", repr(0.5 / (images + 1)),  # rounds to the minimum of one val image
            "DATA.NUM_WORKERS", str(self.args.workers), "TRAIN.BATCH_SIZE", str(batch_size),
            "TRAIN.MAX_EPOCHS", str(1 + self.args.epochs), "TRAIN.GPUS", "0" if self.args.device == "cpu" else "1",
            "OUTPUT_DIR", str(self.root / "runs" / f"{self._runs:03d}-{mode}"),
            "MLFLOW.TRACKING_URI", f"sqlite:///{self.root / 'store' / 'mlflow.db'}",
            "MLFLOW.EXPERIMENT_NAME", "benchmark", "MLFLOW.RUN_NAME", mode,
            "TRAIN.AMP", str(self.args.amp), "TRAIN.CHANNELS_LAST", str(self.args.channels_last),
            *(TINY_IMAGE if tiny else ["TRAIN.MODEL_TYPE", self.args.model]),
        ]
        return load_config(None, base + list(opts))

    def image_folder(self) -> Path:
        """The synthetic train split as PNG files in ImageFolder layout (written once); val: one image per class."""
        if self._folder is None:
            cfg = self.config("folder")
            split = build_datasets(cfg).train
            self._folder = self.root / "folder"
            write_png_tree(self._folder / "train", split.images, split.labels, cfg.DATA.CLASSES)
            one_each = torch.zeros(len(cfg.DATA.CLASSES), dtype=torch.int64)
            write_png_tree(self._folder / "val", split.images[one_each], torch.arange(len(one_each)), cfg.DATA.CLASSES)
        return self._folder


def write_png_tree(folder: Path, images: torch.Tensor, labels: torch.Tensor, class_names) -> None:
    from PIL import Image

    for name in class_names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    pixels = images.permute(0, 2, 3, 1).numpy()
    for index, (image, label) in enumerate(zip(pixels, labels.tolist(), strict=True)):
        Image.fromarray(image).save(folder / class_names[label] / f"{index:06d}.png")


# ---- measuring -----------------------------------------------------------------------------------------------
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory while the block runs: CUDA memory allocated, or the main process's resident set (VmHWM).

    Linux resets VmHWM to the current RSS through /proc/self/clear_refs; elsewhere the peak is the process's.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.mib = 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.mib = torch.cuda.max_memory_allocated() / 2**20
            return
        try:
            status = Path("/proc/self/status").read_text()
            self.mib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        except (OSError, AttributeError):
            import resource

            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class EpochTimes:
    """Wall and CPU seconds of each epoch."""

    def __init__(self, device):
        self.device = device
        self.wall: list[float] = []
        self.cpu: list[float] = []  # this process (all its threads) and its children (DataLoader workers)
        self._marks = (0.0, 0.0)

    def start(self) -> None:
        self._marks = (time.perf_counter(), time.process_time() + children_cpu_seconds())

    def lap(self) -> None:
        synchronize(self.device)
        previous, self._marks = self._marks, None
        self.start()
        for laps, now, before in zip((self.wall, self.cpu), self._marks, previous, strict=True):
            laps.append(now - before)


class EpochClock(HookBase):
    """Registered after every other hook: an epoch lasts until its last ``after_epoch`` hook has returned.
    With ``watch_pid`` it also reads that process's CPU seconds when the warm-up epoch ends."""

    def __init__(self, device, watch_pid: int | None = None):
        self.times = EpochTimes(device)
        self.watch_pid, self.watched_after_warmup = watch_pid, 0.0

    def before_train(self):
        self.times.start()

    def after_epoch(self):
        self.times.lap()
        if self.watch_pid is not None and len(self.times.wall) == 1:
            self.watched_after_warmup = proc_cpu_seconds(f"/proc/{self.watch_pid}/stat")


def children_cpu_seconds() -> float:
    """CPU seconds used so far by this process's live child processes, e.g. persistent DataLoader workers."""
    children = []
    for task in Path("/proc/self/task").glob("*") if Path("/proc/self/task").is_dir() else ():
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    return sum(proc_cpu_seconds(f"/proc/{pid}/stat") for pid in children)


def proc_cpu_seconds(stat_path: str) -> float:
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile, or not Linux
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@dataclass
class RunResult:
    times: EpochTimes  # every epoch, the warm-up first
    peak_mib: float
    weights: dict | None = None  # final state_dict on the CPU (engine modes)
    costs: dict | None = None  # seconds of one metric flush / delivery / checkpoint (engine mode)


@dataclass
class ModeStats:
    wall: list[float] = field(default_factory=list)  # timed epochs of every repeat
    cpu: list[float] = field(default_factory=list)
    peak_mib: float = 0.0
    weights: list[dict] = field(default_factory=list)
    costs: list[dict] = field(default_factory=list)


def measure_costs(trainer, tracker, period: int) -> dict:
    """Seconds of one metric flush (training thread), its delivery to MLflow (background thread), and one
    epoch-end checkpoint; timed on the finished engine's own hooks, median of COST_SAMPLES."""
    saver = next(hook for hook in trainer.hooks if isinstance(hook, PeriodicCheckpointer))
    tracker.flush()
    step, flush, delivery, checkpoint, written_by = trainer.iter, [], [], [], []
    for _ in range(COST_SAMPLES):
        step = put_one_period(trainer, step, period)
        start = time.perf_counter()
        trainer.flush_metrics()
        written = time.perf_counter()
        tracker.flush()
        flush.append(written - start)
        delivery.append(time.perf_counter() - written)
        step = put_one_period(trainer, step, period)
        trainer.flush_metrics()  # as at an epoch end: the checkpoint saves the records not yet delivered
        start = time.perf_counter()
        saver.after_epoch()
        handed_over = time.perf_counter()
        saver.checkpointer.wait()
        checkpoint.append(handed_over - start)
        written_by.append(time.perf_counter() - start)
        tracker.flush()
    return {"flush": statistics.median(flush), "delivery": statistics.median(delivery),
            "checkpoint": statistics.median(checkpoint), "checkpoint_on_disk": statistics.median(written_by),
            "flushes_per_epoch": trainer.iters_per_epoch // period + 1}  # every `period` steps + epoch end


def put_one_period(trainer, step: int, period: int) -> int:
    """What ``period`` training steps leave in the storage: a device loss and a float LR per step."""
    for _ in range(period):
        step += 1
        trainer.storage.put("train_loss", torch.rand((), device=trainer.device), step)
        trainer.storage.put("lr", 0.01, step)
    return step


# ---- the modes -----------------------------------------------------------------------------------------------
def run_engine(workspace: Workspace, mode: str, opts=(), tracked: bool = True, with_costs: bool = False):
    """Build and train with the builders tools/run.py uses (minus the evaluations and the model logging); the
    tiny modes with the tiny model instead of TRAIN.MODEL_TYPE's."""
    cfg = workspace.config(mode, opts)
    folder = RunFolder(cfg.OUTPUT_DIR)
    folder.write_config(cfg.dump())
    configure_reproducibility(cfg.SEED, cfg.TRAIN.DETERMINISTIC)
    device, num_gpus = select_device(cfg.TRAIN.GPUS, cfg.TRAIN.DISTRIBUTED_BACKEND)
    data = build_data(cfg, device)
    model = tiny_model(cfg, device) if mode in TINY_MODES else build_model_for_training(cfg, device, num_gpus)
    tracker = make_tracker(cfg, folder) if tracked else None
    trainer = build_trainer(cfg, model, data, device, tracker, Checkpointer(folder.path, keep=cfg.CHECKPOINT.KEEP),
                            ema=build_ema(cfg, model))
    if tracker is not None:
        record = build_run_record(cfg, device, num_gpus, data, tracker, {"benchmark_mode": mode})
        start_tracker(tracker, record)
    trainer.hooks = [hook for hook in trainer.hooks if not isinstance(hook, EvalHook)]
    for hook in trainer.hooks:
        if isinstance(hook, ProgressBar):
            hook.stream, hook.enabled = workspace.devnull, True  # still drawn, just not on the terminal
    clock = EpochClock(device, watch_pid=tracker.delivery_pid if tracker is not None else None)
    trainer.register_hooks([clock])
    with PeakMemory(device) as memory:
        trainer.train()
    costs = None
    if with_costs and tracker:
        # Metrics are sent every few seconds, not every epoch: the delivery process's CPU from the end of the
        # warm-up epoch (its start-up, the mlflow import and the store, excluded) until all is delivered.
        tracker.flush()
        delivered_cpu = proc_cpu_seconds(f"/proc/{tracker.delivery_pid}/stat") - clock.watched_after_warmup
        delivery_cpu = delivered_cpu / (cfg.TRAIN.MAX_EPOCHS - 1)
        costs = {**measure_costs(trainer, tracker, cfg.LOG.PERIOD), "delivery_cpu_per_epoch": delivery_cpu}
    if tracker is not None:
        tracker.end("FINISHED")
    weights = {name: value.detach().cpu().clone() for name, value in trainer.unwrapped_model.state_dict().items()}
    return RunResult(clock.times, memory.mib, weights, costs)


def train_loop(model, optimizer, batches, cfg, device) -> EpochTimes:
    """The limit: forward, loss, backward, step, and nothing else (with AMP as the engine would use it)."""
    amp = cfg.TRAIN.AMP and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    memory_format = torch.channels_last if cfg.TRAIN.CHANNELS_LAST else torch.contiguous_format
    times = EpochTimes(device)
    times.start()
    for epoch in range(cfg.TRAIN.MAX_EPOCHS):
        for images, labels in batches(epoch):
            with torch.autocast(device.type, torch.float16, enabled=amp):
                loss = F.cross_entropy(model(images.contiguous(memory_format=memory_format)), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        times.lap()
    return times


def tiny_model(cfg, device) -> torch.nn.Module:
    """A model whose compute is negligible: one Linear layer over the image's few pixels."""
    inputs = cfg.DATA.INPUT_DIM * cfg.DATA.IMAGE_SIZE ** 2
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(inputs, len(cfg.DATA.CLASSES))).to(device)


def bare_model(cfg, device, tiny: bool = False):
    configure_reproducibility(cfg.SEED, cfg.TRAIN.DETERMINISTIC)
    model = tiny_model(cfg, device) if tiny else build_model_for_training(cfg, device, num_gpus=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.TRAIN.LR, momentum=cfg.TRAIN.MOMENTUM,
                                weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    return model, optimizer


def run_bare(workspace: Workspace, mode: str = "bare") -> RunResult:
    cfg = workspace.config(mode)
    device = torch.device(workspace.args.device)
    splits = build_datasets(cfg)
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    images = ((splits.train.images.float() / 255 - mean) / std).to(device)
    labels = splits.train.labels.to(device)
    model, optimizer = bare_model(cfg, device, tiny=mode in TINY_MODES)

    def batches(epoch):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.SEED + epoch)).to(device)
        for index in order.split(cfg.TRAIN.BATCH_SIZE):
            yield images[index], labels[index]

    with PeakMemory(device) as memory:
        times = train_loop(model, optimizer, batches, cfg, device)
    return RunResult(times, memory.mib)


def run_torchvision_folder(workspace: Workspace) -> RunResult:
    from torch.utils.data import DataLoader
    from torchvision import datasets as tv_datasets
    from torchvision import transforms

    cfg = workspace.config("torchvision_folder")
    device = torch.device(workspace.args.device)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = tv_datasets.ImageFolder(str(workspace.image_folder() / "train"), transform=transform)
    workers = dataloader_workers(cfg.DATA.NUM_WORKERS)  # the engine's cap
    loader = DataLoader(dataset, batch_size=cfg.TRAIN.BATCH_SIZE, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg.SEED))
    model, optimizer = bare_model(cfg, device)

    def batches(epoch):
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    with PeakMemory(device) as memory:
        times = train_loop(model, optimizer, batches, cfg, device)
    return RunResult(times, memory.mib)


def run_mode(workspace: Workspace, mode: str, with_costs: bool) -> RunResult:
    if mode in ("bare", "tiny_bare"):
        return run_bare(workspace, mode)
    if mode == "torchvision_folder":
        return run_torchvision_folder(workspace)
    if mode == "dataloader":
        folder_opts = ["DATA.DATASET_TYPE", "image_folder", "DATA.ROOT", str(workspace.image_folder())]
        return run_engine(workspace, mode, folder_opts)
    if mode == "engine_augment":
        return run_engine(workspace, mode, ["DATA.TRANSFORM_LIST", repr(AUGMENT)])
    if mode == "engine_recipe":
        return run_engine(workspace, mode, RECIPE)
    tracked = mode in ("engine", "tiny_engine")
    return run_engine(workspace, mode, tracked=tracked, with_costs=with_costs and mode == "engine")


# ---- the report ------------------------------------------------------------------------------------------------
def images_per_second(stats: ModeStats, images: int) -> float:
    return images / statistics.median(stats.wall)


def ratio_text(results: dict, numerator: str, denominator: str, images: int) -> str | None:
    if numerator not in results or denominator not in results:
        return None
    ratio = images_per_second(results[numerator], images) / images_per_second(results[denominator], images)
    return f"{ratio:.2f}"


def print_report(results: dict, args) -> None:
    tiny = {mode: stats for mode, stats in results.items() if mode in TINY_MODES}
    results = {mode: stats for mode, stats in results.items() if mode in MODES}
    if results:
        print_throughput(results, args)
    if tiny:
        print_step_costs(tiny, args)
    print_weights_check(results, "engine", "engine_no_mlflow")
    print_weights_check(tiny, "tiny_engine", "tiny_engine_no_mlflow")


def print_throughput(results: dict, args) -> None:
    memory = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    base = results.get("bare")
    print(f"\n{'mode':<20}{'images/s':>10}{'vs bare':>9}{'epoch s':>9}{'min-max s':>13}{'cpu s':>8}{memory:>15}")
    for mode, stats in results.items():
        speed = images_per_second(stats, args.images)
        versus = f"{speed / images_per_second(base, args.images):.2f}" if base else "n/a"
        spread = f"{min(stats.wall):.2f}-{max(stats.wall):.2f}"
        print(f"{mode:<20}{speed:>10.1f}{versus:>9}{statistics.median(stats.wall):>9.2f}{spread:>13}"
              f"{statistics.median(stats.cpu):>8.2f}{stats.peak_mib:>15.0f}")
    print("(medians over the timed epochs of every repeat; cpu s: CPU seconds per epoch of this process and its "
          "DataLoader workers; peak memory of this process)")
    print(f"\ntargets ({args.device}; images/s ratio, and the same ratio computed from cpu s as a cross-check that "
          "other processes disturb less):")
    for numerator, denominator, minimum in TARGETS:
        ratio = ratio_text(results, numerator, denominator, args.images)
        verdict = "n/a" if ratio is None else ("met" if float(ratio) >= minimum else "MISSED")
        cpu = ""
        if ratio is not None:
            cpu = f"cpu {statistics.median(results[denominator].cpu) / statistics.median(results[numerator].cpu):.2f}"
        print(f"  {numerator + '/' + denominator:<31}{ratio or 'n/a':>6}  (>= {minimum:.2f})  {verdict:<8}{cpu}")
    print_costs(results)


def step_microseconds(stats: ModeStats, steps: int, values=None) -> float:
    return statistics.median(stats.wall if values is None else values) / steps * 1e6


def print_step_costs(results: dict, args) -> None:
    """The tiny modes: microseconds per step, and the engine's cost over the bare loop."""
    steps = args.tiny_steps
    print(f"\nper-step cost on a model of negligible compute (Linear {TINY_IMAGE[3]}x{TINY_IMAGE[3]} -> 10, batch "
          f"{TINY_BATCH}, {steps} steps per epoch, {DEFAULT_THREADS} torch threads: torch's default):")
    print(f"{'mode':<24}{'us/step':>9}{'over bare':>11}{'min-max us':>14}{'cpu us':>9}")
    base = results.get("tiny_bare")
    for mode, stats in results.items():
        micros = step_microseconds(stats, steps)
        over = f"{micros - step_microseconds(base, steps):.1f}" if base else "n/a"
        spread = f"{min(stats.wall) / steps * 1e6:.0f}-{max(stats.wall) / steps * 1e6:.0f}"
        print(f"{mode:<24}{micros:>9.1f}{over:>11}{spread:>14}{step_microseconds(stats, steps, stats.cpu):>9.1f}")
    print("(medians over the timed epochs of every repeat, epoch-end checkpoint included; cpu us: CPU time of "
          "this process, all threads, and of its children (the MLflow delivery process), per step)")
    print(f"\ntargets ({args.device}; microseconds per step over tiny_bare, medians):")
    for mode, most in TINY_TARGETS:
        if mode not in results or base is None:
            print(f"  {mode + ' - tiny_bare':<35}   n/a  (<= {most:.0f})")
            continue
        over = step_microseconds(results[mode], steps) - step_microseconds(base, steps)
        print(f"  {mode + ' - tiny_bare':<35}{over:>6.1f}  (<= {most:.0f})  {'met' if over <= most else 'MISSED'}")


def print_costs(results: dict) -> None:
    engine = results.get("engine")
    if engine is None or not engine.costs:
        return
    costs = {key: statistics.median(sample[key] for sample in engine.costs) for key in engine.costs[0]}
    epoch = statistics.median(engine.wall)
    flushes = int(costs["flushes_per_epoch"])
    on_thread = flushes * costs["flush"] + costs["checkpoint"]
    delivery = costs["delivery_cpu_per_epoch"]
    print(f"\nper-epoch costs of engine (epoch {epoch:.2f} s; single operations timed {COST_SAMPLES}x after each run):")
    print(f"  checkpoint at the epoch end          {costs['checkpoint'] * 1e3:7.1f} ms  training thread, x1 per epoch")
    print(f"  ... until on disk (fsynced)          {costs['checkpoint_on_disk'] * 1e3:7.1f} ms  wall, the rest on the "
          "checkpoint writer thread")
    print(f"  metric flush (flush_metrics)       {costs['flush'] * 1e3:7.1f} ms  training thread, "
          f"x{flushes} per epoch")
    print(f"  -> on the training thread per epoch  {on_thread * 1e3:7.1f} ms  = {on_thread / epoch:.1%} of the epoch")
    print(f"  one flush delivered to MLflow        {costs['delivery'] * 1e3:7.1f} ms  wall, delivery process")
    print(f"  delivery process CPU per epoch       {delivery * 1e3:7.1f} ms  = {delivery / epoch:.1%} of the epoch, "
          "another process (no GIL), competing with training for the cores where they are few")


def print_weights_check(results: dict, tracked: str, untracked: str) -> None:
    if tracked not in results or untracked not in results:
        return
    pairs = zip(results[tracked].weights, results[untracked].weights, strict=True)
    equal = all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in pairs)
    print(f"\nlogging must not change results: final weights {tracked} == {untracked} (torch.equal): {equal}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logger = logging.getLogger("engine")  # the console lines are formatted as in a real run, then dropped
    logger.setLevel(logging.INFO)
    logger.propagate = False
    import mlflow  # noqa: F401 - mlflow sets its loggers' levels on import: quiet them after that

    for noisy in ("mlflow", "alembic"):  # "creating initial MLflow database tables" and the like
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    sizes = (f"{args.images} images, batch {args.batch_size}, {args.threads} torch threads, {args.workers} workers"
             if any(mode not in TINY_MODES for mode in args.modes) else
             f"tiny modes only: {args.tiny_steps} steps of batch {TINY_BATCH}, {DEFAULT_THREADS} torch threads")
    print(f"benchmark: {sizes}, 1 warm-up + {args.epochs} timed epochs, {args.repeats} repeats, "
          f"{args.device}{', AMP' if args.amp else ''}{', channels_last' if args.channels_last else ''}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other processes compete for "
              "the CPU and the timings are noisy (more so with --threads above 1)",
              flush=True)
    results = {mode: ModeStats() for mode in args.modes}
    with tempfile.TemporaryDirectory(prefix="benchmark-", ignore_cleanup_errors=True) as root:
        workspace = Workspace(Path(root), args)
        logger.handlers = [logging.StreamHandler(workspace.devnull)]
        try:
            for repeat in range(args.repeats):
                for mode in args.modes if repeat % 2 == 0 else args.modes[::-1]:
                    torch.set_num_threads(DEFAULT_THREADS if mode in TINY_MODES else args.threads)
                    run_started = time.perf_counter()
                    result = run_mode(workspace, mode, with_costs=True)
                    gc.collect()  # ends the previous run's DataLoader workers before the next run starts
                    record(results[mode], result)
                    print(f"  repeat {repeat + 1}/{args.repeats}  {mode:<22}epochs "
                          f"{' '.join(f'{s:.2f}' for s in result.times.wall)} s (warm-up first), whole run "
                          f"{time.perf_counter() - run_started:.1f} s", flush=True)
        finally:
            logger.handlers = []
            workspace.close()
    print_report(results, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s, load average now {os.getloadavg()[0]:.2f}")
    print(f"engine/bare {ratio_text(results, 'engine', 'bare', args.images) or 'n/a'}")
    return 0


def record(stats: ModeStats, result: RunResult) -> None:
    """Add a run's timed epochs (the warm-up left out) to its mode's statistics."""
    stats.wall += result.times.wall[1:]
    stats.cpu += result.times.cpu[1:]
    stats.peak_mib = max(stats.peak_mib, result.peak_mib)
    if result.weights is not None:
        stats.weights.append(result.weights)
    if result.costs is not None:
        stats.costs.append(result.costs)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
