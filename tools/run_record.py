"""What a run records about where it came from, as MLflow tags: enough to reproduce it, no secrets.

Environment variables are never dumped wholesale; the diff and the package list go in as artifacts
by the caller only when useful (a dirty tree), the rest as short tags.
"""

import platform
import re
import shlex
import subprocess
import sys

import torch

from config.defaults import REPO_ROOT
from engine.distributed import get_world_size, in_process_group


def _git(*args, strip: bool = True) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() if strip else result.stdout


def collect_run_record(cfg, device, num_gpus: int) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    record = {
        "mlflow.source.name": "tools/train_net.py",
        "mlflow.source.type": "LOCAL",
        "command": redact_credentials(shlex.join([sys.executable, *sys.argv])),
        "seed": str(cfg.SEED),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "device": _device_names(device, num_gpus),
        "world_size": str(get_world_size()),
        "distributed_backend": torch.distributed.get_backend() if in_process_group() else "none",
        "host": platform.node(),
    }
    if commit:
        record["mlflow.source.git.commit"] = commit
        record["git_branch"] = _git("rev-parse", "--abbrev-ref", "HEAD") or ""
        record["git_dirty"] = str(bool(status))
    return record


def redact_credentials(value):
    """``http://user:secret@host`` -> ``http://user:***@host``: passwords never reach MLflow."""
    return re.sub(r"(://[^/:@\s]+):[^/@\s]+@", r"\1:***@", value) if isinstance(value, str) else value


def git_diff() -> str:
    """The uncommitted changes to tracked files ('' for a clean tree or outside git)."""
    return _git("diff", "HEAD", strip=False) or ""  # exactly as git prints it, so `git apply` takes it


def installed_packages() -> str:
    """``pip freeze``'s content, read in-process from the installed distributions (no subprocess)."""
    from importlib.metadata import distributions

    names = {f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"]}
    return "\n".join(sorted(names, key=str.lower)) + "\n"


def _device_names(device, num_gpus: int) -> str:
    if device.type != "cuda":
        return f"cpu ({platform.processor() or platform.machine()})"
    count = max(num_gpus, 1)
    return ", ".join(torch.cuda.get_device_name(device.index + i if count == 1 else i) for i in range(count))
