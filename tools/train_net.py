#!/usr/bin/env python
"""Train (or evaluate) a model from a config file.

    python tools/train_net.py --config-file config/digits.yaml [KEY VALUE ...]
    python tools/train_net.py --config-file config/digits.yaml OUTPUT_DIR output/run1 --resume
    python tools/train_net.py --config-file config/digits.yaml --eval-only MODEL.WEIGHTS output/run1/model_final.pth
    python tools/train_net.py --import my_models.py --config-file config/digits.yaml TRAIN.MODEL_TYPE mynet
    torchrun --nproc_per_node 2 tools/train_net.py --config-file ... TRAIN.DISTRIBUTED_BACKEND ddp

Argument parsing and one call of the engine's ``Runner`` (engine/runner.py), which owns the run's life.
"""

import argparse
import atexit
import os
import sys
from pathlib import Path

# Run as a script from any folder. Appended, not first: the project is imported as `ptengine` (ptengine/__init__.py)
# and its folders never shadow an installed package of the same name (Hugging Face's `datasets`).
sys.path.append(str(Path(__file__).resolve().parent.parent))

# Only light modules here: the arguments are parsed (and --help answered) before torch, torchvision or mlflow
# is imported, which takes seconds; main() imports the engine once it has something to run.
from ptengine.tools.restart_command import python_command, resume_command  # noqa: E402, F401 (part of this module's API)

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
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE",
                        help="a Python file (or module) to import first, for what it registers (config key IMPORTS)")
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
        elif token == "--import" and rest:
            args.imports.append(rest.pop(0))
        else:
            opts.append(token)
    args.opts = opts
    return args


def main(argv=None, hooks=(), loss=None) -> int:
    """The command line, and the way to train with your own hooks and loss from a script of yours that takes the
    same arguments (README, "Extending it"): ``hooks`` (HookBase instances) join the training; ``loss(logits,
    targets)``, summed over the batch, replaces cross-entropy for training. Returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from engine import Runner
    from engine.distributed import is_main_process
    from ptengine.tools import build

    runner = None
    try:
        cfg, tags = config_of(args)
        runner = Runner(cfg, build, hooks=hooks, loss=loss, tags=tags, tee_streams=True,
                        resume_hint=lambda folder: f" (from the repository root):\n{resume_command(argv, folder)}")
        if args.eval_only:
            runner.evaluate()
            return 0
        return 0 if runner.train(resume=args.resume).status == "FINISHED" else EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if is_main_process():
            print("interrupted at once; continue from the last checkpoint with (from the repository root):",
                  file=sys.stderr)
            print(resume_command(argv, runner.output_dir if runner else None), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)  # at once: skip the interpreter's slow teardown (seconds with torch loaded)
    except user_errors() as error:
        if args.debug:
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2


def config_of(args):
    """The frozen config the arguments ask for, and the MLflow tags that say where it came from."""
    from ptengine.config import setup_config
    from ptengine.tools.rerun import rerun_config

    if args.rerun:
        cfg, tags = rerun_config(args.rerun, list(args.opts or []))
    else:
        cfg, tags = setup_config(args), {}
    if args.imports:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.IMPORTS = list(cfg.IMPORTS) + list(args.imports)
        cfg.freeze()
    return cfg, tags


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
