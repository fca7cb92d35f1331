"""A user's second hour: their own image folder, one ETA, a register/log mismatch refused, and a quiet console.

Each test names the point of the issue it checks; trainings are small and in-process where they can be.
"""

import datetime
import io
import json
import logging
import re
import shlex
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from fault_utils import DIGITS_CONFIG, PYTHON, process_env
from PIL import Image

from engine import EpochTimer, HookBase, MetricWriter, ProgressBar, Trainer
from engine.pace import RunPace
from ptengine.config import load_config
from ptengine.datasets.base import TensorSplit
from ptengine.datasets.batches import InMemoryBatches
from ptengine.datasets.transforms import BatchTransform, ToTensor
from ptengine.tools.train_net import main
from tests.test_first_hour import screen_lines

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- MLFLOW.REGISTER_MODEL needs MLFLOW.LOG_MODEL -----------------------------------------------------------------
def test_registering_without_logging_the_model_is_refused_before_anything_is_written(run_dir, capfd):
    database = run_dir / "store" / "mlflow.db"
    store, empty_store = f"sqlite:///{database}", database.read_bytes()
    output_dir = run_dir / "output"
    code = main(["--config-file", str(DIGITS_CONFIG), "MLFLOW.REGISTER_MODEL", "mine", "MLFLOW.LOG_MODEL", "False",
                 "OUTPUT_DIR", str(output_dir), "MLFLOW.TRACKING_URI", store])

    assert code == 2
    assert capfd.readouterr().err.splitlines() == [
        "error: MLFLOW.REGISTER_MODEL 'mine' registers the logged model, but MLFLOW.LOG_MODEL is False; "
        "set MLFLOW.LOG_MODEL True, or leave MLFLOW.REGISTER_MODEL empty"]
    assert not output_dir.exists()
    assert database.read_bytes() == empty_store  # no experiment, no run


# ---- one ETA ------------------------------------------------------------------------------------------------------
class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TakesTime(HookBase):
    """Each step takes ``step_s`` on the fake clock (the first ``slow_steps`` of the process ``slow_s``), and each
    epoch end ``epoch_end_s`` (an evaluation and a checkpoint)."""

    def __init__(self, clock, step_s=1.0, slow_steps=0, slow_s=0.0, epoch_end_s=0.0):
        self.clock, self.step_s, self.slow_steps, self.slow_s, self.epoch_end_s = \
            clock, step_s, slow_steps, slow_s, epoch_end_s
        self.steps = 0

    def before_step(self):
        self.steps += 1
        self.clock.now += self.slow_s if self.steps <= self.slow_steps else self.step_s

    def after_epoch(self):
        self.clock.now += self.epoch_end_s


class EtaRecorder(HookBase):
    """At every console line: the ETA the line says, the ETA the bar shows, and the fake time then."""

    def __init__(self, clock, bar: ProgressBar, lines: list[str]):
        self.clock, self.progress, self.lines, self.seen = clock, bar, lines, []

    def after_step(self):
        if self.lines and f"iter {self.trainer.iter}/" in self.lines[-1]:
            bar_eta = re.search(r"ETA ([\d:?]+),", str(self.progress.bar)).group(1)
            self.seen.append((self.trainer.iter, self.lines[-1].rsplit("ETA ", 1)[1], bar_eta, self.clock.now))


class ListHandler(logging.Handler):
    def __init__(self, lines):
        super().__init__()
        self.lines = lines

    def emit(self, record):
        self.lines.append(record.getMessage())


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def console_lines():
    lines, logger = [], logging.getLogger("engine")
    handler, level = ListHandler(lines), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_the_bar_and_the_console_line_show_one_eta_the_steady_time_left(console_lines):
    clock = FakeClock()
    pace = RunPace(clock=clock)
    split = TensorSplit(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.arange(40) % 2)
    batches = InMemoryBatches(split, 4, BatchTransform([ToTensor()]), "cpu", shuffle=False, seed=0)  # 10 steps
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    bar = ProgressBar(stream=FakeTerminal(), pace=pace)
    # 3 slow first steps (start-up), 1 s a step after them, 6 s at each epoch end: none but the steps is steady.
    timing = TakesTime(clock, step_s=1.0, slow_steps=3, slow_s=20.0, epoch_end_s=6.0)
    recorder = EtaRecorder(clock, bar, console_lines)
    hooks = [timing, EpochTimer(40, pace), MetricWriter(None, period=5, pace=pace), bar, recorder]
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, 3, "cpu", hooks=hooks).train()

    assert [iteration for iteration, *_ in recorder.seen] == [5, 10, 15, 20, 25, 30]
    for _, line_eta, bar_eta, _ in recorder.seen:
        assert line_eta == bar_eta  # one estimate, shown twice
    # Once an epoch end has been measured, the estimate is the time that was really left.
    end = clock.now
    for iteration, line_eta, _, then in recorder.seen:
        if iteration > 10:
            assert line_eta == str(datetime.timedelta(seconds=end - then)), iteration
    # Before that: the steady steps left (the slow start-up steps are not the pace), no epoch end known yet.
    assert recorder.seen[0][1] == "0:00:25"  # 25 steps of 1 s
    assert console_lines[-1].endswith("ETA 0:00:00")  # the last epoch's line


