"""Three of the project's folders have common names: ``datasets`` (Hugging Face's library, which MLflow knows),
``config`` and ``tools``. The project imports them as ``ptengine.<folder>`` (ptengine/__init__.py), so a package
of one of those names installed beside it is neither shadowed nor in the way, from a folder outside the
repository and from the command line."""

import subprocess
import sys
from pathlib import Path

from fault_utils import empty_store, process_env, runs_of

import ptengine.datasets

REPO_ROOT = Path(__file__).resolve().parent.parent
STAND_INS = ("datasets", "config", "tools")

USER_SCRIPT = """
import sys
import datasets, config, tools                      # the other packages of those names
assert all(getattr(m, "STAND_IN", False) for m in (datasets, config, tools)), [datasets, config, tools]
import ptengine, engine                             # this project, as installed
cfg = ptengine.load_config(opts=sys.argv[1:])
result = ptengine.Runner(cfg).train()
import datasets as again
assert again is datasets and sys.modules["config"] is config and sys.modules["tools"] is tools
print("trained", result.status, result.final_metrics["val_acc1"], "with", datasets.__file__)
"""


def stand_ins(folder: Path) -> Path:
    """Packages named datasets, config and tools, as another library would install them."""
    site = folder / "site"
    for name in STAND_INS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("STAND_IN = True\n")
    return site


def quick_run(folder: Path) -> list[str]:
    return ["DATA.DATASET_TYPE", "synthetic", "DATA.SYNTHETIC_SIZE", "128", "TRAIN.BATCH_SIZE", "32",
            "TRAIN.MAX_EPOCHS", "1", "TRAIN.GPUS", "0", "MLFLOW.LOG_MODEL", "False", "MLFLOW.SYSTEM_METRICS", "False",
            "LOG.PROGRESS_BAR", "False", "MLFLOW.EXPERIMENT_NAME", "names", "OUTPUT_DIR", str(folder / "output"),
            "MLFLOW.TRACKING_URI", empty_store(folder / "store")]


def test_the_projects_folders_are_imported_through_ptengine():
    assert Path(ptengine.datasets.__file__).resolve() == REPO_ROOT / "datasets" / "__init__.py"
    assert "digits" in ptengine.datasets.DATASET_REGISTRY
    code = "import sys, ptengine.tools.build; print(sorted({'datasets', 'config', 'tools'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd="/", env=process_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # the whole builder loaded, and none of the three bare names taken


def test_packages_named_datasets_config_and_tools_beside_it_are_not_shadowed(tmp_path):
    site = stand_ins(tmp_path)
    (tmp_path / "user_script.py").write_text(USER_SCRIPT)
    done = subprocess.run([sys.executable, "user_script.py", *quick_run(tmp_path)], cwd=tmp_path,
                          env=process_env(PYTHONPATH=site), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"with {site / 'datasets' / '__init__.py'}" in done.stdout
    assert [run.info.status for run in runs_of(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "names")] == \
        ["FINISHED"]


def test_the_command_line_trains_beside_a_package_named_datasets(tmp_path):
    site = stand_ins(tmp_path)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), *quick_run(tmp_path)],
                          cwd=tmp_path, env=process_env(PYTHONPATH=site), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "output" / "model_final.pth").is_file()
