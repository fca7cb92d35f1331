#!/usr/bin/env python
"""`make gpu-check`: prove, once, on your GPU machine, every code path that only runs on CUDA (about 8 minutes
on one H100; longer with several GPUs).

It first prints the NVIDIA driver (and the newest CUDA it supports), the CUDA version this torch was built for,
and each GPU's compute capability, and stops with exit code 2 and one ``error:`` line when they do not fit: no
NVIDIA driver, a CPU-only torch, a driver too old for the wheel's CUDA, or a GPU this torch has no kernels for.

Then every line below runs and prints PASS, FAIL or SKIPPED with what it measured, against an exact or tight
reference; one table of them all is printed at the end and written to ``--table`` (default
output/gpu-check-<time>.txt). Exit code 0 when no line failed, 1 when one did. The trainings are config/digits.yaml
with ResNet-18 (BatchNorm), run as a user runs them (tools/train_net.py, and torchrun on every visible GPU for
DDP) into a temporary folder with its own MLflow store, removed at the end unless a line failed or ``--keep``
(then its path is printed: each training's output is in <folder>/<name>.log).

  float32 resnet18 channels_last vs CPU     train_loss of the first 10 steps within 1e-3 of the CPU run's
  float16 + GradScaler, ACCUM_STEPS 2, CLIP_GRAD_NORM
                                            forced overflows skipped, losses finite, after kill -9 and --resume
                                            the checkpoint (scaler, weights, optimizer) bit-identical
  bfloat16 autocast                         every conv/linear output bfloat16, val_acc1 within 0.03 of float32
  DataParallel + AMP float16 / bfloat16     each GPU's replica ran the configured dtype (SKIPPED on one GPU)
  DDP over NCCL, N ranks, BatchNorm         equal BatchNorm statistics on every rank at each evaluation,
                                            --eval-only repeats val_acc1, N ranks (SyncBatchNorm) = one GPU
  resume under DDP after kill -9            final weights within 1e-6 of the uninterrupted run
  resume on fewer GPUs than saved           N ranks -> 1, within 1e-3 (SKIPPED on one GPU)
  torch.compile, EMA, mixup/cutmix resume   compiled resume bit-identical; eager resume of it continues
  image folder: workers, pinned, non_blocking   batches bit-identical to the in-memory path
  SIGTERM / SIGUSR1 under torchrun with DataLoader workers
                                            checkpoint written, MLflow run KILLED, no worker killed
  log_model of a GPU model, loaded on the CPU   same classes, logits within 1e-3
  speed: resnet18 AMP channels_last batch 256   engine >= 0.95x the bare loop, img/s printed

``--only WORDS`` runs the lines whose name contains WORDS (e.g. ``--only compile``).
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # as tools/train_net.py does

EXIT_UNFIT = 2


@dataclass
class Environment:
    """What decides whether this torch can run on this machine's GPUs."""

    torch_version: str
    wheel_cuda: str | None  # torch.version.cuda; None for a CPU-only build
    driver: str | None  # nvidia-smi's driver version; None without a driver
    driver_cuda: str | None  # the newest CUDA the driver supports ("CUDA Version" of nvidia-smi)
    cuda_available: bool
    gpus: list[tuple[str, tuple[int, int]]]  # (name, compute capability) of each visible GPU
    arch_list: list[str]  # torch.cuda.get_arch_list(): sm_XY (binaries) and compute_XY (PTX)

    def describe(self) -> str:
        driver = f"driver {self.driver} (CUDA up to {self.driver_cuda})" if self.driver else "no NVIDIA driver"
        wheel = f"CUDA {self.wheel_cuda}" if self.wheel_cuda else "no CUDA (a CPU-only build)"
        lines = [f"gpu-check: {driver}",
                 f"gpu-check: torch {self.torch_version}, built for {wheel}, kernels for "
                 f"{' '.join(self.arch_list) or '(none)'}"]
        lines += [f"gpu-check: GPU {i}: {name}, compute capability {major}.{minor}"
                  for i, (name, (major, minor)) in enumerate(self.gpus)] or ["gpu-check: no GPU visible to torch"]
        return "\n".join(lines)