def test_a_line_printed_after_the_bar_ends_in_no_spaces_and_one_epoch_is_singular(console_lines):
    terminal = FakeTerminal()
    split = TensorSplit(torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.arange(8) % 2)
    batches = InMemoryBatches(split, 4, BatchTransform([ToTensor()]), "cpu", shuffle=False, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    hooks = [EpochTimer(8), ProgressBar(stream=terminal)]
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, 1, "cpu", hooks=hooks).train()
    terminal.write("[12-06 18:42:33] saved output/model_final.pth\n")  # what the run prints next

    assert "%|" in terminal.getvalue()  # the bar was drawn over the line
    lines = [line for line in screen_lines(terminal.getvalue(), 120, keep_trailing_spaces=True) if line]
    assert lines == ["[12-06 18:42:33] saved output/model_final.pth"]
    assert "training for 1 epoch (2 iterations), starting at 0" in console_lines


def test_after_a_resume_only_this_process_steps_make_the_pace():
    clock = FakeClock()
    pace = RunPace(clock=clock, warmup_steps=2)
    for iteration in range(151, 161):  # a process resumed at iteration 150, 0.5 s a step after 2 slow ones
        clock.now += 30.0 if iteration <= 152 else 0.5
        pace.step_finished(iteration)
    assert pace.step_seconds() == 0.5
    assert pace.seconds_left(steps_left=40, epoch_ends_left=0) == 20.0


def test_epochs_of_one_step_still_get_an_eta_from_their_epoch_ends():
    clock = FakeClock()
    pace = RunPace(clock=clock, warmup_steps=1)
    for iteration in range(1, 5):  # one step an epoch (a split smaller than a batch): 2 s each, with its evaluation
        clock.now += 2.0
        pace.step_finished(iteration)
        pace.epoch_finished()
    assert pace.step_seconds() is None
    assert pace.seconds_left(steps_left=6, epoch_ends_left=6) == 12.0


# ---- training on your own images (the README's section) -----------------------------------------------------------
def readme_image_folder_command() -> list[str]:
    """The command of the README's "Training on your own images" section, as a user copies it."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Training on your own images\n", 1)[1].split("\n## ", 1)[0]
    [command] = [line for block in re.findall(r"```\n(.*?)```", section, flags=re.S)
                 for line in block.splitlines() if line.startswith("python tools/train_net.py")]
    return shlex.split(command)


def test_the_readme_image_folder_command_trains_on_a_folder_without_val(tmp_path):
    root = tmp_path / "my_images"
    for name, colour in (("cat", (220, 40, 40)), ("dog", (40, 40, 220))):
        (root / "train" / name).mkdir(parents=True)
        for index in range(10):
            Image.new("RGB", (20 + index, 16), colour).save(root / "train" / name / f"{index:04d}.png")
    command = readme_image_folder_command()
    assert command[command.index("DATA.ROOT") + 1] == "/path/to/my_images"  # the placeholder the user replaces
    command[command.index("DATA.ROOT") + 1] = str(root)
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    # Only where it writes (never into the repository) and how long it trains are the test's own.
    extra = ["OUTPUT_DIR", str(tmp_path / "output"), "MLFLOW.TRACKING_URI", store, "TRAIN.MAX_EPOCHS", "2",
             "MLFLOW.LOG_MODEL", "False", "MLFLOW.SYSTEM_METRICS", "False"]
    done = subprocess.run([PYTHON, *command[1:], *extra], cwd=REPO_ROOT, env=process_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("my_images")  # named after the folder, not the config file
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["DATA.CLASSES"] == "['cat', 'dog']"  # the sorted class folders
    assert "val_acc1" in run.data.metrics
    rows = {json.loads(item.dataset.profile)["num_rows"] for item in run.inputs.dataset_inputs
            if {tag.key: tag.value for tag in item.tags}.get("mlflow.data.context") == "validation"}
    assert rows == {4}  # DATA.VALIDATION_SIZE 0.2 of the 20 training files


def test_experiment_names_follow_the_data_unless_one_is_given():
    assert load_config(str(DIGITS_CONFIG)).MLFLOW.EXPERIMENT_NAME == "digits"
    assert load_config(str(REPO_ROOT / "config" / "simple_cnn.yaml")).MLFLOW.EXPERIMENT_NAME == "cifar10"
    assert load_config(None, ["DATA.DATASET_TYPE", "cifer10"]).MLFLOW.EXPERIMENT_NAME == "cifar10"  # the alias
    assert load_config(str(DIGITS_CONFIG), ["MLFLOW.EXPERIMENT_NAME", "mine"]).MLFLOW.EXPERIMENT_NAME == "mine"
