"""The README's "hook of your own" script is ``train_with_hook.py`` in the repository root, and it trains.

The user's way to extend the engine without editing it: subclass HookBase, call ``tools.train_net.main``.
"""

import re
import shlex
import subprocess
from pathlib import Path

import mlflow
import torch
from fault_utils import DIGITS_CONFIG, PYTHON, process_env

from engine.run import RUN_ID_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "train_with_hook.py"


def readme_hook_script() -> str:
    """The README's first python block that subclasses HookBase."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    return next(block for block in blocks if "(HookBase)" in block)


def test_the_readme_shows_the_script_in_the_repository_root_and_it_is_short():
    assert readme_hook_script() == SCRIPT.read_text()
    assert len(SCRIPT.read_text().splitlines()) <= 21


def test_the_script_trains_from_the_repository_root_and_its_hook_prints(tmp_path):
    output_dir, store = tmp_path / "output", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    done = subprocess.run([PYTHON, SCRIPT.name, "--config-file", str(DIGITS_CONFIG.relative_to(REPO_ROOT)),
                           "TRAIN.MAX_EPOCHS", "1", "OUTPUT_DIR", str(output_dir), "MLFLOW.LOG_MODEL", "False",
                           "MLFLOW.TRACKING_URI", store],
                          cwd=REPO_ROOT, env=process_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"my hook: epoch 1 ended at iteration 22, val_acc1 0\.\d{3}", done.stdout)
    state = torch.load(output_dir / "model_final.pth", weights_only=True)
    assert state and not any(key.startswith("module.") for key in state)
    assert "my hook: epoch 1" in (output_dir / "log.txt").read_text()
    # The run's Source is the script that was run, as its command tag says, not tools/train_net.py.
    tags = mlflow.MlflowClient(store).get_run((output_dir / RUN_ID_FILE).read_text().strip()).data.tags
    assert tags["mlflow.source.name"] == "train_with_hook.py"
    assert shlex.split(tags["command"])[1] == "train_with_hook.py"
