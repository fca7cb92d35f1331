"""The modern recipe: EMA of the weights, label smoothing, mixup/cutmix, bf16 autocast, torch.compile.

How each piece behaves on its own (keyed mixing, the EMA's warm-up), then whole in-process trainings: the digits
recipe reaches its accuracy with EMA and raw values logged, a compiled run resumes uncompiled, bf16 runs on the
CPU. Killed and resumed runs and 2-process runs of the recipe are in test_recipe_faults.py.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DIGITS_CONFIG, isolated_training
from fault_utils import empty_store, load_weights, metric_history, runs_of, sqlite_uri
from torch import nn

from engine.ema import ModelEMA
from engine.hooks import HookBase
from ptengine.config import ConfigError, load_config
from ptengine.config.resume import check_resume_config
from ptengine.datasets.mixing import BatchMixing, mixing_group_size
from ptengine.networks import build_model
from ptengine.tools.build import check_names
from ptengine.tools.train_net import main

RECIPE = ["TRAIN.EMA_DECAY", "0.99", "TRAIN.LABEL_SMOOTHING", "0.1", "TRAIN.MIXUP_ALPHA", "0.2",
          "TRAIN.CUTMIX_ALPHA", "1.0"]
CLASSES = 10


@contextlib.contextmanager
def one_thread():
    """One torch thread, as the subprocess trainings have (OMP_NUM_THREADS=1): on a busy machine, two OpenMP
    threads spin-waiting for each other make these small runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def a_batch(size: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 3, 8, 8, generator=generator), torch.randint(0, CLASSES, (size,), generator=generator)


def mixing(mixup: float = 0.2, cutmix: float = 1.0, batch_size: int = 16) -> BatchMixing:
    return BatchMixing(CLASSES, batch_size, group_size=8, seed=42, mixup_alpha=mixup, cutmix_alpha=cutmix)


# ---- mixup and cutmix ------------------------------------------------------------------------------------------
def test_two_processes_draw_the_mixes_of_one_and_a_resumed_run_draws_them_again():
    images, labels = a_batch()
    mix = mixing()
    for batch_index in range(6):  # both mixup and cutmix batches among them
        whole = mix(images, labels, epoch=3, batch_index=batch_index, first_position=0, global_size=16)
        halves = [mix(images[first:first + 8], labels[first:first + 8], 3, batch_index, first, 16)
                  for first in (0, 8)]
        assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
        assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
        again = mixing()(images, labels, 3, batch_index, 0, 16)  # a fresh process, as after a resume
        assert torch.equal(again[0], whole[0]) and torch.equal(again[1], whole[1])
    other_epoch = mix(images, labels, 4, 0, 0, 16)
    assert not torch.equal(other_epoch[0], mix(images, labels, 3, 0, 0, 16)[0])


def test_mixup_blends_each_sample_with_the_next_of_its_group_and_the_targets_alike():
    images, labels = a_batch()
    mixed, targets = mixing(mixup=0.4, cutmix=0.0)(images, labels, 0, 0, 0, 16)

    partner = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15, 8])  # within groups of 8
    one_hot = F.one_hot(labels, CLASSES).float()
    for sample in range(16):
        other = partner[sample]
        # the weight of the sample itself, read back from a pixel where the two images differ
        pixel = (images[sample] - images[other]).abs().argmax()
        lam = ((mixed[sample].flatten()[pixel] - images[other].flatten()[pixel])
               / (images[sample].flatten()[pixel] - images[other].flatten()[pixel]))
        assert torch.allclose(mixed[sample], lam * images[sample] + (1 - lam) * images[other], atol=1e-5)
        assert torch.allclose(targets[sample], lam * one_hot[sample] + (1 - lam) * one_hot[other], atol=1e-5)
    assert torch.allclose(targets.sum(dim=1), torch.ones(16))


