"""The Trainer's step: gradient accumulation and clipping, NaN detection, and checkpoint/resume state.

Every test drives a real ``Trainer`` over a real ``InMemoryBatches`` source with a tiny linear model.
"""

import pytest
import torch
from torch import nn

from engine import Checkpointer, HookBase, LRScheduler, MetricWriter, PeriodicCheckpointer, Trainer
from engine.checkpoint import load_file, save_file
from ptengine.datasets.base import TensorSplit
from ptengine.datasets.batches import InMemoryBatches
from ptengine.datasets.transforms import BatchTransform, Normalize, RandomCrop, RandomHorizontalFlip, ToTensor

NUM_CLASSES = 3


def make_split(num_samples: int, seed: int = 0) -> TensorSplit:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_samples, 1, 4, 4), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    return TensorSplit(images, labels)


def make_model() -> nn.Module:
    torch.manual_seed(0)  # every trainer in a test starts from the same weights
    return nn.Sequential(nn.Flatten(), nn.Linear(16, NUM_CLASSES))


def make_trainer(split, batch_size, accum_steps=1, max_epochs=1, hooks=(), clip_grad_norm=0.0, transform=None,
                 shuffle=False, lr=0.1) -> Trainer:
    batches = InMemoryBatches(split, batch_size, transform or BatchTransform([ToTensor()]), "cpu",
                              shuffle=shuffle, seed=3)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return Trainer(model, optimizer, batches, max_epochs, "cpu", hooks=list(hooks), accum_steps=accum_steps,
                   clip_grad_norm=clip_grad_norm)


class GradientRecorder(HookBase):
    """Keeps a copy of every parameter's gradient after each optimizer step."""

    def __init__(self):
        self.gradients = []

    def after_step(self):
        self.gradients.append([p.grad.clone() for p in self.trainer.model.parameters()])


def reference_gradient(split, indices) -> list[torch.Tensor]:
    """The gradient of the mean cross-entropy over ``indices``, computed by hand on the initial model."""
    model = make_model()
    images = split.images[indices].float() / 255
    nn.functional.cross_entropy(model(images), split.labels[indices]).backward()
    return [p.grad for p in model.parameters()]


def test_two_accumulated_batches_of_32_give_the_gradient_of_one_batch_of_64():
    split = make_split(64)
    accumulated, whole = GradientRecorder(), GradientRecorder()
    make_trainer(split, batch_size=32, accum_steps=2, hooks=[accumulated]).train()
    make_trainer(split, batch_size=64, accum_steps=1, hooks=[whole]).train()

    assert len(accumulated.gradients) == len(whole.gradients) == 1  # one optimizer step each
    for a, b, expected in zip(accumulated.gradients[0], whole.gradients[0], reference_gradient(split, range(64)),
                              strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, expected)


def test_a_short_last_accumulation_step_averages_over_its_own_samples():
    split = make_split(96)  # 3 batches of 32, accumulated in pairs: steps of 64 and 32 samples
    recorder, writer = GradientRecorder(), MetricWriter(tracker=None, period=1)
    trainer = make_trainer(split, batch_size=32, accum_steps=2, hooks=[recorder, writer], lr=0.0)
    trainer.train()

    assert trainer.iters_per_epoch == 2 and len(recorder.gradients) == 2
    for got, expected in zip(recorder.gradients[1], reference_gradient(split, range(64, 96)), strict=True):
        torch.testing.assert_close(got, expected)  # lr 0: the model is still the initial one
    model = make_model()
    expected_loss = nn.functional.cross_entropy(model(split.images[64:].float() / 255), split.labels[64:])
    assert writer.latest["train_loss"] == pytest.approx(expected_loss.item(), rel=1e-5)


def test_gradient_clipping_bounds_the_global_norm():
    recorder = GradientRecorder()
    make_trainer(make_split(64), batch_size=16, clip_grad_norm=0.01, hooks=[recorder]).train()
    norms = [torch.linalg.vector_norm(torch.stack([g.norm() for g in step])) for step in recorder.gradients]
    assert len(norms) == 4 and all(norm <= 0.01 * (1 + 1e-4) for norm in norms)


