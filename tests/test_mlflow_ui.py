"""tools/mlflow_ui.sh: which store it serves, where, and a real server showing a real training run."""

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.tracking import LOCAL_STORE, artifact_root
from ptengine.config.defaults import REPO_ROOT
from tests.test_docker import REPO, command_dir, option, recorder

UI_SCRIPT = REPO / "tools" / "mlflow_ui.sh"
STARTUP_LIMIT_S = 60


def repo_copy(tmp_path: Path) -> Path:
    """The script and docker/env.sh in a repository of their own, so its default store is not ours."""
    repo = tmp_path / "repo"
    for relative in ("tools/mlflow_ui.sh", "docker/env.sh"):
        (repo / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / relative, repo / relative)
    return repo


def run_ui_script(script: Path, tmp_path: Path, env=None, fakes=None, args=()) -> subprocess.CompletedProcess:
    bin_dir = command_dir(tmp_path / "bin", fakes or {})
    return subprocess.run([bin_dir / "sh", script, *args], cwd=tmp_path, env={"PATH": str(bin_dir), **(env or {})},
                          capture_output=True, text=True, timeout=30)


# ---- the command line it builds (a fake mlflow records it) ------------------------------------------------
def test_by_default_it_serves_the_engines_local_store_on_127_0_0_1_port_5000(tmp_path):
    repo, log = repo_copy(tmp_path), tmp_path / "mlflow-arguments"
    result = run_ui_script(repo / "tools" / "mlflow_ui.sh", tmp_path, fakes={"mlflow": recorder(log)})
    assert result.returncode == 0, result.stderr

    store = f"sqlite:///{repo / LOCAL_STORE.relative_to(REPO_ROOT)}"  # <repo>/mlruns/mlflow.db, as the engine
    artifacts = artifact_root(store)  # where the engine puts a SQLite store's artifacts
    assert log.read_text().splitlines() == [
        "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", "5000", "--workers", "1",
        "--default-artifact-root", artifacts, "--artifacts-destination", artifacts,
    ]
    assert "http://127.0.0.1:5000" in result.stderr


def test_by_default_it_starts_one_worker_and_no_job_runners_and_options_given_win(tmp_path):
    log = tmp_path / "mlflow-arguments"
    fake = recorder(log) + f'; echo "jobs=$MLFLOW_SERVER_ENABLE_JOB_EXECUTION" >> {log}'
    result = run_ui_script(UI_SCRIPT, tmp_path, fakes={"mlflow": fake}, args=["--workers", "3"])
    assert result.returncode == 0, result.stderr

    arguments = log.read_text().splitlines()
    assert arguments[arguments.index("--workers") + 1] == "1"  # the default, before the user's options
    assert arguments[-3:] == ["--workers", "3", "jobs=false"]  # the user's come last: click keeps the last value


def test_it_serves_mlflow_tracking_uri_at_mlflow_port_and_passes_extra_options_on(tmp_path):
    log = tmp_path / "mlflow-arguments"
    store = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    result = run_ui_script(UI_SCRIPT, tmp_path, env={"MLFLOW_TRACKING_URI": store, "MLFLOW_PORT": "5077"},
                           fakes={"mlflow": recorder(log)}, args=["--workers", "1"])
    assert result.returncode == 0, result.stderr

    arguments = log.read_text().splitlines()
    assert arguments[:7] == ["server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", "5077"]
    assert arguments[-5:] == [artifact_root(store), "--artifacts-destination", artifact_root(store), "--workers", "1"]


def test_a_relative_sqlite_path_is_taken_from_the_current_folder_as_the_engine_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log, store = tmp_path / "mlflow-arguments", "sqlite:///runs/mlflow.db"
    result = run_ui_script(UI_SCRIPT, tmp_path, env={"MLFLOW_TRACKING_URI": store}, fakes={"mlflow": recorder(log)})
    assert result.returncode == 0, result.stderr

    arguments = log.read_text().splitlines()
    assert arguments[2] == store  # mlflow reads it from the same folder
    expected = (tmp_path / "runs" / "artifacts").as_uri()
    assert option(arguments, "--default-artifact-root") == [artifact_root(store)] == [expected]


