"""What a run records about where it came from, so that it can be reproduced: and no secrets.

Every run carries, as MLflow tags: the git commit (``mlflow.source.git.commit``), the branch and whether the
tree was dirty; the exact command line (``command``); the seed; the Python, torch and CUDA versions; the
device names and the world size. Artifacts: ``requirements-freeze.txt`` (pip freeze) always, and
``git_diff.patch`` when the tree was dirty: tracked changes and new untracked files, as one patch that
``git apply`` takes on a checkout of the commit.

One real ``tools/train_net.py`` process (a quick synthetic run) is shared by the module: the command line and
the environment are those of a real process, with a secret planted in its environment.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import isolated_training
from fault_utils import empty_store

import ptengine.tools.run_record
from engine.run import RUN_ID_FILE, RunFolder, start_tracker
from ptengine.config import load_config
from ptengine.tools.build import build_run_record, make_tracker
from ptengine.tools.run_record import git_diff

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
SECRET = "s3cr3t-value"


def git(*args: str, cwd: Path = REPO_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """``python tools/train_net.py ...`` with ``MY_SECRET_TOKEN`` (and an MLflow password) in its environment."""
    workdir = tmp_path_factory.mktemp("run_record")
    output_dir = workdir / "output"
    tracking_uri = empty_store(workdir / "store")
    args = [str(TRAIN_NET), "DATA.DATASET_TYPE", "synthetic", "DATA.SYNTHETIC_SIZE", "128", "TRAIN.BATCH_SIZE", "32",
            "TRAIN.MAX_EPOCHS", "1", "SEED", "7", "MLFLOW.RUN_NAME", "record check", "LOG.PROGRESS_BAR", "False",
            "MLFLOW.LOG_MODEL", "False", "OUTPUT_DIR", str(output_dir), "MLFLOW.TRACKING_URI", tracking_uri]
    env = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW")}
    env.update(MY_SECRET_TOKEN=SECRET, MLFLOW_TRACKING_PASSWORD=SECRET)
    commits = {git("rev-parse", "HEAD")}  # other work may commit while the run starts
    process = subprocess.run([sys.executable, *args], cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=300)
    commits.add(git("rev-parse", "HEAD"))
    assert process.returncode == 0, process.stderr[-2000:]

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run((output_dir / RUN_ID_FILE).read_text().strip())
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(workdir / "artifacts")))
    return {"run": run, "tags": run.data.tags, "argv": [sys.executable, *args], "commits": commits,
            "artifacts": artifacts, "output_dir": output_dir}


def test_the_run_records_the_git_commit_and_branch(recorded):
    tags = recorded["tags"]
    assert tags["mlflow.source.git.commit"] in recorded["commits"]
    assert tags["git_branch"] == git("rev-parse", "--abbrev-ref", "HEAD")


def test_the_diff_is_an_artifact_exactly_when_the_tree_was_dirty(recorded):
    dirty = recorded["tags"]["git_dirty"]
    assert dirty in ("True", "False")
    diff = recorded["artifacts"] / "git_diff.patch"
    assert diff.is_file() == (dirty == "True")
    if diff.is_file():
        lines = [line for line in diff.read_text().splitlines() if not line.startswith("# not included")]
        assert lines[0].startswith("diff --git ")


def test_the_run_records_the_exact_command_line(recorded):
    assert recorded["tags"]["command"] == shlex.join(recorded["argv"])
    assert shlex.split(recorded["tags"]["command"])[-1] == recorded["argv"][-1]


def test_the_run_records_seed_versions_device_and_world_size(recorded):
    tags = recorded["tags"]
    assert tags["seed"] == "7"
    assert tags["torch_version"] == torch.__version__
    assert tags["cuda_version"] == str(torch.version.cuda)
    assert tags["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert tags["device"].startswith("cpu")  # this machine has no GPU
    assert tags["world_size"] == "1"


def test_the_run_records_pip_freeze(recorded):
    frozen = (recorded["artifacts"] / "requirements-freeze.txt").read_text().splitlines()
    pip_freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True,
                                check=True).stdout.splitlines()

    assert f"torch=={torch.__version__.split('+')[0]}" in frozen
    assert {line for line in pip_freeze if "==" in line and not line.startswith("#")} <= set(frozen)
    assert "ptengine==0.1.0" in frozen  # this project, installed editable (pip freeze names it in a comment)


def test_no_secret_from_the_environment_reaches_the_run(recorded):
    run = recorded["run"]
    assert all(SECRET not in f"{key}={value}" for key, value in run.data.tags.items())
    assert all(SECRET not in f"{key}={value}" for key, value in run.data.params.items())
    files = [path for path in recorded["artifacts"].rglob("*") if path.is_file()]
    assert {"config.yaml", "log.txt", "requirements-freeze.txt"} <= {path.name for path in files}
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path.name


# ---- the record of a checkout, made by start_tracker --------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the start_tracker examples below (creating a store takes a few seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('checkout_store') / 'mlflow.db'}"


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A small git repository (branch ``experiment``) that the run record reads instead of this one."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "experiment", cwd=repo)
    (repo / "train.py").write_text("LR = 0.1\nEPOCHS = 2\n")
    git("add", "train.py", cwd=repo)
    git("-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "first", cwd=repo)
    monkeypatch.setattr(ptengine.tools.run_record, "REPO_ROOT", repo)
    return repo


def record_of(tmp_path, store: str) -> tuple[mlflow.entities.Run, set[str]]:
    """Start and end a tracked run the way a training does; return it as stored, and its artifact names."""
    output_dir = tmp_path / "output"
    output_dir.mkdir()
    cfg = load_config(None, ["OUTPUT_DIR", str(output_dir), "MLFLOW.TRACKING_URI", store])
    with isolated_training(tmp_path):
        folder = RunFolder(output_dir)
        folder.write_config(cfg.dump())
        tracker = make_tracker(cfg, folder)
        start_tracker(tracker, build_run_record(cfg, torch.device("cpu"), 0, None, None, {}, "a checkout"))
        assert tracker.end("FINISHED")
    client = mlflow.MlflowClient(store)
    return client.get_run(tracker.run_id), {artifact.path for artifact in client.list_artifacts(tracker.run_id)}


def recorded_diff(tmp_path, store: str, run) -> Path:
    client = mlflow.MlflowClient(store)
    return Path(client.download_artifacts(run.info.run_id, "git_diff.patch", str(tmp_path)))


def test_a_clean_checkout_is_recorded_without_a_diff(checkout, tmp_path, store):
    (checkout / ".git" / "info" / "exclude").write_text("*.log\n")
    (checkout / "train.log").write_text("ignored files are not part of the diff\n")

    run, artifacts = record_of(tmp_path, store)

    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD", cwd=checkout)
    assert tags["git_branch"] == "experiment"
    assert tags["git_dirty"] == "False"
    assert "git_diff.patch" not in artifacts
    assert "requirements-freeze.txt" in artifacts


def test_a_dirty_checkout_is_recorded_with_its_diff(checkout, tmp_path, store):
    (checkout / "train.py").write_text("LR = 0.5\nEPOCHS = 2\n")

    run, artifacts = record_of(tmp_path, store)

    assert run.data.tags["git_dirty"] == "True"
    assert "git_diff.patch" in artifacts
    diff = recorded_diff(tmp_path, store, run).read_text()
    assert diff.startswith("diff --git a/train.py b/train.py")
    assert "-LR = 0.1\n+LR = 0.5\n EPOCHS = 2" in diff


def test_the_recorded_diff_applies_to_the_recorded_commit(checkout, tmp_path, store):
    (checkout / "train.py").write_text("LR = 0.5\nEPOCHS = 2\n")
    run, _ = record_of(tmp_path, store)
    patch = recorded_diff(tmp_path, store, run)

    git("checkout", "-q", run.data.tags["mlflow.source.git.commit"], "--", ".", cwd=checkout)  # back to the commit
    applied = subprocess.run(["git", "apply", str(patch)], cwd=checkout, capture_output=True, text=True)

    assert applied.returncode == 0, applied.stderr
    assert (checkout / "train.py").read_text() == "LR = 0.5\nEPOCHS = 2\n"


def test_a_new_untracked_file_makes_the_checkout_dirty(checkout, tmp_path, store):
    (checkout / "networks").mkdir()
    (checkout / "networks" / "mlp.py").write_text("HIDDEN = 64\n")

    run, artifacts = record_of(tmp_path, store)

    assert run.data.tags["git_dirty"] == "True"
    diff = recorded_diff(tmp_path, store, run).read_text()
    assert diff.startswith("diff --git a/networks/mlp.py b/networks/mlp.py\nnew file mode 100644\n")
    assert "+HIDDEN = 64\n" in diff


def apply_to_a_fresh_clone(checkout: Path, patch: str, tmp_path: Path) -> Path:
    """Clone the committed state of ``checkout`` and ``git apply`` the patch there."""
    clone = tmp_path / "clone"
    git("clone", "-q", str(checkout), str(clone), cwd=tmp_path)
    applied = subprocess.run(["git", "apply"], input=patch, cwd=clone, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    return clone


def test_the_diff_recreates_new_files_empty_ones_included(checkout, tmp_path):
    (checkout / "train.py").write_text("LR = 0.5\nEPOCHS = 2\n")
    (checkout / "new.py").write_text("import torch\n\nWIDTH = 3\n")
    (checkout / "empty.py").write_text("")
    (checkout / "package").mkdir()
    (checkout / "package" / "__init__.py").write_text("")

    patch = git_diff(checkout)
    clone = apply_to_a_fresh_clone(checkout, patch, tmp_path)

    assert "diff --git a/empty.py b/empty.py\nnew file mode 100644\nindex 0000000..e69de29\n" in patch
    for name in ("train.py", "new.py", "empty.py", "package/__init__.py"):
        assert (clone / name).read_text() == (checkout / name).read_text(), name
    assert git("ls-files", cwd=checkout) == "train.py"  # the checkout's own index is untouched


def test_binary_and_large_untracked_files_are_named_not_included(checkout, tmp_path):
    (checkout / "weights.pth").write_bytes(b"PK\x03\x04\x00\x00 binary")
    (checkout / "big.csv").write_text("0,1\n" * 300_000)  # 1.2 MB of text
    (checkout / "small.py").write_text("OK = True\n")

    patch = git_diff(checkout)
    clone = apply_to_a_fresh_clone(checkout, patch, tmp_path)

    assert patch.startswith("# not included (binary or over 1 MB): big.csv\n"
                            "# not included (binary or over 1 MB): weights.pth\n"
                            "diff --git a/small.py b/small.py\n")
    assert "0,1" not in patch
    assert (clone / "small.py").read_text() == "OK = True\n"
    assert not (clone / "big.csv").exists() and not (clone / "weights.pth").exists()


def test_outside_a_git_checkout_the_run_simply_has_no_git_tags(tmp_path, monkeypatch, store):
    not_a_repo = tmp_path / "plain_folder"
    not_a_repo.mkdir()
    monkeypatch.setattr(ptengine.tools.run_record, "REPO_ROOT", not_a_repo)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find a repository above it

    run, _ = record_of(tmp_path, store)

    assert run.info.status == "FINISHED"
    assert not {"mlflow.source.git.commit", "git_branch", "git_dirty"} & set(run.data.tags)
    assert run.data.tags["seed"] == "42"
