"""Optimizers and LR schedules built from the config.

Schedules are per iteration: ``build_lr_scheduler(cfg, optimizer, iters_per_epoch)`` and one
``scheduler.step()`` after every optimizer step (the LRScheduler hook does this in training).
"""

import math

import pytest
import torch
from torch import nn

from ptengine.config import ConfigError, load_config
from ptengine.solvers import build_lr_scheduler, build_optimizer

ITERS_PER_EPOCH = 4


def model() -> nn.Module:
    return nn.Linear(3, 2)


def lr_per_iteration(*opts, iters_per_epoch=ITERS_PER_EPOCH) -> list[float]:
    """The LR each training iteration uses, over the whole run."""
    cfg = load_config(None, ["TRAIN.LR", "0.5", *opts])
    optimizer = build_optimizer(cfg, model())
    scheduler = build_lr_scheduler(cfg, optimizer, iters_per_epoch)
    lrs = []
    for _ in range(iters_per_epoch * cfg.TRAIN.MAX_EPOCHS):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def per_epoch(lrs: list[float]) -> list[list[float]]:
    return [lrs[i:i + ITERS_PER_EPOCH] for i in range(0, len(lrs), ITERS_PER_EPOCH)]


def test_sgd_takes_lr_momentum_and_weight_decay_from_the_config():
    cfg = load_config(None, ["TRAIN.OPTIMIZER_TYPE", "sgd", "TRAIN.LR", "0.3", "TRAIN.MOMENTUM", "0.8",
                             "TRAIN.WEIGHT_DECAY", "0.001"])
    optimizer = build_optimizer(cfg, model())
    assert type(optimizer) is torch.optim.SGD
    assert (optimizer.defaults["lr"], optimizer.defaults["momentum"], optimizer.defaults["weight_decay"]) \
        == (0.3, 0.8, 0.001)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_and_adamw_use_momentum_as_beta1(name, cls):
    cfg = load_config(None, ["TRAIN.OPTIMIZER_TYPE", name, "TRAIN.LR", "0.002", "TRAIN.MOMENTUM", "0.85",
                             "TRAIN.WEIGHT_DECAY", "0.05"])
    optimizer = build_optimizer(cfg, model())
    assert type(optimizer) is cls
    assert optimizer.defaults["lr"] == 0.002
    assert optimizer.defaults["betas"] == (0.85, 0.999)
    assert optimizer.defaults["weight_decay"] == 0.05


def test_the_optimizer_covers_every_parameter():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = build_optimizer(load_config(None, []), net)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in net.parameters()}


def test_unknown_optimizer_or_schedule_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown TRAIN.OPTIMIZER_TYPE 'lion'; choose one of adam, adamw, sgd"):
        build_optimizer(load_config(None, ["TRAIN.OPTIMIZER_TYPE", "lion"]), model())
    cfg = load_config(None, ["TRAIN.SCHEDULER_TYPE", "poly"])
    with pytest.raises(ConfigError, match="unknown TRAIN.SCHEDULER_TYPE 'poly'"):
        build_lr_scheduler(cfg, build_optimizer(cfg, model()), ITERS_PER_EPOCH)


def test_step_lr_multiplies_by_gamma_every_step_size_epochs_only_at_epoch_boundaries():
    lrs = lr_per_iteration("TRAIN.SCHEDULER_TYPE", "step_lr", "TRAIN.STEP_SIZE", "2", "TRAIN.GAMMA", "0.1",
                           "TRAIN.MAX_EPOCHS", "5")
    epochs = per_epoch(lrs)
    assert all(len(set(epoch)) == 1 for epoch in epochs)  # constant within an epoch
    assert [epoch[0] for epoch in epochs] == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005])


def test_multistep_multiplies_by_gamma_at_each_milestone_epoch():
    lrs = lr_per_iteration("TRAIN.SCHEDULER_TYPE", "multistep", "TRAIN.MILESTONES", "[3, 1]", "TRAIN.GAMMA", "0.5",
                           "TRAIN.MAX_EPOCHS", "5")
    epochs = per_epoch(lrs)
    assert all(len(set(epoch)) == 1 for epoch in epochs)
    assert [epoch[0] for epoch in epochs] == pytest.approx([0.5, 0.25, 0.25, 0.125, 0.125])


