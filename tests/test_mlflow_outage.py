"""The MLflow tracking server goes away: training never waits for it, and no metric is lost.

Two runs of the small digits config log to a real ``mlflow server`` on 127.0.0.1, at the same time:

* "mid-run": its server is up when it starts, is killed (SIGKILL, as in a crash) once the first metrics
  arrived, and is started again on the same port. Steps are slowed down (0.25 s each, no effect on the
  numbers) so that the outage falls in the middle of training.
* "whole-run": no server answers on its port until the run is over. The records it could not deliver go
  to OUTPUT_DIR/mlflow_pending.jsonl; then its server starts and ``tools/upload_pending.py`` delivers them.

Both must end with every metric step exactly once, with the values of the uninterrupted reference run.
"""

import subprocess
import time

import pytest
from fault_utils import (
    MAX_ITER,
    PYTHON,
    UPLOAD_PENDING,
    IterationClock,
    MlflowServer,
    Training,
    log_text,
    metric_history,
    mlflow_client,
    process_env,
    runs_of,
    shared_reference_run,
    small_run_args,
    wait_for,
)

SLOW_STEP = 0.25


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return shared_reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def outage(tmp_path_factory, reference):
    workdir = tmp_path_factory.mktemp("outage")
    server, late_server = MlflowServer(workdir / "server"), MlflowServer(workdir / "late-server")
    mid_run = Training(small_run_args(workdir / "mid-run", server.url, "LOG.PERIOD", "1"), workdir, "mid-run",
                       slow_step=SLOW_STEP)
    whole_run = Training(small_run_args(workdir / "whole-run", late_server.url, "MLFLOW.END_WAIT", "5"), workdir,
                         "whole-run")
    facts = {"mid-run": workdir / "mid-run", "whole-run": workdir / "whole-run", "server": server,
             "late server": late_server}
    try:
        whole_run.start()
        server.start()
        mid_run.start()
        with IterationClock(workdir / "mid-run") as clock:
            wait_for(lambda: delivered_steps(server.url, "train_loss") >= 2, "the first metrics on the server",
                     process=mid_run, interval=0.5)
            facts["down at"] = time.monotonic()
            facts["iteration when the server went down"] = max(clock.seen, default=0)
            server.stop()
            # Metrics go out in batches (every few seconds): the server stays down until a delivery failed.
            wait_for(lambda: "MLflow logging failed" in log_text(workdir / "mid-run"), "a failed delivery",
                     process=mid_run, interval=0.2)
            server.start()  # the same port and store; takes several seconds, as a real restart does
            facts["back at"] = time.monotonic()
            facts["iteration when the server came back"] = max(clock.seen, default=0)
            facts["mid-run exit code"] = mid_run.wait()
        facts["clock"] = clock
        facts["whole-run exit code"] = whole_run.wait()
        facts["whole-run wait at the end"] = seconds_between(log_text(workdir / "whole-run"), "model_final.pth",
                                                             "upload later with")
        facts["pending file"] = (workdir / "whole-run" / "mlflow_pending.jsonl").read_text().splitlines()
        late_server.start()
        facts["upload"] = subprocess.run([PYTHON, str(UPLOAD_PENDING), str(workdir / "whole-run")], cwd=workdir,
                                         env=process_env(), capture_output=True, text=True, timeout=300)
        yield facts  # the servers stay up while the tests read from them
    finally:
        for process in (mid_run, whole_run):
            process.kill()
        server.stop()
        late_server.stop()


def delivered_steps(tracking_uri, key: str) -> int:
    runs = runs_of(tracking_uri)
    return len(metric_history(tracking_uri, runs[0].info.run_id, key)) if runs else 0


def seconds_between(log: str, first: str, last: str) -> float:
    """Seconds between the log lines containing ``first`` and ``last`` (log.txt stamps month, day and whole
    seconds; a year is added to parse them)."""
    def stamp(text):
        line = next(line for line in log.splitlines() if text in line)
        return time.mktime(time.strptime(f"2000-{line[1:15]}", "%Y-%m-%d %H:%M:%S"))
    return stamp(last) - stamp(first)