def test_cutmix_pastes_a_box_of_the_next_sample_and_weighs_the_targets_by_its_area():
    images, labels = a_batch()
    mixed, targets = mixing(mixup=0.0, cutmix=1.0)(images, labels, 0, 0, 0, 16)

    partner = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15, 8])
    pasted = (mixed != images).any(dim=1)  # [16, 8, 8]: the pixels taken from the partner
    assert torch.equal(mixed[pasted.unsqueeze(1).expand_as(mixed)],
                       images[partner][pasted.unsqueeze(1).expand_as(mixed)])
    one_hot = F.one_hot(labels, CLASSES).float()
    share = pasted.flatten(1).float().mean(dim=1, keepdim=True)  # of the partner, per sample
    assert torch.allclose(targets, (1 - share) * one_hot + share * one_hot[partner])
    assert pasted.any()


def test_the_epochs_last_smaller_batch_is_not_mixed_and_gets_one_hot_targets():
    images, labels = a_batch(size=5)
    mixed, targets = mixing()(images, labels, 0, 7, 0, global_size=5)
    assert torch.equal(mixed, images)
    assert torch.equal(targets, F.one_hot(labels, CLASSES).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixing_on_a_gpu_never_makes_the_host_wait_for_it():
    images, labels = (tensor.cuda() for tensor in a_batch())
    mix = mixing()
    mix(images, labels, 0, 0, 0, 16)  # the first call allocates (pinned memory included)
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        for batch_index in range(1, 6):  # mixup and cutmix batches
            mix(images, labels, 0, batch_index, 0, 16)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_the_group_is_the_largest_divisor_up_to_8_and_a_batch_without_one_is_refused():
    assert [mixing_group_size(share) for share in (128, 64, 32, 100, 63, 12)] == [8, 8, 8, 5, 7, 6]
    from ptengine.tools.build import build_data

    cfg = load_config(str(DIGITS_CONFIG), ["TRAIN.MIXUP_ALPHA", "0.2", "TRAIN.BATCH_SIZE", "11"])
    with pytest.raises(ConfigError, match="TRAIN.BATCH_SIZE 11 / 1 processes"):
        build_data(cfg, "cpu")


# ---- the moving average ------------------------------------------------------------------------------------------
def test_the_ema_warms_up_averages_the_parameters_and_copies_the_buffers():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.99)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        model[1].running_mean.fill_(5.0)

    ema.update(model)

    decay = 2 / 11  # min(0.99, (1 + t) / (10 + t)) at the first update, t = 1
    for average, before, now in zip(ema.module.parameters(), start, model.parameters(), strict=True):
        assert torch.allclose(average, decay * before + (1 - decay) * now)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert ema.current_decay() == pytest.approx(3 / 12)  # the next update's
    assert ModelEMA(model, decay=0.1).current_decay() == 0.1  # below the warm-up from the start

    restored = ModelEMA(model, decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(restored.module.state_dict().values(),
                                                 ema.module.state_dict().values(), strict=True))


# ---- the digits recipe, in process -------------------------------------------------------------------------------
RECIPE_EPOCHS = 8  # of config/digits.yaml's 15: enough to show what the recipe does, in half the time


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """config/digits.yaml for RECIPE_EPOCHS epochs with EMA, label smoothing, mixup and cutmix (about 8 s)."""
    workdir = tmp_path_factory.mktemp("recipe")
    output_dir, tracking_uri = workdir / "output", empty_store(workdir / "store")
    with isolated_training(workdir), one_thread():
        code = main(["--config-file", str(DIGITS_CONFIG), *RECIPE, "OUTPUT_DIR", str(output_dir),
                     "MLFLOW.TRACKING_URI", tracking_uri, "LOG.PROGRESS_BAR", "False", "MLFLOW.LOG_MODEL", "False",
                     "MLFLOW.SYSTEM_METRICS", "False", "TRAIN.MAX_EPOCHS", str(RECIPE_EPOCHS),
                     "CHECKPOINT.KEEP", str(RECIPE_EPOCHS)])  # every epoch's checkpoint
    assert code == 0
    (run,) = runs_of(tracking_uri)
    return {"output_dir": output_dir, "history": lambda key: metric_history(tracking_uri, run.info.run_id, key)}