def test_cosine_decays_every_iteration_to_about_zero_at_the_end():
    lrs = lr_per_iteration("TRAIN.SCHEDULER_TYPE", "cosine", "TRAIN.MAX_EPOCHS", "10")
    assert lrs[0] == 0.5
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))  # strictly decreasing, step by step
    assert lrs[len(lrs) // 2] == pytest.approx(0.25)
    assert lrs[-1] < 0.002 * 0.5  # the last of 40 steps

    cfg = load_config(None, ["TRAIN.SCHEDULER_TYPE", "cosine", "TRAIN.MAX_EPOCHS", "10"])
    optimizer = build_optimizer(cfg, model())
    scheduler = build_lr_scheduler(cfg, optimizer, ITERS_PER_EPOCH)
    for _ in range(40):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # where the schedule ends


def test_constant_keeps_the_base_lr():
    assert set(lr_per_iteration("TRAIN.SCHEDULER_TYPE", "constant", "TRAIN.MAX_EPOCHS", "3")) == {0.5}


def test_warmup_ramps_linearly_over_its_epochs_then_hands_over_to_the_schedule():
    lrs = lr_per_iteration("TRAIN.SCHEDULER_TYPE", "step_lr", "TRAIN.STEP_SIZE", "2", "TRAIN.GAMMA", "0.1",
                           "TRAIN.WARMUP_EPOCHS", "1.5", "TRAIN.MAX_EPOCHS", "3")
    warmup = 6  # 1.5 epochs of 4 iterations
    assert lrs[:warmup] == pytest.approx([0.5 * (i + 1) / warmup for i in range(warmup)])
    assert lrs[warmup:] == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.05, 0.05])


def test_the_schedule_counts_optimizer_steps_so_it_resumes_from_its_state():
    cfg = load_config(None, ["TRAIN.SCHEDULER_TYPE", "cosine", "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.MAX_EPOCHS", "3"])
    first_optimizer = build_optimizer(cfg, model())
    first = build_lr_scheduler(cfg, first_optimizer, ITERS_PER_EPOCH)
    for _ in range(5):
        first_optimizer.step()
        first.step()

    second_optimizer = build_optimizer(cfg, model())
    second = build_lr_scheduler(cfg, second_optimizer, ITERS_PER_EPOCH)
    second.load_state_dict(first.state_dict())
    assert second.get_last_lr() == first.get_last_lr()
    first_optimizer.step(), first.step(), second_optimizer.step(), second.step()
    assert second.get_last_lr() == first.get_last_lr()


def test_the_per_iteration_schedule_sets_the_same_lrs_as_torchs_lambda_lr_and_resumes_from_its_state():
    from ptengine.solvers.lr_schedulers import PerIterationLR

    def factor(iteration):
        return 0.5 * (1 + math.cos(math.pi * iteration / 40)) * min(1.0, (iteration + 1) / 7)

    ours_optimizer, torch_optimizer = (torch.optim.SGD(model().parameters(), lr=0.3) for _ in range(2))
    ours, reference = PerIterationLR(ours_optimizer, factor), torch.optim.lr_scheduler.LambdaLR(torch_optimizer, factor)
    for _ in range(40):
        assert ours_optimizer.param_groups[0]["lr"] == torch_optimizer.param_groups[0]["lr"]  # bit for bit
        assert ours.get_last_lr() == reference.get_last_lr()
        ours.step()
        reference.step()

    # A checkpoint written with LambdaLR's state (before this scheduler existed) resumes at its iteration.
    resumed_optimizer = torch.optim.SGD(model().parameters(), lr=0.3)
    resumed = PerIterationLR(resumed_optimizer, factor)
    resumed.load_state_dict(reference.state_dict())
    assert resumed.last_epoch == 40
    assert resumed_optimizer.param_groups[0]["lr"] == torch_optimizer.param_groups[0]["lr"]
