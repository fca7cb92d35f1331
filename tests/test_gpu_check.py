"""``make gpu-check`` (tools/gpu_check.py) where it can run without a GPU: its clear exit when CUDA does not fit,
its environment rules on recorded machines, its table on recorded outcomes, and its dtype probe on the CPU."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptengine.tools.gpu_check import Environment, environment_problem
from ptengine.tools.gpu_check_table import FAIL, PASS, SKIPPED, Table, Verdict, finish, skipped, verdict

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_without_a_usable_gpu_it_reports_the_machine_then_exits_2_with_one_error_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU for torch, also on a machine that has one
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "gpu_check.py"), "--table", str(tmp_path / "t")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr
    assert "torch " in done.stdout and "CUDA" in done.stdout  # the wheel and its CUDA, printed first
    assert not (tmp_path / "t").exists()  # nothing ran, no table


def machine(**changes) -> Environment:
    fits = dict(torch_version="2.14.1+cu130", wheel_cuda="13.0", driver="580.65.06", driver_cuda="13.0",
                cuda_available=True, gpus=[("NVIDIA H100 80GB HBM3", (9, 0))],
                arch_list=["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    return Environment(**{**fits, **changes})


def test_a_machine_whose_driver_wheel_and_gpu_fit_has_no_problem():
    assert environment_problem(machine()) is None
    assert environment_problem(machine(gpus=[("A10", (8, 6))], arch_list=["sm_80"])) is None  # sm_80 runs on 8.6
    assert environment_problem(machine(gpus=[("next", (10, 3))], arch_list=["compute_90"])) is None  # PTX JIT


@pytest.mark.parametrize(("changes", "named"), [
    ({"wheel_cuda": None, "cuda_available": False, "gpus": []}, ["CPU-only build", "install the CUDA build"]),
    ({"driver": None, "driver_cuda": None, "cuda_available": False, "gpus": []}, ["no NVIDIA driver"]),
    ({"driver": "550.54.15", "driver_cuda": "12.4", "cuda_available": False, "gpus": []},
     ["550.54.15", "CUDA up to 12.4", "needs CUDA 13.0", "update the driver"]),
    ({"gpus": [("Tesla P100", (6, 0))]}, ["Tesla P100", "compute capability 6.0", "sm_60"]),
    ({"cuda_available": False, "gpus": []}, ["no usable GPU", "CUDA_VISIBLE_DEVICES"]),
])
def test_each_misfit_is_one_message_naming_it_and_the_fix(changes, named):
    problem = environment_problem(machine(**changes))
    assert problem is not None and "\n" not in problem
    for text in named:
        assert text in problem


def recorded_lines(outcomes: dict) -> Table:
    """A table filled by checks that return the recorded verdicts (or raise them)."""
    table = Table(stream=io.StringIO())
    for name, recorded in outcomes.items():
        def check(recorded=recorded):
            if isinstance(recorded, Exception):
                raise recorded
            return recorded
        table.run(name, check)
    return table


def test_the_table_lists_every_line_is_written_and_fails_when_one_line_failed(tmp_path):
    table = recorded_lines({
        "float32 vs CPU": verdict(True, "within 3.1e-06"),
        "DataParallel + AMP float16": skipped("DataParallel needs 2 or more GPUs; 1 visible"),
        "bfloat16 autocast": verdict(False, "outputs ran as train cuda:1 torch.float16"),
        "speed": RuntimeError("CUDA out of memory"),
    })
    path = tmp_path / "reports" / "table.txt"

    code = finish(table, path, header="gpu-check: driver 580.65.06")

    assert code == 1
    written = path.read_text()
    assert written.splitlines()[0] == "gpu-check: driver 580.65.06"
    rows = {line.split()[0]: line for line in written.splitlines()[2:-1]}
    assert len(written.splitlines()) == 2 + 4 + 1
    assert [status for status in rows] == [PASS, SKIPPED, FAIL] and "1 PASS, 2 FAIL, 1 SKIPPED" in written
    assert "outputs ran as train cuda:1 torch.float16" in written
    assert "RuntimeError: CUDA out of memory (test_gpu_check.py:" in written  # a broken check is a FAIL line
    assert written in table.stream.getvalue()  # printed too, after the lines printed as they ended


def test_skipped_lines_do_not_fail_the_check(tmp_path):
    table = recorded_lines({"float32 vs CPU": Verdict(PASS, "ok"), "DataParallel": skipped("1 GPU")})
    assert finish(table, tmp_path / "table.txt") == 0
    assert "1 PASS, 0 FAIL, 1 SKIPPED" in (tmp_path / "table.txt").read_text()


def test_the_dtype_probe_records_what_autocast_ran_on_the_cpu(tmp_path, small_run_opts):
    from ptengine.tools.gpu_check_hooks import RecordDtypes
    from ptengine.tools.train_net import main

    records = tmp_path / "records"
    records.mkdir()
    assert main([*small_run_opts, "TRAIN.GPUS", "0", "TRAIN.AMP", "True", "TRAIN.AMP_DTYPE", "bfloat16"],
                hooks=[RecordDtypes(records)]) == 0

    counts = json.loads((records / "dtypes_rank0.json").read_text())
    assert set(counts) == {"train cpu torch.bfloat16", "eval cpu torch.bfloat16"}


def test_the_ddp_line_fails_when_one_rank_evaluated_other_batchnorm_statistics(tmp_path):
    from ptengine.tools.gpu_check_lines import batchnorm_problems
    from ptengine.tools.gpu_check_runs import Finished, Workspace

    run = Finished(Workspace(tmp_path, gpus=2), "ddp", code=0, seconds=1.0)
    run.records.mkdir()
    same = {"22": {"bn1": ["aa"], "layer1.0.bn1": ["bb"]}}
    for rank in (0, 1):
        (run.records / f"bn_rank{rank}.json").write_text(json.dumps(same))
    assert batchnorm_problems(run, 2) == []

    (run.records / "bn_rank1.json").write_text(json.dumps({"22": {"bn1": ["aa"], "layer1.0.bn1": ["cc"]}}))
    assert batchnorm_problems(run, 2) == ["rank 1's BatchNorm statistics differ from rank 0's at the evaluation of "
                                          "iteration 22"]
