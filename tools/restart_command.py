"""The command that continues an interrupted run the way it was started: the same script (tools/train_net.py or
a script of yours that calls its ``main``), under torchrun with the same options when it ran under torchrun,
the same arguments, its OUTPUT_DIR, and ``--resume``. Paths inside the repository are written from its root,
where the command is to be pasted.
"""

import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from ptengine.config.defaults import REPO_ROOT

TRAIN_NET = "tools/train_net.py"


def resume_command(argv: list[str], output_dir, script: str | None = None, launcher: list[str] | None = None) -> str:
    """``launcher`` (default: this process's own: the interpreter, or torchrun and its options) ``script``
    (default: the one that was run) ``argv`` with OUTPUT_DIR ``output_dir`` and ``--resume``."""
    args, rest = [], list(argv)
    while rest:
        token = rest.pop(0)
        if token == "--resume":
            continue
        if token == "OUTPUT_DIR" and rest:
            rest.pop(0)
            continue
        if token in ("--config-file", "--import") and rest:
            token = f"{token} {shlex.quote(_from_repo_root(rest.pop(0)))}"
        else:
            token = shlex.quote(token)
        args.append(token)
    if output_dir is not None:
        args += ["OUTPUT_DIR", shlex.quote(_from_repo_root(str(output_dir)))]
    launcher = launcher if launcher is not None else this_launcher()
    script = _from_repo_root(script or running_script())
    return " ".join([*launcher, shlex.quote(script), *args, "--resume"])


def running_script() -> str:
    """The Python file this process was started with (``python train_with_hook.py``: that one), else
    tools/train_net.py (when ``main`` is called from other code, e.g. a test runner)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py"):
        return str(REPO_ROOT / TRAIN_NET)
    resolved = Path(path).resolve()
    installed = [Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")]
    if any(resolved.is_relative_to(folder) for folder in installed):
        return str(REPO_ROOT / TRAIN_NET)
    return str(resolved)


def this_launcher() -> list[str]:
    """How this process was launched: torchrun (or ``python -m torch.distributed.run``) with its options when
    it is a torchrun worker, else the interpreter as ``python_command`` writes it."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return torchrun_launcher()
    return [shlex.quote(python_command())]


def torchrun_launcher() -> list[str]:
    """torchrun and the options it was given, read from the command line of the agent that started this worker
    (its parent process); from the environment torchrun sets when that cannot be read."""
    agent, agent_folder = _parent_command_line()
    script = Path(running_script()).resolve()
    for start, token in enumerate(agent):
        if token.endswith("torchrun") or token == "torch.distributed.run":
            options = agent[start + 1:]
            at = next((i for i, option in enumerate(options) if (agent_folder / option).resolve() == script), None)
            if at is not None:
                name = _from_repo_root(token) if token.endswith("torchrun") else f"{python_command()} -m {token}"
                return [shlex.quote(name), *map(shlex.quote, options[:at])]
    local, world = os.environ.get("LOCAL_WORLD_SIZE", "1"), os.environ.get("WORLD_SIZE", "1")
    launcher = ["torchrun", "--nproc_per_node", local]
    if world != local:
        nodes = int(world) // max(int(local), 1)
        endpoint = f"{os.environ.get('MASTER_ADDR', 'localhost')}:{os.environ.get('MASTER_PORT', '29500')}"
        launcher += ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
    return launcher


def _parent_command_line() -> tuple[list[str], Path]:
    """The parent process's arguments and working folder (Linux's /proc; nothing elsewhere)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        folder = Path(f"/proc/{os.getppid()}/cwd").resolve()
    except OSError:
        return [], Path.cwd()
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part], folder


def python_command() -> str:
    """How to call this interpreter from the repository root: ``.venv/bin/python`` when it is the project's
    venv (it works whether or not the venv is activated), ``python`` when that is it, else its full path."""
    executable = Path(sys.executable)
    if executable.absolute().is_relative_to(REPO_ROOT):
        return str(executable.absolute().relative_to(REPO_ROOT))
    on_path = shutil.which("python")
    return "python" if on_path and Path(on_path).resolve() == executable.resolve() else str(executable)


def _from_repo_root(path: str) -> str:
    absolute = Path(path).absolute()
    if absolute.is_relative_to(REPO_ROOT):
        return str(absolute.relative_to(REPO_ROOT))
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(resolved)
