"""Hooks: what a ``HookBase`` subclass sees, and the built-in hooks driven by a real ``Trainer``.

The call order documented in ``engine/hooks.py``::

    before_train; per epoch: before_epoch, (before_step, run_step, after_step) per iteration, after_epoch;
    after_train (always)
"""

import gc

import pytest
import torch
from torch import nn

from engine import (
    BestCheckpointer,
    Checkpointer,
    EvalHook,
    HookBase,
    LRScheduler,
    MetricWriter,
    PeriodicCheckpointer,
    Trainer,
)
from engine.hooks import is_period_end
from ptengine.datasets.base import TensorSplit
from ptengine.datasets.batches import InMemoryBatches
from ptengine.datasets.transforms import BatchTransform, ToTensor


def tiny_trainer(num_samples=12, batch_size=4, max_epochs=2, hooks=(), lr=0.1) -> Trainer:
    """A linear classifier over 2x2 grey images: 12 samples in batches of 4 = 3 iterations per epoch."""
    generator = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randint(0, 256, (num_samples, 1, 2, 2), dtype=torch.uint8, generator=generator),
                        torch.arange(num_samples) % 3)
    batches = InMemoryBatches(split, batch_size, BatchTransform([ToTensor()]), "cpu", shuffle=True, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return Trainer(model, optimizer, batches, max_epochs, "cpu", hooks=list(hooks))


class CallRecorder(HookBase):
    """Writes down every call with the trainer's ``iter`` and ``epoch`` at that moment."""

    def __init__(self, calls, name="hook"):
        self.calls, self.name = calls, name

    def _record(self, method):
        self.calls.append((self.name, method, self.trainer.iter, self.trainer.epoch))

    def before_train(self):
        self._record("before_train")

    def before_epoch(self):
        self._record("before_epoch")

    def before_step(self):
        self._record("before_step")

    def after_step(self):
        self._record("after_step")

    def after_epoch(self):
        self._record("after_epoch")

    def after_train(self):
        self._record("after_train")


class FakeTracker:
    """Collects what MetricWriter hands to the MLflow tracker."""

    def __init__(self):
        self.records = []

    def log_metrics(self, records):
        self.records.extend(records)

    def history(self, name):
        return [(step, value) for key, value, step in self.records if key == name]


def test_a_user_hook_is_called_in_the_documented_order_with_iter_and_epoch():
    calls = []
    trainer = tiny_trainer(hooks=[CallRecorder(calls)])
    trainer.train()

    expected = [("before_train", 0, 0)]
    for epoch in range(2):
        expected.append(("before_epoch", 3 * epoch, epoch))
        for step in range(3):
            finished = 3 * epoch + step  # trainer.iter counts finished iterations
            expected += [("before_step", finished, epoch), ("after_step", finished + 1, epoch)]
        expected.append(("after_epoch", 3 * epoch + 3, epoch))
    expected.append(("after_train", 6, 1))  # after_train sees the last epoch
    assert [call[1:] for call in calls] == expected
    assert (trainer.iter, trainer.max_iter, trainer.iters_per_epoch) == (6, 6, 3)


def test_hooks_run_in_registration_order():
    calls = []
    tiny_trainer(max_epochs=1, hooks=[CallRecorder(calls, "first"), CallRecorder(calls, "second")]).train()
    names = [name for name, *_ in calls]
    assert names == ["first", "second"] * (len(calls) // 2)


def test_after_train_runs_even_when_a_hook_raises():
    calls = []

    class Broken(HookBase):
        def after_step(self):
            if self.trainer.iter == 2:
                raise RuntimeError("broken hook")

    trainer = tiny_trainer(hooks=[Broken(), CallRecorder(calls)])
    with pytest.raises(RuntimeError, match="broken hook"):
        trainer.train()
    assert calls[-1] == ("hook", "after_train", 2, 0)
    assert ("hook", "after_step", 2, 0) not in calls  # the hook after the broken one never saw that step


def test_every_after_train_runs_when_an_earlier_one_raises_and_the_first_error_is_raised():
    calls = []

    class BrokenAtTheEnd(HookBase):
        def __init__(self, message):
            self.message = message

        def after_train(self):
            raise RuntimeError(self.message)

    # The last hook stands for the checkpointer, which waits there for the writes it queued.
    trainer = tiny_trainer(max_epochs=1, hooks=[BrokenAtTheEnd("first"), BrokenAtTheEnd("second"), CallRecorder(calls)])
    with pytest.raises(RuntimeError, match="first"):
        trainer.train()
    assert calls[-1] == ("hook", "after_train", 3, 0)


def test_a_hook_does_not_keep_its_trainer_alive():
    hook = HookBase()
    trainer = tiny_trainer(hooks=[hook])
    assert hook.trainer.max_iter == 6
    del trainer
    gc.collect()
    with pytest.raises(ReferenceError):
        _ = hook.trainer.iter


def test_every_step_loss_and_lr_reach_the_tracker_with_the_global_iteration_as_step():
    tracker = FakeTracker()
    trainer = tiny_trainer(max_epochs=3, hooks=[])
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda it: 1 / (it + 1))
    trainer.register_hooks([LRScheduler(scheduler), MetricWriter(tracker, period=4)])
    trainer.train()

    losses = tracker.history("train_loss")
    assert [step for step, _ in losses] == list(range(1, 10))  # every step although written every 4
    assert tracker.history("lr") == [(step, pytest.approx(0.1 / step)) for step in range(1, 10)]  # LR the step used
    assert tracker.history("epoch") == [(3, 1.0), (6, 2.0), (9, 3.0)]  # 1-based, as the console counts


def test_evaluation_runs_every_period_epochs_and_after_the_last():
    evaluated_at = []
    trainer = tiny_trainer(max_epochs=5)

    def evaluate():
        evaluated_at.append(trainer.iter)
        return {"loss": 0.5, "acc1": trainer.iter / 100, "confusion": torch.eye(3)}

    tracker = FakeTracker()
    trainer.register_hooks([EvalHook(evaluate, period=2), MetricWriter(tracker, period=100)])
    trainer.train()

    assert evaluated_at == [6, 12, 15]  # after epochs 2, 4 and the last (5)
    assert tracker.history("val_acc1") == [(6, 0.06), (12, 0.12), (15, 0.15)]
    assert "val_confusion" not in {name for name, _, _ in tracker.records}  # only scalars are metrics
    assert torch.equal(trainer.latest_eval["val_confusion"], torch.eye(3))


def test_is_period_end_marks_every_period_and_the_last():
    assert [n for n in range(1, 11) if is_period_end(n, 4, 10)] == [4, 8, 10]
    assert [n for n in range(1, 11) if is_period_end(n, 0, 10)] == [10]


def test_periodic_checkpointer_saves_every_period_and_at_epoch_ends_and_the_best_checkpointer_the_best(tmp_path):
    trainer = tiny_trainer(max_epochs=2)
    accuracies = iter([0.5, 0.4])
    checkpointer = Checkpointer(tmp_path, keep=10)
    trainer.register_hooks([
        EvalHook(lambda: {"loss": 1.0, "acc1": next(accuracies)}, period=1),
        BestCheckpointer(checkpointer),
        PeriodicCheckpointer(checkpointer, period=2),
    ])
    trainer.train()

    saved = sorted(path.name for path in tmp_path.glob("checkpoint_*.pth"))
    assert saved == [f"checkpoint_{i:08d}.pth" for i in (2, 3, 4, 6)]  # every 2 iterations and at 3 and 6
    best = torch.load(tmp_path / "model_best.pth", weights_only=True)
    first_epoch = torch.load(tmp_path / "checkpoint_00000003.pth", weights_only=True)["model"]
    assert all(torch.equal(best[key], first_epoch[key]) for key in best)  # epoch 1 had the better accuracy


class StepCounter(HookBase):
    """A stateful hook: counts the steps it saw, and keeps the count across a resume."""

    def __init__(self, every: int):
        self.every, self.count = every, 0

    def after_step(self):
        if self.trainer.iter % self.every == 0:
            self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_a_hook_keeps_its_state_through_a_checkpoint():
    trainer = tiny_trainer(hooks=[StepCounter(every=2)])
    trainer.train()
    restored = StepCounter(every=2)
    tiny_trainer(hooks=[restored]).load_state_dict(trainer.state_dict())
    assert restored.count == 3


def test_two_hooks_of_the_same_class_keep_their_own_state_through_a_checkpoint():
    trainer = tiny_trainer(hooks=[StepCounter(every=1), StepCounter(every=3)])
    trainer.train()
    assert [hook.count for hook in trainer.hooks] == [6, 2]

    restored = [StepCounter(every=1), StepCounter(every=3)]
    tiny_trainer(hooks=restored).load_state_dict(trainer.state_dict())
    assert [hook.count for hook in restored] == [6, 2]
