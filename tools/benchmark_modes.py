"""The benchmark's modes: the engine through the public run API, the bare loops, and torchvision's folder path.

Every engine mode is a ``ptengine.Runner`` run, as a user starts one, with the config the mode needs and the
benchmark's own hook (``benchmark_measure.EpochClock``); nothing inside the built run is changed.
"""

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import ptengine
from engine.run import configure_reproducibility
from ptengine.config import load_config
from ptengine.datasets import build_datasets
from ptengine.datasets.batches import dataloader_workers
from ptengine.datasets.image_folder import IMAGENET_MEAN, IMAGENET_STD
from ptengine.networks import build_model
from ptengine.tools.benchmark_measure import COST_SAMPLES, EpochClock, EpochTimes, PeakMemory

MODES = ("bare", "engine", "engine_no_mlflow", "engine_augment", "engine_recipe", "dataloader", "torchvision_folder")
TINY_MODES = ("tiny_bare", "tiny_engine", "tiny_engine_no_mlflow")
TINY_BATCH = 16
TINY_IMAGE = ["DATA.INPUT_DIM", "1", "DATA.IMAGE_SIZE", "8"]  # 64 inputs: the model's compute is negligible
AUGMENT = ["random_crop", "random_horizontal_flip", "to_tensor", "normalize"]  # the usual CIFAR recipe order
RECIPE = ["TRAIN.EMA_DECAY", "0.999", "TRAIN.MIXUP_ALPHA", "1.0", "TRAIN.CUTMIX_ALPHA", "1.0",
          "TRAIN.LABEL_SMOOTHING", "0.1"]  # as in config/cifar10_resnet18.yaml
# What every engine mode changes from a user's defaults: evaluation only after the last epoch (outside the
# timed laps), no model logged (it comes after training).
ENGINE_OPTS = ["EVAL.PERIOD", "0", "MLFLOW.LOG_MODEL", "False"]


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


@dataclass
class ModeRun:
    """One run of a mode."""

    times: EpochTimes  # every epoch, the warm-up first
    peak_mib: float
    weights: dict | None = None  # final state_dict on the CPU (engine modes)
    costs: dict | None = None  # seconds of one metric flush and one checkpoint, delivery CPU (engine mode)


@dataclass
class ModeStats:
    wall: list[float] = field(default_factory=list)  # timed epochs of every repeat
    cpu: list[float] = field(default_factory=list)
    peak_mib: float = 0.0
    weights: list[dict] = field(default_factory=list)
    costs: list[dict] = field(default_factory=list)


def record(stats: ModeStats, result: ModeRun) -> None:
    """Add a run's timed epochs (the warm-up left out) to its mode's statistics."""
    stats.wall += result.times.wall[1:]
    stats.cpu += result.times.cpu[1:]
    stats.peak_mib = max(stats.peak_mib, result.peak_mib)
    if result.weights is not None:
        stats.weights.append(result.weights)
    if result.costs is not None:
        stats.costs.append(result.costs)


# ---- the engine, as a user runs it ---------------------------------------------------------------------------
def run_engine(workspace: Workspace, mode: str, opts=(), tracked: bool = True, with_costs: bool = False) -> ModeRun:
    """One ``ptengine.Runner`` run of ``mode``'s config (``tracked`` False: ``MLFLOW.ENABLED False``); the tiny
    modes hand the tiny model over as ``model=``. The engine's console lines are written to /dev/null (the
    progress bar is drawn as in a user's run: on a terminal only)."""
    cfg = workspace.config(mode, [*ENGINE_OPTS, "MLFLOW.ENABLED", str(tracked), *opts])
    objects = {}
    if mode in TINY_MODES:
        torch.manual_seed(cfg.SEED)  # the same initial weights with and without MLflow
        objects["model"] = tiny_model(cfg)
    clock = EpochClock(workspace.args.device, cfg.LOG.PERIOD, COST_SAMPLES if with_costs else 0)
    with PeakMemory(workspace.args.device) as memory, contextlib.redirect_stdout(workspace.devnull):
        result = ptengine.Runner(cfg, hooks=[clock], **objects).train()
    if result.status != "FINISHED":
        raise RuntimeError(f"the {mode} run ended {result.status}; see {result.output_dir}/log.txt")
    weights = {name: value.detach().cpu().clone() for name, value in result.model.state_dict().items()}
    return ModeRun(clock.times, memory.mib, weights, clock.costs() if with_costs else None)


# ---- the bare loops ------------------------------------------------------------------------------------------
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


def tiny_model(cfg) -> torch.nn.Module:
    """A model whose compute is negligible: one Linear layer over the image's few pixels."""
    inputs = cfg.DATA.INPUT_DIM * cfg.DATA.IMAGE_SIZE ** 2
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(inputs, len(cfg.DATA.CLASSES)))


def bare_model(cfg, device, tiny: bool = False):
    configure_reproducibility(cfg.SEED, cfg.TRAIN.DETERMINISTIC)
    model = (tiny_model(cfg) if tiny else build_model(cfg)).to(device)
    if cfg.TRAIN.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.TRAIN.LR, momentum=cfg.TRAIN.MOMENTUM,
                                weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    return model, optimizer


def run_bare(workspace: Workspace, mode: str = "bare") -> ModeRun:
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
    return ModeRun(times, memory.mib)


def run_torchvision_folder(workspace: Workspace) -> ModeRun:
    from torch.utils.data import DataLoader
    from torchvision import datasets as tv_datasets
    from torchvision import transforms

    cfg = workspace.config("torchvision_folder")
    device = torch.device(workspace.args.device)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = tv_datasets.ImageFolder(str(workspace.image_folder() / "train"), transform=transform)
    workers = dataloader_workers(cfg.DATA.NUM_WORKERS)  # the engine's cap (datasets/batches.py)
    loader = DataLoader(dataset, batch_size=cfg.TRAIN.BATCH_SIZE, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg.SEED))
    model, optimizer = bare_model(cfg, device)

    def batches(epoch):
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    with PeakMemory(device) as memory:
        times = train_loop(model, optimizer, batches, cfg, device)
    return ModeRun(times, memory.mib)


def run_mode(workspace: Workspace, mode: str, with_costs: bool) -> ModeRun:
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