class PoisonBeforeIteration(HookBase):
    """Sets a weight to NaN just before iteration ``iteration`` (1-based) runs."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter + 1 == self.iteration:
            with torch.no_grad():
                self.trainer.model[1].weight[0, 0] = float("nan")


def test_a_nan_loss_is_reported_at_its_first_iteration_even_when_noticed_later():
    writer = MetricWriter(tracker=None, period=100)  # checks only at epoch ends
    trainer = make_trainer(make_split(48), batch_size=8, max_epochs=2, hooks=[PoisonBeforeIteration(4), writer])

    with pytest.raises(FloatingPointError, match=r"NaN or inf at iteration 4 \(epoch 1\)"):
        trainer.train()
    assert trainer.iter == 6  # the end of epoch 1, where the writer looked
    assert writer.latest == {}  # no non-finite value was written


def test_after_a_nan_the_earlier_checkpoints_stay_loadable(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=10)
    writer = MetricWriter(tracker=None, period=100)
    trainer = make_trainer(make_split(48), batch_size=8, max_epochs=2,
                           hooks=[PoisonBeforeIteration(8), writer, PeriodicCheckpointer(checkpointer, 1)])

    with pytest.raises(FloatingPointError, match=r"iteration 8 \(epoch 2\)"):
        trainer.train()
    assert [path.name for path in checkpointer.checkpoints()] == [f"checkpoint_{i:08d}.pth" for i in range(1, 8)]
    path, state = checkpointer.load_newest_valid()
    assert state["iteration"] == 7
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_the_trainer_state_is_loadable_with_weights_only(tmp_path):
    trainer = make_trainer(make_split(32), batch_size=8)
    trainer.train()
    save_file(trainer.state_dict(), tmp_path / "state.pth")

    state = load_file(tmp_path / "state.pth")  # torch.load(weights_only=True)
    assert state["iteration"] == 4
    assert set(state) >= {"iteration", "model", "optimizer", "scaler", "hooks", "rng"}


@pytest.mark.parametrize("resume_at", [2, 3], ids=["mid-epoch", "epoch-end"])
def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, resume_at):
    split = make_split(24)

    def build(more_hooks=()):
        transform = BatchTransform([RandomCrop(seed=3), RandomHorizontalFlip(seed=3), ToTensor(),
                                    Normalize((0.5,), (0.25,))])
        trainer = make_trainer(split, batch_size=8, max_epochs=3, shuffle=True, transform=transform)
        scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda it: 0.8**it)
        trainer.register_hooks([LRScheduler(scheduler), *more_hooks])
        return trainer

    straight = build([PeriodicCheckpointer(Checkpointer(tmp_path, keep=10), period=resume_at)])
    straight.train()  # also leaves the checkpoint a crashed run would have had

    resumed = build()
    resumed.load_state_dict(load_file(tmp_path / f"checkpoint_{resume_at:08d}.pth"))
    assert resumed.iter == resume_at
    resumed.train()

    assert resumed.iter == straight.iter == 9
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


# ---- the training loss is an argument -------------------------------------------------------------------------
def test_a_loss_given_to_the_trainer_replaces_cross_entropy_with_soft_targets():
    split = make_split(32)
    smoothing = 0.2
    smoothed = GradientRecorder()

    def soft_target_loss(logits, labels):  # per-class probabilities, as label smoothing or mixup make them
        targets = torch.full((len(labels), NUM_CLASSES), smoothing / NUM_CLASSES)
        targets[torch.arange(len(labels)), labels] += 1 - smoothing
        return nn.functional.cross_entropy(logits, targets, reduction="sum")

    trainer = make_trainer(split, batch_size=16, accum_steps=2, hooks=[smoothed])
    trainer.loss = soft_target_loss
    trainer.train()

    model = make_model()
    images = split.images.float() / 255
    nn.functional.cross_entropy(model(images), split.labels, label_smoothing=smoothing).backward()
    for got, expected in zip(smoothed.gradients[0], [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, expected)


def test_the_loss_is_a_constructor_argument_and_cross_entropy_by_default():
    batches = InMemoryBatches(make_split(8), 4, BatchTransform([ToTensor()]), "cpu", shuffle=False, seed=0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    label_smoothing = nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1)
    assert Trainer(model, optimizer, batches, 1, "cpu", loss=label_smoothing).loss is label_smoothing
    default = Trainer(model, optimizer, batches, 1, "cpu").loss
    logits, labels = torch.randn(4, NUM_CLASSES), torch.tensor([0, 1, 2, 0])
    assert torch.equal(default(logits, labels), nn.functional.cross_entropy(logits, labels, reduction="sum"))


# ---- hooks --------------------------------------------------------------------------------------------------------
class CountsSteps(HookBase):
    def __init__(self):
        self.steps = 0

    def after_step(self):
        self.steps += 1


def test_only_the_hook_methods_a_hook_overrides_are_called(monkeypatch):
    counter = CountsSteps()
    trainer = make_trainer(make_split(16), batch_size=4, hooks=[counter])
    calls = []
    monkeypatch.setattr(HookBase, "before_step", lambda self: calls.append(self))  # what a non-override would run
    trainer.train()
    assert counter.steps == 4 and calls == []


def test_extra_checkpoint_state_is_passed_in_and_saved_as_it_is():
    batches = InMemoryBatches(make_split(8), 4, BatchTransform([ToTensor()]), "cpu", shuffle=False, seed=0)
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, 1, "cpu",
                      checkpoint_extras={"config": "SEED: 1\n"})
    assert trainer.state_dict()["config"] == "SEED: 1\n"