def only_run(tracking_uri):
    (run,) = runs_of(tracking_uri)
    return run


# ---- the server vanishes mid-run and comes back ---------------------------------------------------------------
def test_the_outage_fell_in_the_middle_of_training(outage):
    assert outage["mid-run exit code"] == 0
    assert 0 < outage["iteration when the server went down"] < MAX_ITER
    assert "MLflow logging failed" in log_text(outage["mid-run"])  # noticed, and retried in the background


def test_training_did_not_stall_while_the_server_was_down(outage):
    clock = outage["clock"]
    assert sorted(clock.seen) == list(range(1, MAX_ITER + 1))
    # The server stayed down until a delivery had failed and was retried in the background; training waiting
    # for it would have made no step meanwhile.
    went_down, came_back = outage["iteration when the server went down"], outage["iteration when the server came back"]
    print(f"iterations {went_down} to {came_back} ran while the server was down")
    assert came_back > went_down


def test_every_metric_reached_the_restarted_server_once_with_the_right_values(outage, reference):
    run = only_run(outage["server"].url)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "lr", "val_loss", "val_acc1", "epoch"):
        assert metric_history(outage["server"].url, run.info.run_id, key) == reference.history(key), key
    assert not (outage["mid-run"] / "mlflow_pending.jsonl").exists()  # nothing left over


def test_the_artifacts_queued_during_the_outage_arrived_too(outage):
    run = only_run(outage["server"].url)
    artifacts = {item.path for item in mlflow_client(outage["server"].url).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "log.txt", "requirements-freeze.txt", "confusion_matrix.png"} <= artifacts


# ---- no server for the whole run, uploaded afterwards ---------------------------------------------------------
def test_without_a_server_the_run_finishes_and_keeps_its_records_in_a_pending_file(outage):
    output_dir = outage["whole-run"]
    assert outage["whole-run exit code"] == 0
    assert (output_dir / "model_final.pth").is_file()
    log = log_text(output_dir)
    assert f"MLflow at {outage['late server'].url} is unreachable" in log
    assert f"upload later with: python tools/upload_pending.py {output_dir}" in log
    records = outage["pending file"]
    assert sum('"metric", "train_loss"' in line for line in records) == MAX_ITER
    # Waiting for the server at the end is bounded (MLFLOW.END_WAIT, 5 s here): the run gave up and ended.
    print(f"after training, the run waited {outage['whole-run wait at the end']:.0f} s for MLflow before giving up")
    assert outage["whole-run exit code"] == 0


def test_upload_pending_delivers_every_metric_once_after_the_server_starts(outage, reference):
    upload = outage["upload"]
    assert upload.returncode == 0, upload.stderr
    assert "uploaded" in upload.stdout
    assert not (outage["whole-run"] / "mlflow_pending.jsonl").exists()
    run = only_run(outage["late server"].url)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "lr", "val_loss", "val_acc1", "epoch"):
        assert metric_history(outage["late server"].url, run.info.run_id, key) == reference.history(key), key
    expected = mlflow_client(reference.tracking_uri).get_run(reference.run_id).data.params
    assert run.data.params.keys() == expected.keys()
    assert run.data.params["TRAIN.LR"] == "0.02"


def test_upload_pending_delivers_the_artifacts_of_the_pending_file(outage):
    run = only_run(outage["late server"].url)
    artifacts = {item.path for item in mlflow_client(outage["late server"].url).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "log.txt", "requirements-freeze.txt", "confusion_matrix.png"} <= artifacts


def test_upload_pending_creates_the_run_with_its_run_record_tags(outage, reference):
    tags = only_run(outage["late server"].url).data.tags
    expected = mlflow_client(reference.tracking_uri).get_run(reference.run_id).data.tags
    assert tags.get("seed") == expected["seed"] == "42"
    assert tags.get("mlflow.source.name") == expected["mlflow.source.name"]
