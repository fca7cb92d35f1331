"""Turn a frozen config into the objects the engine runs: data, model, solver, hooks, trainer.

The project's builder of ``engine.Runner`` (``ptengine.Runner`` hands it over): ``tools/train_net.py``,
``tools/benchmark.py`` and a user's own script all build their runs through these functions.
"""

import functools
import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engine import hooks as engine_hooks
from engine.checkpoint import CheckpointError, load_file
from engine.compile import COMPILE_BACKEND_REGISTRY, compile_model
from engine.distributed import (
    get_rank,
    get_world_size,
    module_to_evaluate,
    unwrapped,
    wait_for_main_process,
    wrap_model,
)
from engine.ema import EMAHook, FinalWeights, ModelEMA
from engine.eval_report import PerClassAccuracyReport
from engine.evaluation import evaluate
from engine.pace import RunPace
from engine.precision import AMP_DTYPES
from engine.run import FinalSteps, RunRecord, reproducibility_mode
from engine.tracking import MLflowTracker, ModelCard, redact_credentials, resolve_tracking_uri
from engine.trainer import Trainer
from ptengine.config import ConfigError, flatten_config
from ptengine.datasets import DatasetSplits, TensorSplit, build_datasets
from ptengine.datasets.batches import build_batches
from ptengine.datasets.mixing import build_mixing
from ptengine.datasets.transforms import build_transform
from ptengine.datasets.user_data import LoaderAsIs, splits_from_objects
from ptengine.networks import build_model
from ptengine.solvers import build_lr_scheduler, build_optimizer
from ptengine.tools.dataset_inputs import DatasetInputs
from ptengine.tools.run_record import collect_run_record, git_diff, installed_packages

logger = logging.getLogger("engine")


def check_names(cfg, given=()) -> None:
    """Every name the config picks from a registry exists: checked before anything is written or loaded, once the
    files and modules of IMPORTS have registered theirs. ``given``: keys whose objects the run was handed."""
    import_user_code(cfg.IMPORTS)
    from ptengine.datasets import DATASET_REGISTRY
    from ptengine.datasets.transforms import TRANSFORM_REGISTRY
    from ptengine.networks import MODEL_REGISTRY
    from ptengine.solvers.lr_schedulers import SCHEDULE_REGISTRY
    from ptengine.solvers.optimizers import OPTIMIZER_REGISTRY

    for registry, names in [(DATASET_REGISTRY, [cfg.DATA.DATASET_TYPE]), (TRANSFORM_REGISTRY, cfg.DATA.TRANSFORM_LIST),
                            (MODEL_REGISTRY, [cfg.TRAIN.MODEL_TYPE]), (OPTIMIZER_REGISTRY, [cfg.TRAIN.OPTIMIZER_TYPE]),
                            (SCHEDULE_REGISTRY, [cfg.TRAIN.SCHEDULER_TYPE]),
                            (COMPILE_BACKEND_REGISTRY, [cfg.TRAIN.COMPILE_BACKEND] if cfg.TRAIN.COMPILE else [])]:
        for name in names if registry.key not in given else ():
            registry.lookup(name)


def import_user_code(names) -> None:
    """Import each of ``names``: a Python file (``my_models.py``, relative to the current folder) or a module
    (``mypkg.models``), for what it registers."""
    for name in names:
        path = Path(name).expanduser()
        try:
            if name.endswith(".py"):
                if not path.is_file():
                    raise ConfigError(f"IMPORTS: no file {name}; give the path of a Python file (from "
                                      f"{Path.cwd()}) or a module name")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module  # its classes pickle and its registrations resolve by name
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name.split(".")[0] and error.name != name:
                raise
            raise ConfigError(f"IMPORTS: no module named {name}; give a Python file (my_models.py) or a module "
                              "importable from this folder") from None


@dataclass
class Data:
    splits: DatasetSplits
    train: object  # batch sources (datasets.batches)
    val: object
    test: object | None

    def close(self) -> None:
        """Ends the sources' DataLoader workers (a DataLoader of the user's is theirs to keep)."""
        for source in (self.train, self.val, self.test):
            if hasattr(source, "close"):
                source.close()


