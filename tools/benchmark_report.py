"""The benchmark's report: the throughput table, the per-step costs, the ratios against their targets."""

import statistics

import torch

from ptengine.tools.benchmark_measure import COST_SAMPLES, DEFAULT_THREADS
from ptengine.tools.benchmark_modes import MODES, TINY_BATCH, TINY_IMAGE, TINY_MODES, ModeStats

TARGETS = (  # numerator, denominator, minimum ratio of images/s
    ("engine", "engine_no_mlflow", 0.98),
    ("engine_augment", "engine", 0.90),
    ("engine_recipe", "engine", 0.90),
    ("dataloader", "torchvision_folder", 0.95),
    ("engine", "bare", 0.95),
)
TINY_TARGETS = (("tiny_engine", 50.0), ("tiny_engine_no_mlflow", 30.0))  # most microseconds per step over bare


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
    print(f"\nper-epoch costs of engine (epoch {epoch:.2f} s; seen by the benchmark's hook, medians; the metric "
          f"flush timed {COST_SAMPLES}x after each run):")
    print(f"  checkpoint at the epoch end          {costs['checkpoint'] * 1e3:7.1f} ms  training thread, x1 per epoch "
          "(written to disk by the checkpoint writer thread)")
    print(f"  metric flush (flush_metrics)         {costs['flush'] * 1e3:7.1f} ms  training thread, "
          f"x{flushes} per epoch")
    print(f"  -> on the training thread per epoch  {on_thread * 1e3:7.1f} ms  = {on_thread / epoch:.1%} of the epoch")
    print(f"  delivery process CPU per epoch       {delivery * 1e3:7.1f} ms  = {delivery / epoch:.1%} of the epoch, "
          "another process (no GIL), competing with training for the cores where they are few")
    if delivery == 0:
        print("  warning: no metrics were delivered during the timed epochs (they wait up to 5 s or 1,000 values to "
              "fill one request), so engine's images/s leave MLflow's cost out; time longer epochs (--images)")


def print_weights_check(results: dict, tracked: str, untracked: str) -> None:
    if tracked not in results or untracked not in results:
        return
    pairs = zip(results[tracked].weights, results[untracked].weights, strict=True)
    equal = all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in pairs)
    print(f"\nlogging must not change results: final weights {tracked} == {untracked} (torch.equal): {equal}")
