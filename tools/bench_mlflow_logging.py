#!/usr/bin/env python
"""What logging every step to MLflow costs the training thread: the engine's delivery process against MLflow's
own asynchronous logging, side by side in one process.

    python tools/bench_mlflow_logging.py                      # 1500 timed steps per mode, 3 repeats
    python tools/bench_mlflow_logging.py --steps 3000 --repeats 5 --period 1

Every mode trains LeNet (simple_cnn) at batch 16 on scikit-learn's digits (config/digits.yaml) with the same
model and optimizer, and all but ``bare`` log the loss and the LR of every step (2 values a step), as the
engine does, into a fresh run of one SQLite store in a temporary folder:

  bare                no logging: the reference
  engine_process      the engine's tracker (engine.tracking.MLflowTracker): every ``--period`` steps (LOG.PERIOD,
                      20 by default) the period's records go to its delivery process, which writes them with
                      MlflowClient.log_batch (up to 1000 metrics a request)
  mlflow_async        mlflow.log_metrics({"train_loss": ..., "lr": ...}, step, synchronous=False) every step:
                      what MLFLOW_ENABLE_ASYNC_LOGGING=true gives; MLflow's logging thread runs in this process
  mlflow_async_batch  MlflowClient.log_batch(run_id, metrics, synchronous=False) every ``--period`` steps with the
                      period's records: MLflow's public bulk call, asynchronous

The modes run one after the other in every repeat, the order reversed every other repeat. Measured over the
timed steps: the training thread's CPU time (time.thread_time) and wall time, per step and, over ``bare``, per
logged value; and, from the first timed step until every value is in the store, the CPU time of everything
else (this process's other threads, the delivery process) per value over ``bare``'s, and how long the store
took to catch up after the last step. Medians over the repeats.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.tracking import MLflowTracker  # noqa: E402
from ptengine.config import load_config  # noqa: E402
from ptengine.datasets import build_datasets  # noqa: E402
from ptengine.networks import build_model  # noqa: E402

MODES = ("bare", "engine_process", "mlflow_async", "mlflow_async_batch")
CONFIG = Path(__file__).resolve().parent.parent / "config" / "digits.yaml"
NAMES = ("train_loss", "lr")
DRAIN_TIMEOUT = 600.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="timed steps per mode and repeat (default 1500)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the modes (default 3)")
    parser.add_argument("--period", type=int, default=20,
                        help="steps between hand-offs for engine_process and mlflow_async_batch (LOG.PERIOD, 20)")
    parser.add_argument("--batch-size", type=int, default=16, help="TRAIN.BATCH_SIZE (default 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, as tools/benchmark.py on 2 cores: more busy threads than cores "
                             "make torch's OpenMP threads spin-wait, which would drown what is measured here)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    args = parser.parse_args(argv)
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not args.modes or any(mode not in MODES for mode in args.modes) or "bare" not in args.modes:
        parser.error(f"--modes: choose from {', '.join(MODES)}, bare included")
    if min(args.steps, args.repeats, args.period, args.batch_size, args.threads) < 1:
        parser.error("use --steps, --repeats, --period, --batch-size and --threads >= 1")
    return args


class Batches:
    """The digits training split as normalized tensors, served in batches forever."""

    def __init__(self, cfg):
        splits = build_datasets(cfg)
        mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
        std = torch.tensor(splits.std).view(1, -1, 1, 1)
        self.images = (splits.train.images.float() / 255 - mean) / std
        self.labels = splits.train.labels
        self.batch_size = cfg.TRAIN.BATCH_SIZE

    def __iter__(self):
        while True:
            for index in torch.randperm(len(self.labels)).split(self.batch_size):
                yield self.images[index], self.labels[index]


class Logger:
    """A mode's logging: ``open`` a run (untimed), ``step`` (timed), ``drain`` until all is in the store."""

    def __init__(self, uri: str, period: int):
        self.uri, self.period, self.records = uri, period, []

    def open(self, name: str) -> None:
        pass

    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        pass

    def drain(self) -> None:
        """Wait until every value logged so far is in the store."""

    def close(self) -> None:
        """End the run."""

    def other_pids(self) -> list[int]:
        return []


class EngineProcess(Logger):
    def open(self, name):
        self.tracker = MLflowTracker(self.uri, "bench", run_name=name)
        self.tracker.start(params={})

    def step(self, step, loss, lr):
        self.records += [("train_loss", loss.item(), step), ("lr", lr, step)]
        if step % self.period == 0:
            self.tracker.log_metrics(self.records)
            self.records = []

    def drain(self):
        self.tracker.log_metrics(self.records)
        if not self.tracker.flush(timeout=DRAIN_TIMEOUT):
            raise RuntimeError("the delivery process did not deliver everything in time")

    def close(self):
        self.tracker.end("FINISHED")

    def other_pids(self):
        return [self.tracker.delivery_pid]