def build_data(cfg, device, train_data=None, val_data=None) -> Data:
    """Datasets and batch sources for this process (its share of every global batch under DDP): of
    DATA.DATASET_TYPE, or of the user's own ``train_data`` and ``val_data`` (datasets/user_data.py)."""
    rank, world_size = get_rank(), get_world_size()
    if cfg.TRAIN.BATCH_SIZE % world_size:
        raise ConfigError(f"TRAIN.BATCH_SIZE {cfg.TRAIN.BATCH_SIZE} is the global batch and must divide evenly "
                          f"over {world_size} processes; use a multiple of {world_size}")
    if train_data is not None or val_data is not None:
        splits = splits_from_objects(train_data, val_data, len(cfg.DATA.CLASSES))
    else:
        if world_size > 1 and rank == 0:
            logger.info(f"preparing the {cfg.DATA.DATASET_TYPE} dataset (a download, the first time) on rank 0; "
                        f"the other {world_size - 1} rank(s) wait for it")
        if rank != 0:
            wait_for_main_process()  # rank 0 prepares first, so processes never race on the cache folder
        splits = build_datasets(cfg)
        if rank == 0:
            wait_for_main_process()
    mixing = build_mixing(cfg, world_size)  # mixup / cutmix of the training batches (None = off)

    def batches(split, train):
        if split is None:
            return None
        transform = build_transform(cfg.DATA.TRANSFORM_LIST, splits.mean, splits.std, cfg.SEED, train=train)
        if isinstance(split, DataLoader):
            return LoaderAsIs(split, transform, device, world_size, cfg.TRAIN.CHANNELS_LAST)
        return build_batches(split, cfg.TRAIN.BATCH_SIZE, transform, device, shuffle=train, seed=cfg.SEED,
                             num_workers=cfg.DATA.NUM_WORKERS, rank=rank, world_size=world_size,
                             channels_last=cfg.TRAIN.CHANNELS_LAST, pretransform=cfg.DATA.PRETRANSFORM,
                             mixing=mixing if train else None)

    return Data(splits, batches(splits.train, True), batches(splits.val, False), batches(splits.test, False))


