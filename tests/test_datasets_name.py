"""Three of the project's folders have common names: ``datasets`` (Hugging Face's library, which MLflow knows),
``config`` and ``tools``. The project imports them as ``ptengine.<folder>`` (ptengine/__init__.py), so a package
of one of those names installed beside it is neither shadowed nor in the way. Trainings beside such packages,
from a folder outside the repository and from the command line, are in tests/test_api.py."""

import subprocess
import sys
from pathlib import Path

from fault_utils import process_env, stand_ins

import ptengine.datasets

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_projects_folders_are_imported_through_ptengine():
    assert Path(ptengine.datasets.__file__).resolve() == REPO_ROOT / "datasets" / "__init__.py"
    assert "digits" in ptengine.datasets.DATASET_REGISTRY
    code = "import sys, ptengine.tools.build; print(sorted({'datasets', 'config', 'tools'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd="/", env=process_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # the whole builder loaded, and none of the three bare names taken


def test_packages_of_those_names_stay_theirs_next_to_the_whole_project(tmp_path):
    code = ("import datasets, config, tools, ptengine.tools.build, ptengine.tools.train_net, engine.runner; "
            "print(datasets.STAND_IN, config.STAND_IN, tools.STAND_IN, datasets.__file__)")
    site = stand_ins(tmp_path)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=process_env(PYTHONPATH=site),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True", str(site / "datasets" / "__init__.py")]
