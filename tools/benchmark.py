#!/usr/bin/env python
"""Training throughput of the engine against a bare PyTorch loop on the same data, model and optimizer.

    python tools/benchmark.py                                # CPU, 10,240 CIFAR-shaped images, every mode
    python tools/benchmark.py --modes bare,engine --epochs 3 --device cuda   # AMP on every side (--no-amp: off)
    python tools/benchmark.py --modes bare,engine --device cuda --model resnet18   # ResNet-18 instead of the LeNet

Modes, all run in this one process:
  bare                hand-written loop (forward, loss, backward, SGD step) over pre-normalized float tensors
                      in memory, no logging: the limit
  engine              a run as a user starts one (ptengine.Runner, the public API tools/train_net.py calls):
                      metrics to MLflow in a SQLite store, a checkpoint at every epoch end, DATA.TRANSFORM_LIST
                      to_tensor, normalize; EVAL.PERIOD 0 and MLFLOW.LOG_MODEL False (both after training)
  engine_no_mlflow    engine with MLFLOW.ENABLED False (no MLflow run, no delivery process)
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

The engine is timed by the benchmark's own hook (tools/benchmark_measure.py's EpochClock, passed as
hooks=[...]): an epoch's lap ends at its last step, so each timed lap pays one epoch-end checkpoint and the final
evaluation (of the one-image val split, one per class for the folder) is in none. The engine's console lines go
to /dev/null; the progress bar is drawn as in a user's run (on a terminal only). Each run trains one warm-up
epoch, then --epochs timed epochs; the order of the modes is reversed every other repeat and the median epoch
is reported. Everything is written under one
temporary folder that is removed at the end. The last line printed is ``engine/bare <ratio>``.
"""

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from any folder. Appended, not first: the project is imported as `ptengine` (ptengine/__init__.py)
# and its folders never shadow an installed package of the same name (Hugging Face's `datasets`).
sys.path.append(str(Path(__file__).resolve().parent.parent))

# Also the names tools/gpu_check_inprocess.py and the tests use (parse_args, ModeStats, Workspace, record,
# run_mode, images_per_second, write_png_tree), from the modules that hold them.
import torch  # noqa: E402

from ptengine.config import ConfigError  # noqa: E402
from ptengine.networks import MODEL_REGISTRY  # noqa: E402
from ptengine.tools.benchmark_measure import DEFAULT_THREADS  # noqa: E402
from ptengine.tools.benchmark_modes import (  # noqa: E402, F401
    MODES,
    TINY_BATCH,
    TINY_MODES,
    ModeStats,
    Workspace,
    record,
    run_mode,
    write_png_tree,
)
from ptengine.tools.benchmark_report import images_per_second, print_report, ratio_text  # noqa: E402, F401


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


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
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
    results = run_every_mode(args)
    print_report(results, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s, load average now {os.getloadavg()[0]:.2f}")
    print(f"engine/bare {ratio_text(results, 'engine', 'bare', args.images) or 'n/a'}")
    return 0


def run_every_mode(args) -> dict:
    """``--repeats`` runs of every mode, the order reversed every other repeat, in one temporary folder."""
    results = {mode: ModeStats() for mode in args.modes}
    with tempfile.TemporaryDirectory(prefix="benchmark-", ignore_cleanup_errors=True) as root:
        workspace = Workspace(Path(root), args)
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
            workspace.close()
    return results


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