def build_model_for_training(cfg, device, num_gpus: int, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The model of TRAIN.MODEL_TYPE (or the user's own ``model``) with the initial weights of ``MODEL.WEIGHTS``
    (if set), on ``device``, wrapped in DataParallel / DistributedDataParallel as the backend asks, and compiled
    (the wrapper, outermost) with ``TRAIN.COMPILE``."""
    model = build_model(cfg) if model is None else model
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS)
    model = model.to(device)
    if cfg.TRAIN.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    model = wrap_model(model, device, num_gpus, cfg.TRAIN.DISTRIBUTED_BACKEND, sync_bn=cfg.TRAIN.SYNC_BN)
    if cfg.TRAIN.COMPILE and isinstance(model, torch.nn.DataParallel):
        raise ConfigError(f"TRAIN.COMPILE does not support DataParallel over {num_gpus} GPUs; use torchrun with "
                          "TRAIN.DISTRIBUTED_BACKEND ddp, one GPU (TRAIN.GPUS 1), or TRAIN.COMPILE False")
    return compile_model(model, cfg.TRAIN.COMPILE_BACKEND) if cfg.TRAIN.COMPILE else model


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a model_final.pth (plain state_dict) or a checkpoint into ``model``: the checkpoint's EMA weights when
    it holds them (as model_final.pth would), else its ``model`` entry."""
    try:
        state = load_file(path)
    except CheckpointError as error:
        raise CheckpointError(f"MODEL.WEIGHTS: {error}; give the path of a model_final.pth or checkpoint_*.pth "
                              "written by this engine") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        average = (state.get("hooks") or {}).get(EMAHook.state_key, {}).get("model")
        if average is not None:
            logger.info(f"MODEL.WEIGHTS: the EMA weights of {path} (those its val_acc1 was measured on)")
        state = state["model"] if average is None else average
    # Weights saved from a compiled model by other code carry torch.compile's prefix (this engine never writes it).
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, "_orig_mod.")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise CheckpointError(f"MODEL.WEIGHTS {path} does not fit TRAIN.MODEL_TYPE "
                              f"'{model.__class__.__name__}': {detail}") from None


def build_weights(cfg, model) -> FinalWeights:
    """The weights the run evaluates, saves and logs: a moving average of ``model``'s with ``TRAIN.EMA_DECAY``,
    else ``model``'s own. Hand it to ``build_trainer`` and ``build_final_steps``."""
    ema = ModelEMA(unwrapped(model), cfg.TRAIN.EMA_DECAY) if cfg.TRAIN.EMA_DECAY else None
    return FinalWeights(model, ema)


def build_loss(cfg):
    """The training loss: cross-entropy summed over the batch, on class indices or mixed (soft) targets, with
    ``TRAIN.LABEL_SMOOTHING``. Evaluation keeps plain cross-entropy."""
    return functools.partial(F.cross_entropy, reduction="sum", label_smoothing=cfg.TRAIN.LABEL_SMOOTHING)


def build_evaluation(cfg, weights: FinalWeights, data: Data, device):
    """``evaluate() -> results`` on the validation split, of ``weights.evaluated``; with EMA also the trained weights'
    ``loss_raw`` and ``acc1_raw`` (logged as val_loss_raw, val_acc1_raw)."""
    num_classes, amp, amp_dtype = len(cfg.DATA.CLASSES), cfg.TRAIN.AMP, AMP_DTYPES[cfg.TRAIN.AMP_DTYPE]

    def evaluate_models() -> dict:
        results = evaluate(weights.evaluated, data.val, num_classes, device, amp, amp_dtype)
        if weights.ema is not None:
            raw = evaluate(weights.trained, data.val, num_classes, device, amp, amp_dtype)
            results.update(loss_raw=raw["loss"], acc1_raw=raw["acc1"])
        return results

    return evaluate_models


def build_trainer(cfg, model, data: Data, device, tracker=None, checkpointer=None, extra_hooks=(),
                  loss=None, weights: FinalWeights | None = None, optimizer=None) -> Trainer:
    """The trainer with the built-in hooks, in the order they must run (see engine/hooks.py).

    ``extra_hooks`` (your HookBase subclasses) run after the metric writer and before the checkpointers, so a
    checkpoint holds their state as of the same step. ``tracker`` (an MLflowTracker, or None on other ranks)
    receives the metrics; ``checkpointer`` (None = no checkpoints) saves the state. ``loss``: yours, or
    cross-entropy with ``TRAIN.LABEL_SMOOTHING``. ``weights`` (``build_weights``, default: ``model``'s own) are
    kept current, evaluated, and saved as model_best.pth. ``optimizer``: a torch optimizer of ``model``'s
    parameters, or a function ``model -> optimizer``; default: TRAIN.OPTIMIZER_TYPE.
    """
    optimizer = _optimizer_for(cfg, model, optimizer)
    weights = weights or FinalWeights(model)
    iters_per_epoch = -(-len(data.train) // cfg.TRAIN.ACCUM_STEPS)
    pace = RunPace()  # one ETA: measured by the epoch timer, shown by the console lines and the bar
    hooks = [
        *weights.hooks(),  # first: every other hook sees the weights of this step (the EMA's update)
        engine_hooks.LRScheduler(build_lr_scheduler(cfg, optimizer, iters_per_epoch)),
        engine_hooks.EpochTimer(len(data.splits.train), pace),
        engine_hooks.EvalHook(build_evaluation(cfg, weights, data, device), cfg.EVAL.PERIOD),
        *([PerClassAccuracyReport(tracker, cfg.DATA.CLASSES)] if tracker is not None else []),
        engine_hooks.MetricWriter(tracker, cfg.LOG.PERIOD, pace),
        *extra_hooks,
    ]
    if checkpointer is not None:
        hooks += [engine_hooks.BestCheckpointer(checkpointer, model=weights.module),
                  engine_hooks.PeriodicCheckpointer(checkpointer, cfg.CHECKPOINT.PERIOD,
                                                    before_write=tracker.save_pending if tracker else None)]
    hooks.append(engine_hooks.ProgressBar(enabled=cfg.LOG.PROGRESS_BAR and get_rank() == 0, pace=pace))
    return Trainer(model, optimizer, data.train, cfg.TRAIN.MAX_EPOCHS, device, hooks=hooks,
                   loss=loss or build_loss(cfg), amp=cfg.TRAIN.AMP, amp_dtype=AMP_DTYPES[cfg.TRAIN.AMP_DTYPE],
                   accum_steps=cfg.TRAIN.ACCUM_STEPS, clip_grad_norm=cfg.TRAIN.CLIP_GRAD_NORM,
                   stop_check_period=cfg.LOG.PERIOD, checkpoint_extras={"config": cfg.dump()})


def _optimizer_for(cfg, model, given):
    if given is None:
        return build_optimizer(cfg, model)
    if isinstance(given, torch.optim.Optimizer):
        return given
    if callable(given):
        return given(model)
    raise ConfigError(f"optimizer must be a torch.optim.Optimizer or a function model -> optimizer, not "
                      f"{type(given).__name__}")


def make_tracker(cfg, folder, kind: str = "") -> MLflowTracker:
    """The MLflow tracker of a run whose files are in ``folder`` (a RunFolder): it learns the run id there.
    ``kind`` ("eval", "rerun") starts the name MLflow gives the run when MLFLOW.RUN_NAME is empty."""
    return MLflowTracker(resolve_tracking_uri(cfg.MLFLOW.TRACKING_URI), cfg.MLFLOW.EXPERIMENT_NAME,
                         cfg.MLFLOW.RUN_NAME, pending_dir=folder.path, on_run_id=folder.remember_run_id,
                         end_wait=cfg.MLFLOW.END_WAIT, name_prefix=kind)


def build_run_record(cfg, device, num_gpus: int, data: Data, tracker, extra_tags: dict,
                     description: str = "") -> RunRecord:
    """Params (the flattened config), tags (where the run came from, where its files are, what it trained),
    config.yaml, the package list and the diff, and the dataset inputs (computed in the background)."""
    tags = {**collect_run_record(cfg, device, num_gpus), "output_dir": cfg.OUTPUT_DIR,
            "reproducibility": reproducibility_mode(cfg.TRAIN.DETERMINISTIC, device),  # exact, or fast on a GPU
            "mlflow.note.content": description or run_description(cfg, data), **extra_tags}
    texts = {"requirements-freeze.txt": installed_packages()}
    if tags.get("git_dirty") == "True":
        texts["git_diff.patch"] = git_diff()
    return RunRecord(params={key: redact_credentials(value) for key, value in flatten_config(cfg).items()},
                     tags=tags, artifacts=[Path(cfg.OUTPUT_DIR) / "config.yaml"], texts=texts,
                     background=[DatasetInputs(tracker, cfg, data.splits)] if tracker is not None else [],
                     system_metrics=cfg.MLFLOW.SYSTEM_METRICS,
                     tracking_uri=resolve_tracking_uri(cfg.MLFLOW.TRACKING_URI))


def run_description(cfg, data: Data) -> str:
    """What was trained on what, for the run's description in the MLflow UI."""
    sizes = f"{len(data.splits.train):,} training / {len(data.splits.val):,} validation images"
    return (f"{cfg.TRAIN.MODEL_TYPE} trained on {cfg.DATA.DATASET_TYPE} ({sizes}) for {cfg.TRAIN.MAX_EPOCHS} "
            f"epochs: {cfg.TRAIN.OPTIMIZER_TYPE}, LR {cfg.TRAIN.LR:g} ({cfg.TRAIN.SCHEDULER_TYPE}), "
            f"batch {cfg.TRAIN.BATCH_SIZE}. Files: {cfg.OUTPUT_DIR}")


def evaluate_weights(cfg, data: Data, device, num_gpus: int, model=None) -> dict:
    """``--eval-only``: the evaluation of MODEL.WEIGHTS (into ``model`` when given) on EVAL.SPLIT of ``data``."""
    batches = data.test if cfg.EVAL.SPLIT == "test" else data.val
    if batches is None:
        raise ConfigError(f"the {cfg.DATA.DATASET_TYPE} dataset has no test split; use EVAL.SPLIT val")
    model = module_to_evaluate(build_model_for_training(cfg, device, num_gpus, model))
    return evaluate(model, batches, len(cfg.DATA.CLASSES), device, cfg.TRAIN.AMP,
                          AMP_DTYPES[cfg.TRAIN.AMP_DTYPE])


def build_final_steps(cfg, data: Data, final_model, device, dataset_inputs: DatasetInputs | None = None) -> FinalSteps:
    """``final_model``: the weights of model_final.pth, the test split and the logged model (the EMA's with
    TRAIN.EMA_DECAY, else the trained ones). ``dataset_inputs``: the run's, whose validation and test datasets
    the logged model's metrics are attached to."""
    num_classes, amp_dtype = len(cfg.DATA.CLASSES), AMP_DTYPES[cfg.TRAIN.AMP_DTYPE]
    evaluate_test = None
    if data.test is not None:
        def evaluate_test():
            return evaluate(final_model, data.test, num_classes, device, cfg.TRAIN.AMP, amp_dtype)
    final = FinalSteps(class_names=list(cfg.DATA.CLASSES), evaluate_test=evaluate_test, model=final_model,
                       log_model=cfg.MLFLOW.LOG_MODEL, register_as=cfg.MLFLOW.REGISTER_MODEL)
    if cfg.MLFLOW.LOG_MODEL:
        final.example_input = next(iter(data.val.epoch(0))).images[:2].float().cpu().contiguous()
        final.card = model_card(cfg, data, final.example_input.shape)
        if dataset_inputs is not None:
            final.metric_datasets = dataset_inputs.metric_datasets
    return final


def model_card(cfg, data: Data, input_shape) -> ModelCard | None:
    """How the logged model turns a user's image into what the network saw in evaluation, and its description."""
    channels, height, width = input_shape[1:]
    if channels not in (1, 3):
        logger.warning(f"the model is not logged: it takes {channels}-channel images and MLflow's image model "
                       "here takes grey (DATA.INPUT_DIM 1) or RGB (3) ones")
        return None
    mean, std = evaluation_normalization(cfg, data.splits, channels)
    preprocessing = {"class_names": list(cfg.DATA.CLASSES), "channels": channels, "height": height, "width": width,
                     "mean": mean, "std": std}
    colour = "grey" if channels == 1 else "RGB"
    description = (f"{cfg.TRAIN.MODEL_TYPE} trained on {cfg.DATA.DATASET_TYPE}: {len(cfg.DATA.CLASSES)} classes "
                   f"({', '.join(cfg.DATA.CLASSES[:10])}{', ...' if len(cfg.DATA.CLASSES) > 10 else ''}).\n\n"
                   f"mlflow.pyfunc.load_model('runs:/<run id>/model').predict({{'image': [...]}}) takes PNG/JPEG "
                   f"bytes or uint8 HxWxC arrays of any size ({colour}, resized to {height}x{width}, normalized "
                   f"with mean {[round(m, 4) for m in mean]} and std {[round(s, 4) for s in std]}) and returns "
                   "the class, its probability and every class's probability. The nn.Module: "
                   "mlflow.pytorch.load_model('runs:/<run id>/model/artifacts/pytorch_model').\n\n"
                   f"Files: {cfg.OUTPUT_DIR}")
    return ModelCard(preprocessing=preprocessing, example=example_png(data.splits.val), description=description,
                     model_type=f"{cfg.TRAIN.MODEL_TYPE}-{cfg.DATA.DATASET_TYPE}")


def evaluation_normalization(cfg, splits, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std, in [0, 1] units, of what the evaluation transforms do to a uint8 pixel ``p``:
    ``(p / 255 - mean) / std``. Measured on the transforms themselves, so that a list without ``normalize``
    (or ``to_tensor``) is described as it is."""
    transform = build_transform(cfg.DATA.TRANSFORM_LIST, splits.mean, splits.std, cfg.SEED, train=False)
    probe = torch.tensor([0, 255, 128], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, channels, 1, 1)
    black, white, grey = transform(probe.contiguous(), torch.arange(3), 0).double()[:, :, 0, 0]
    std = 1 / (white - black)
    mean = -black * std
    if not torch.allclose(grey, (128 / 255 - mean) / std, atol=1e-4):
        raise ConfigError(f"the evaluation transforms of DATA.TRANSFORM_LIST {list(cfg.DATA.TRANSFORM_LIST)} are "
                          "not a per-channel scale and shift, which the logged model's image input assumes; "
                          "set MLFLOW.LOG_MODEL False")
    return mean.tolist(), std.tolist()


def example_png(split) -> bytes:
    """The split's first image as PNG file bytes."""
    import io

    from PIL import Image

    image = split.images[0] if isinstance(split, TensorSplit) else split[0][0]
    pixels = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()