def test_a_non_sqlite_store_is_served_as_it_is(tmp_path):
    log = tmp_path / "mlflow-arguments"
    store = "postgresql://mlflow@db.internal/mlflow"
    result = run_ui_script(UI_SCRIPT, tmp_path, env={"MLFLOW_TRACKING_URI": store}, fakes={"mlflow": recorder(log)})
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["server", "--backend-store-uri", store, "--host", "127.0.0.1",
                                            "--port", "5000", "--workers", "1"]


def test_without_mlflow_on_path_it_uses_the_repos_venv(tmp_path):
    repo, log = repo_copy(tmp_path), tmp_path / "mlflow-arguments"
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "mlflow").write_text(f"#!/bin/sh\n{recorder(log)}\n")
    (venv_bin / "mlflow").chmod(0o755)

    result = run_ui_script(repo / "tools" / "mlflow_ui.sh", tmp_path)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[0] == "server"


def test_it_says_what_to_do_when_mlflow_is_missing(tmp_path):
    result = run_ui_script(repo_copy(tmp_path) / "tools" / "mlflow_ui.sh", tmp_path)
    assert result.returncode == 127 and "make ui" in result.stderr


def test_it_refuses_to_serve_a_uri_that_is_already_a_server(tmp_path):
    log = tmp_path / "mlflow-arguments"
    result = run_ui_script(UI_SCRIPT, tmp_path, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"},
                           fakes={"mlflow": recorder(log)})
    assert result.returncode == 2 and "already a tracking server" in result.stderr
    assert not log.exists()


# ---- a real server over a real training run ---------------------------------------------------------------
@pytest.fixture
def restored_environ():
    """Training sets MLflow variables in os.environ; put it back as it was."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def train_one_epoch(tmp_path: Path, store: str) -> None:
    import engine.logger
    from ptengine.tools.train_net import main

    try:
        exit_code = main(["--config-file", str(REPO / "config" / "digits.yaml"), "OUTPUT_DIR", str(tmp_path / "out"),
                          "MLFLOW.TRACKING_URI", store, "TRAIN.MAX_EPOCHS", "1", "LOG.PROGRESS_BAR", "False"])
    finally:
        engine.logger.restore_streams()
    assert exit_code == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ui(store: str, port: int, tmp_path: Path) -> subprocess.Popen:
    """``sh tools/mlflow_ui.sh`` as `make ui` runs it, in a process group of its own, output to ui.log.

    Kept light for a small test machine: one worker, and none of MLflow's background job runners (about
    eight more Python processes that this project does not use).
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith(("_MLFLOW", "MLFLOW"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", MLFLOW_TRACKING_URI=store, MLFLOW_PORT=str(port),
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(tmp_path / "ui.log", "w") as log:
        return subprocess.Popen(["sh", UI_SCRIPT, "--workers", "1"], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_healthy(server: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the UI exited with {server.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    pytest.fail(f"the UI did not answer /health within {STARTUP_LIMIT_S} s:\n{log.read_text()}")


def api(port: int, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (read from the kernel's tables)."""
    addresses = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                addresses.add(str(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))))
    return addresses


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the whole process group (mlflow starts uvicorn and job runners), SIGKILL what stays."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and group_alive(server.pid):
        time.sleep(0.2)
    if group_alive(server.pid):
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        pytest.fail("the UI's processes outlived SIGTERM by 15 s")


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def test_the_ui_serves_a_training_run_through_the_rest_api_on_localhost_only(tmp_path, monkeypatch, restored_environ):
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    train_one_epoch(tmp_path, store)

    port = free_port()
    server = start_ui(store, port, tmp_path)
    try:
        wait_until_healthy(server, port, tmp_path / "ui.log")
        assert listening_addresses(port) == {"127.0.0.1"}
        command_line = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert command_line[1].endswith(b"mlflow") and command_line[2] == b"server"  # exec'd: signals reach it

        experiment = api(port, "experiments/get-by-name?experiment_name=digits")["experiment"]
        runs = api(port, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert len(runs) == 1
        run = runs[0]
        assert run["info"]["status"] == "FINISHED"
        assert {"key": "TRAIN.MAX_EPOCHS", "value": "1"} in run["data"]["params"]
        assert run["data"]["metrics"]
        artifacts = api(port, f"artifacts/list?run_id={run['info']['run_id']}")["files"]
        assert "config.yaml" in {artifact["path"] for artifact in artifacts}
    finally:
        stop(server)
    assert not group_alive(server.pid)
    assert listening_addresses(port) == set()
