"""What a run records about where it came from, as MLflow tags: enough to reproduce it, no secrets.

Environment variables are never dumped wholesale; the diff and the package list go in as artifacts
by the caller only when useful (a dirty tree), the rest as short tags.
"""

import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from engine.distributed import get_world_size, in_process_group
from engine.precision import AMP_DTYPES, autocast_runs_on
from engine.tracking import redact_credentials
from ptengine.config.defaults import REPO_ROOT

MAX_UNTRACKED_BYTES = 1 << 20  # a larger untracked file is named in the patch, not copied into it
BINARY_PROBE_BYTES = 8192  # git's own test: a NUL byte in the first 8 KB makes a file binary
LEFT_OUT_NOTE = "# not included (binary or over 1 MB): "


def _git(*args, strip: bool = True, repo: Path | None = None, env: dict | None = None,
         stdin: str | None = None) -> str | None:
    try:
        # REPO_ROOT is read at call time, so pointing the module at another checkout moves every git call.
        result = subprocess.run(["git", *args], cwd=repo or REPO_ROOT, capture_output=True, text=True, timeout=10,
                                env=env, input=stdin)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() if strip else result.stdout


def collect_run_record(cfg, device, num_gpus: int) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=normal")  # a new file is a change too
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
        "amp_dtype": _autocast_type(cfg, device),
        "host": platform.node(),
    }
    if commit:
        record["mlflow.source.git.commit"] = commit
        record["git_branch"] = _git("rev-parse", "--abbrev-ref", "HEAD") or ""
        record["git_dirty"] = str(bool(status))
    return record


def _autocast_type(cfg, device) -> str:
    """The autocast type training runs in (TRAIN.AMP, TRAIN.AMP_DTYPE), or float32 without autocast."""
    dtype = AMP_DTYPES[cfg.TRAIN.AMP_DTYPE]
    return cfg.TRAIN.AMP_DTYPE if cfg.TRAIN.AMP and autocast_runs_on(device, dtype) else "float32"


def git_diff(repo: Path | None = None) -> str:
    """The uncommitted changes against HEAD as a patch ``git apply`` takes ('' for a clean tree or outside git).

    Untracked, not ignored files come in as new files. Binary ones and those over 1 MB are only named, in
    comment lines above the first ``diff --git`` (which ``git apply`` skips).
    """
    repo = Path(repo or REPO_ROOT)
    listing = _git("ls-files", "--others", "--exclude-standard", "-z", strip=False, repo=repo) or ""
    untracked = [path for path in listing.split("\0") if path]
    left_out = [path for path in untracked if _binary_or_large(repo / path)]
    included = [path for path in untracked if path not in left_out]
    notes = "".join(f"{LEFT_OUT_NOTE}{path}\n" for path in left_out)
    return notes + _diff_with_new_files(repo, included)


def _diff_with_new_files(repo: Path, new_files: list[str]) -> str:
    if not new_files:
        return _git("diff", "HEAD", strip=False, repo=repo) or ""  # exactly as git prints it
    index = _git("rev-parse", "--git-path", "index", repo=repo)
    with tempfile.TemporaryDirectory() as scratch:
        # Marked intent-to-add in a copy of the index, the files show in `git diff` as new files (empty ones
        # too), and the user's own index is never written.
        temp_index = Path(scratch) / "index"
        if index and (repo / index).is_file():
            shutil.copyfile(repo / index, temp_index)
        env = {**os.environ, "GIT_INDEX_FILE": str(temp_index)}
        _git("--literal-pathspecs", "add", "--intent-to-add", "--pathspec-from-file=-", "--pathspec-file-nul",
             repo=repo, env=env, stdin="\0".join(new_files))
        return _git("diff", "HEAD", strip=False, repo=repo, env=env) or ""


def _binary_or_large(path: Path) -> bool:
    """True for what a text patch cannot carry well: big files, binary or non-UTF-8 content, nested repos."""
    if path.is_symlink():
        return False  # git records the link's target, a short text
    try:
        if not path.is_file() or path.stat().st_size > MAX_UNTRACKED_BYTES:
            return True
        content = path.read_bytes()
        content.decode("utf-8")  # the patch is text; other encodings would not survive it
    except (OSError, UnicodeDecodeError):
        return True
    return b"\0" in content[:BINARY_PROBE_BYTES]


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