class MlflowAsync(Logger):
    def open(self, name):
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        self.mlflow, self.client = mlflow, mlflow.MlflowClient(self.uri)
        # The active run, as a user's script has it: with ``run_id=`` instead, log_metrics reads the whole run
        # from the store on every call (about 28 ms here).
        self.run_id = mlflow.start_run(experiment_id=experiment_id(self.client), run_name=name).info.run_id

    def step(self, step, loss, lr):
        self.mlflow.log_metrics({"train_loss": loss.item(), "lr": lr}, step=step, synchronous=False)

    def drain(self):
        self.mlflow.flush_async_logging()

    def close(self):
        self.mlflow.end_run()


class MlflowAsyncBatch(MlflowAsync):
    def step(self, step, loss, lr):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.records += [Metric("train_loss", loss.item(), now, step), Metric("lr", lr, now, step)]
        if step % self.period == 0:
            self.client.log_batch(self.run_id, metrics=self.records, synchronous=False)
            self.records = []

    def drain(self):
        if self.records:
            self.client.log_batch(self.run_id, metrics=self.records, synchronous=False)
        super().drain()


LOGGERS = {"bare": Logger, "engine_process": EngineProcess, "mlflow_async": MlflowAsync,
           "mlflow_async_batch": MlflowAsyncBatch}


def experiment_id(client) -> str:
    experiment = client.get_experiment_by_name("bench")
    return experiment.experiment_id if experiment else client.create_experiment("bench")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mode: str, logger: Logger, model, optimizer, batches, args) -> dict:
    """One mode's timed steps: the training thread's CPU and wall seconds, then everything else's CPU seconds
    and the wait for the store, until all is delivered."""
    logger.open(mode)
    lr = optimizer.param_groups[0]["lr"]
    pids = logger.other_pids()
    others = sum(cpu_seconds(pid) for pid in pids)
    process, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = next(batches)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        logger.step(step, loss.detach(), lr)
    sample = {"thread": time.thread_time() - thread, "wall": time.perf_counter() - wall}
    stepped = time.perf_counter()
    logger.drain()
    sample["catch_up"] = time.perf_counter() - stepped
    thread_total = time.thread_time() - thread
    sample["other"] = (time.process_time() - process - thread_total
                       + sum(cpu_seconds(pid) for pid in pids) - others)
    logger.close()
    return sample


def run(args, root: Path) -> dict:
    cfg = load_config(str(CONFIG), ["TRAIN.BATCH_SIZE", str(args.batch_size)])
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.TRAIN.LR, momentum=cfg.TRAIN.MOMENTUM)
    batches = iter(Batches(cfg))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    warm_up = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 200)})
    for mode in args.modes:  # imports, the store's tables, torch's first steps: untimed
        measure(mode, LOGGERS[mode](uri, args.period), model, optimizer, batches, warm_up)
    samples: dict = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        for mode in args.modes if repeat % 2 == 0 else reversed(args.modes):
            samples[mode].append(measure(mode, LOGGERS[mode](uri, args.period), model, optimizer, batches, args))
    return {mode: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for mode, runs in samples.items()}


def report(results: dict, args) -> None:
    steps, values = args.steps, args.steps * len(NAMES)
    bare = results["bare"]
    print(f"{args.steps} timed steps per mode, {args.repeats} repeats (medians), LeNet batch {args.batch_size} on "
          f"digits, {len(NAMES)} values a step, hand-off every {args.period} steps where batched, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'mode':<20}{'thread cpu':>12}{'wall':>10}{'over bare, per value:':>24}{'other cpu':>12}"
          f"{'catch-up':>10}{'bare/mode':>11}")
    print(f"{'':<20}{'us/step':>12}{'us/step':>10}{'thread cpu us':>15}{'wall us':>9}{'us/value':>12}"
          f"{'s':>10}{'(wall)':>11}")
    for mode, r in results.items():
        print(f"{mode:<20}{r['thread'] / steps * 1e6:>12.1f}{r['wall'] / steps * 1e6:>10.1f}"
              f"{(r['thread'] - bare['thread']) / values * 1e6:>15.2f}{(r['wall'] - bare['wall']) / values * 1e6:>9.2f}"
              f"{(r['other'] - bare['other']) / values * 1e6:>12.1f}{r['catch_up']:>10.2f}"
              f"{bare['wall'] / r['wall']:>11.3f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench_mlflow_") as folder:
        results = run(args, Path(folder))
    report(results, args)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