def probe_environment() -> Environment:
    import torch

    driver, driver_cuda = nvidia_smi_versions()
    available = torch.cuda.is_available()
    gpus = [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())] if available else []
    return Environment(torch.__version__, torch.version.cuda, driver, driver_cuda, available, gpus,
                       torch.cuda.get_arch_list())


def nvidia_smi_versions() -> tuple[str | None, str | None]:
    """The driver version and the newest CUDA it supports, as nvidia-smi prints them (None, None without it)."""
    try:
        output = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    driver = re.search(r"Driver Version:\s*([\d.]+)", output)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", output)
    return (driver.group(1) if driver else None), (cuda.group(1) if cuda else None)


def environment_problem(env: Environment) -> str | None:
    """Why this torch cannot use this machine's GPUs, with the fix; None when it can."""
    if env.wheel_cuda is None:
        return (f"torch {env.torch_version} is a CPU-only build; install the CUDA build of torch "
                "(pip install torch --index-url https://download.pytorch.org/whl/cu128, or the one for your driver)")
    if env.driver is None:
        return ("no NVIDIA driver found (nvidia-smi is missing or failed); run this on a machine with an NVIDIA GPU "
                "and its driver installed")
    if env.driver_cuda and version_tuple(env.driver_cuda)[0] < version_tuple(env.wheel_cuda)[0]:
        return (f"the NVIDIA driver {env.driver} supports CUDA up to {env.driver_cuda}, but this torch needs CUDA "
                f"{env.wheel_cuda}; update the driver, or install a torch built for CUDA {env.driver_cuda}")
    if not env.cuda_available or not env.gpus:
        return (f"torch sees no usable GPU (driver {env.driver}, CUDA {env.wheel_cuda}); check CUDA_VISIBLE_DEVICES "
                "and that the driver works (nvidia-smi)")
    for name, capability in env.gpus:
        if not has_kernels_for(capability, env.arch_list):
            return (f"{name} has compute capability {capability[0]}.{capability[1]}, which this torch has no kernels "
                    f"for ({' '.join(env.arch_list)}); install a torch build that lists sm_{capability[0]}"
                    f"{capability[1]}")
    return None


def has_kernels_for(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """A binary for the same major version and a lower or equal minor one (sm_80 runs on 8.6), or PTX of an
    equal or older architecture, which the driver compiles for this GPU."""
    major, minor = capability
    for arch in arch_list:
        found = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if not found:
            continue
        kind, arch_major, arch_minor = found.group(1), int(found.group(2)), int(found.group(3))
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", metavar="WORDS", help="run only the lines whose name contains WORDS")
    parser.add_argument("--table", type=Path, help="where to write the table (default output/gpu-check-<time>.txt)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder of the trainings")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = probe_environment()
    print(env.describe(), flush=True)
    problem = environment_problem(env)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_UNFIT
    table_path = args.table or REPO / "output" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    return run_lines(env, args.only, table_path, args.keep)


def run_lines(env: Environment, only: str, table_path: Path, keep: bool) -> int:
    from ptengine.tools.gpu_check_lines import Check, line_functions
    from ptengine.tools.gpu_check_runs import Workspace
    from ptengine.tools.gpu_check_table import Table, finish

    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    table = Table()
    check = Check(Workspace(root, len(env.gpus)))
    lines = [line for line in line_functions(check) if only.lower() in line[0].lower()]
    if not lines:
        print(f"error: no line's name contains {only!r}; see python tools/gpu_check.py --help", file=sys.stderr)
        return EXIT_UNFIT
    for name, function, arguments in lines:
        table.run(name, function, *arguments)
    code = finish(table, table_path, header=env.describe())
    if keep or table.failed:
        print(f"gpu-check: the trainings' folders and logs (<name>.log) are in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