def test_the_digits_recipe_reaches_its_accuracy(recipe_run):
    final_step, final_acc1 = recipe_run["history"]("val_acc1")[-1]
    assert final_step == RECIPE_EPOCHS * 22
    assert final_acc1 >= 0.85  # 0.951 when this test was written


def test_with_ema_every_evaluation_logs_the_ema_and_the_raw_weights(recipe_run):
    epoch_ends = [22 * epoch for epoch in range(1, RECIPE_EPOCHS + 1)]
    for key in ("val_acc1", "val_loss", "val_acc1_raw", "val_loss_raw"):
        assert [step for step, _ in recipe_run["history"](key)] == epoch_ends, key
    assert recipe_run["history"]("val_acc1") != recipe_run["history"]("val_acc1_raw")


def test_model_best_is_the_ema_of_the_best_ema_accuracy_and_model_final_the_last_ema(recipe_run):
    output_dir, accuracies = recipe_run["output_dir"], recipe_run["history"]("val_acc1")
    best_step, best = max(accuracies, key=lambda item: (item[1], -item[0]))  # the first of the best
    best_checkpoint = load_weights(output_dir / f"checkpoint_{best_step:08d}.pth")
    assert best_checkpoint["hooks"]["BestCheckpointer"]["best"] == best
    assert_same(load_weights(output_dir / "model_best.pth"), best_checkpoint["hooks"]["EMAHook"]["model"])

    last = load_weights(output_dir / f"checkpoint_{RECIPE_EPOCHS * 22:08d}.pth")
    assert last["hooks"]["EMAHook"]["updates"] == RECIPE_EPOCHS * 22
    assert_same(load_weights(output_dir / "model_final.pth"), last["hooks"]["EMAHook"]["model"])
    raw, average = last["model"], last["hooks"]["EMAHook"]["model"]
    assert not torch.equal(raw["classifier.5.weight"], average["classifier.5.weight"])


def test_a_checkpoint_given_as_model_weights_gives_its_ema_weights(recipe_run):
    from ptengine.tools.build import load_weights as load_model_weights

    checkpoint = recipe_run["output_dir"] / f"checkpoint_{RECIPE_EPOCHS * 22:08d}.pth"
    model = build_model(load_config(str(DIGITS_CONFIG)))
    load_model_weights(model, str(checkpoint))
    assert_same(model.state_dict(), load_weights(checkpoint)["hooks"]["EMAHook"]["model"])


def assert_same(weights: dict, expected: dict) -> None:
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


# ---- torch.compile and bf16 on the CPU ---------------------------------------------------------------------------
def synthetic_run(run_dir, *opts, resume=False, hooks=()) -> int:
    """256 synthetic images: 192 to train in batches of 40 (4 full ones and one of 32 per epoch)."""
    args = ["DATA.DATASET_TYPE", "synthetic", "DATA.SYNTHETIC_SIZE", "256", "TRAIN.BATCH_SIZE", "40",
            "LOG.PROGRESS_BAR", "False", "MLFLOW.LOG_MODEL", "False", "MLFLOW.SYSTEM_METRICS", "False",
            "OUTPUT_DIR", str(run_dir / "output"), "MLFLOW.TRACKING_URI", sqlite_uri(run_dir / "store"),
            *opts]
    with one_thread():
        return main([*args, "--resume"] if resume else args, hooks=hooks)


