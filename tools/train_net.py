#!/usr/bin/env python
"""Train (or evaluate) a model from a config file.

    python tools/train_net.py --config-file config/digits.yaml [KEY VALUE ...]
    python tools/train_net.py --config-file config/digits.yaml OUTPUT_DIR output/run1 --resume
    python tools/train_net.py --config-file config/digits.yaml --eval-only MODEL.WEIGHTS output/run1/model_final.pth
    torchrun --nproc_per_node 2 tools/train_net.py --config-file ... TRAIN.DISTRIBUTED_BACKEND ddp
"""

import argparse
import atexit
import os
import shlex
import shutil
import sys
from pathlib import Path

# Run as a script from any folder. Appended, not first: the project is imported as `ptengine` (ptengine/__init__.py)
# and its folders never shadow an installed package of the same name (Hugging Face's `datasets`).
sys.path.append(str(Path(__file__).resolve().parent.parent))

# Only light modules here: the arguments are parsed (and --help answered) before torch, torchvision or mlflow
# is imported, which takes seconds; main() imports the engine once it has something to run.
from ptengine.config.defaults import REPO_ROOT  # noqa: E402

EXIT_INTERRUPTED = 130


def user_errors() -> tuple:
    """Mistakes a user can make: printed as one line, exit code 2, no traceback (unless --debug)."""
    from engine.checkpoint import CheckpointError
    from ptengine.config import ConfigError
    from ptengine.datasets import DatasetError

    return ConfigError, DatasetError, CheckpointError, FloatingPointError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="YAML file of config overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT_DIR")
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS on EVAL.SPLIT, no training")
    parser.add_argument("--rerun", metavar="RUN_ID", help="train again from the config.yaml of an MLflow run")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs, e.g. TRAIN.LR 0.05")
    args = parser.parse_args(argv)
    # REMAINDER keeps values such as "-1" intact but also swallows flags written after the pairs
    # ("... TRAIN.LR 0.1 --resume"): take those back out.
    opts, rest = [], list(args.opts or [])
    while rest:
        token = rest.pop(0)
        if token in ("--resume", "--eval-only", "--debug"):
            setattr(args, token[2:].replace("-", "_"), True)
        elif token in ("--config-file", "--rerun") and rest:
            setattr(args, token[2:].replace("-", "_"), rest.pop(0))
        else:
            opts.append(token)
    args.opts = opts
    return args


def main(argv=None, hooks=(), loss=None) -> int:
    """The command line, and the public way to train with your own hooks and loss (README, "Extending it"):
    ``hooks`` (HookBase instances) join the training; ``loss(logits, targets)``, summed over the batch,
    replaces cross-entropy for training. Returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from engine.hooks import TrainingInterrupted
    from ptengine.config import setup_config
    from ptengine.tools.rerun import rerun_config
    from ptengine.tools.run import evaluate_only, train

    try:
        if args.rerun:
            cfg, source_tags = rerun_config(args.rerun, list(args.opts or []))
        else:
            cfg, source_tags = setup_config(args), {}
        if args.eval_only:
            evaluate_only(cfg)
        else:
            train(cfg, resume=args.resume, extra_tags=source_tags, hooks=hooks, loss=loss)
        return 0
    except TrainingInterrupted as stop:
        print(f"training interrupted: {stop}; continue it with (from the repository root):", file=sys.stderr)
        print(resume_command(argv, getattr(stop, "output_dir", None)), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as stop:
        print("interrupted at once; continue from the last checkpoint with (from the repository root):",
              file=sys.stderr)
        print(resume_command(argv, getattr(stop, "output_dir", None)), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)  # at once: skip the interpreter's slow teardown (seconds with torch loaded)
    except user_errors() as error:
        if args.debug:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2


def resume_command(argv: list[str], output_dir) -> str:
    """The command that continues this run: the same arguments, its OUTPUT_DIR, and --resume.

    Paths are written relative to the repository root when they are inside it, as the command is run from there.
    """
    args, rest = [], list(argv)
    while rest:
        token = rest.pop(0)
        if token == "--resume":
            continue
        if token == "OUTPUT_DIR" and rest:
            rest.pop(0)
            continue
        if token == "--config-file" and rest:
            token = f"{token} {shlex.quote(_from_repo_root(rest.pop(0)))}"
        else:
            token = shlex.quote(token)
        args.append(token)
    if output_dir is not None:
        args += ["OUTPUT_DIR", shlex.quote(_from_repo_root(str(output_dir)))]
    return " ".join([shlex.quote(python_command()), "tools/train_net.py", *args, "--resume"])


def python_command() -> str:
    """How to call this interpreter from the repository root: ``.venv/bin/python`` when it is the project's
    venv (it works whether or not the venv is activated), ``python`` when that is it, else its full path."""
    executable = Path(sys.executable)
    if executable.absolute().is_relative_to(REPO_ROOT):
        return str(executable.absolute().relative_to(REPO_ROOT))
    on_path = shutil.which("python")
    return "python" if on_path and Path(on_path).resolve() == executable.resolve() else str(executable)


def _from_repo_root(path: str) -> str:
    absolute = Path(path).resolve()
    return str(absolute.relative_to(REPO_ROOT)) if absolute.is_relative_to(REPO_ROOT) else str(absolute)


def one_line(error: Exception) -> str:
    """The message itself, also for errors re-raised from DataLoader workers (which prepend a traceback)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


def exit_at_once(code: int):
    """End the process without the interpreter's teardown, once everything is on disk: freeing torch's modules
    one by one takes ~0.7 s of CPU, and C++ objects destroyed at that point (Gloo's threads) are where a
    finished DDP rank was seen to abort under load ("terminate called without an active exception"). The exit
    handlers (logging's, multiprocessing's) still run."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_at_once(main())
