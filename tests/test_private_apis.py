"""The one private function of a dependency the engine calls, and why (engine/run.py ``set_deterministic``):
``torch._C._set_deterministic_algorithms`` sets what ``torch.use_deterministic_algorithms`` sets, without importing
``torch._inductor`` (~1 s of every start). These fail when torch renames it or changes what it does."""

import subprocess
import sys

import torch

from engine.run import set_deterministic


def switches() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def test_set_deterministic_sets_torchs_switches_as_the_public_function_does():
    before = switches()
    try:
        for mode, warn_only in ((True, False), (True, True), (False, False)):
            set_deterministic(mode, warn_only=warn_only)
            mine = switches()
            torch.use_deterministic_algorithms(mode, warn_only=warn_only)
            assert mine == switches() == (mode, warn_only)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_set_deterministic_does_not_import_inductor():
    code = ("import sys, torch; from engine.run import set_deterministic; set_deterministic(True); "
            "print('torch._inductor.config' in sys.modules, torch.are_deterministic_algorithms_enabled())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]