def test_a_compiled_run_compiles_once_per_batch_shape_and_resumes_uncompiled_into_plain_weights(run_dir):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        # aot_eager: the graphs are captured and recompiled exactly as with inductor, which only adds the code
        # generation (20-80 s of C++ compiles on this machine, depending on its cache)
        assert synthetic_run(run_dir, "TRAIN.COMPILE", "True", "TRAIN.COMPILE_BACKEND", "aot_eager",
                             "TRAIN.MAX_EPOCHS", "2") == 0
        # the full batch and the last one of 32, once each: not again in epoch 2, nor at either evaluation
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()
    checkpoint = load_weights(run_dir / "output" / "checkpoint_00000010.pth")
    assert not [name for name in checkpoint["model"] if "_orig_mod" in name]

    assert synthetic_run(run_dir, "TRAIN.COMPILE", "False", "TRAIN.MAX_EPOCHS", "3", resume=True) == 0

    log = (run_dir / "output" / "log.txt").read_text()
    assert "resumed from checkpoint_00000010.pth at iteration 10" in log
    cfg = load_config(None, ["DATA.DATASET_TYPE", "synthetic"])
    plain = build_model(cfg)
    plain.load_state_dict(load_weights(run_dir / "output" / "model_final.pth"))  # strict: the same keys


def test_an_unknown_compile_backend_is_refused_with_the_choices():
    cfg = load_config(str(DIGITS_CONFIG), ["TRAIN.COMPILE", "True", "TRAIN.COMPILE_BACKEND", "inductr"])
    choices = r"unknown TRAIN.COMPILE_BACKEND 'inductr'; choose one of .*aot_eager.*inductor"
    with pytest.raises(ConfigError, match=choices):
        check_names(cfg)  # with the other names, before anything is written


class RecordOutputTypes(HookBase):
    """The dtype of every output of the model's forward during the run."""

    def __init__(self):
        self.types, self._handle = set(), None

    def before_train(self):
        self._handle = self.trainer.unwrapped_model.register_forward_hook(
            lambda module, inputs, output: self.types.add(output.dtype))

    def after_train(self):
        self._handle.remove()


@pytest.mark.parametrize("dtype, runs_in", [("bfloat16", torch.bfloat16), ("float16", torch.float32)])
def test_amp_with_bfloat16_runs_on_the_cpu_and_float16_stays_float32_there(run_dir, dtype, runs_in):
    record = RecordOutputTypes()
    assert synthetic_run(run_dir, "TRAIN.AMP", "True", "TRAIN.AMP_DTYPE", dtype, "TRAIN.MAX_EPOCHS", "1",
                         hooks=[record]) == 0

    assert record.types == {runs_in}
    (run,) = runs_of(sqlite_uri(run_dir / "store"), experiment="Default")
    assert run.data.tags["amp_dtype"] == str(runs_in).removeprefix("torch.")
    assert ("training in float32" in (run_dir / "output" / "log.txt").read_text()) == (runs_in == torch.float32)


# ---- what a resume may change --------------------------------------------------------------------------------------
@pytest.mark.parametrize("saved, now, allowed", [
    (["TRAIN.COMPILE", "True"], ["TRAIN.COMPILE", "False"], True),
    (["TRAIN.AMP_DTYPE", "float16"], ["TRAIN.AMP_DTYPE", "bfloat16"], True),  # AMP is off: the type is unused
    (["TRAIN.AMP", "True"], ["TRAIN.AMP", "True", "TRAIN.AMP_DTYPE", "bfloat16"], False),
    ([], ["TRAIN.EMA_DECAY", "0.999"], False),
    (["TRAIN.MIXUP_ALPHA", "0.2"], ["TRAIN.MIXUP_ALPHA", "0.4"], False),
])
def test_a_resume_may_switch_compile_and_an_unused_amp_type_but_not_the_recipe(tmp_path, saved, now, allowed):
    saved_yaml = load_config(str(DIGITS_CONFIG), saved).dump()
    cfg = load_config(str(DIGITS_CONFIG), now)
    if allowed:
        check_resume_config(cfg, saved_yaml, tmp_path / "checkpoint_00000004.pth")
    else:
        with pytest.raises(ConfigError, match="changes the training trajectory"):
            check_resume_config(cfg, saved_yaml, tmp_path / "checkpoint_00000004.pth")
