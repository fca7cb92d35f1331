"""The ``make gpu-check`` lines that build the engine's pieces in this process rather than train through
tools/train_net.py: the batch sources of folder and in-memory data, the logged model against model_final.pth,
and the speed of the engine against a bare loop (tools/benchmark.py's modes).
"""

import gc
import sys
import tempfile
from pathlib import Path

import torch

from ptengine.tools.gpu_check_runs import PYTHON, REPO, Finished, Workspace, child_env
from ptengine.tools.gpu_check_table import Verdict, verdict

FOLDER_TRAIN_IMAGES, FOLDER_VAL_PER_CLASS = 640, 10
FOLDER_TRANSFORMS = ["random_crop", "random_horizontal_flip", "to_tensor", "normalize"]
PREDICTION_BATCH = 64  # the logged model is run on whole batches of this size (its export's dynamic batch)
LOGIT_TOLERANCE = 1e-3


# ---- image-folder data ------------------------------------------------------------------------------------
def write_image_folder(root: Path) -> Path:
    """Random 32x32 RGB images as PNG files in the ImageFolder layout, the CIFAR-10 class names as folders."""
    from ptengine.config.defaults import CIFAR10_CLASSES
    from ptengine.tools.benchmark import write_png_tree

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (FOLDER_TRAIN_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, len(CIFAR10_CLASSES), (FOLDER_TRAIN_IMAGES,), generator=generator)
    write_png_tree(root / "train", images, labels, CIFAR10_CLASSES)
    val_labels = torch.arange(len(CIFAR10_CLASSES) * FOLDER_VAL_PER_CLASS) % len(CIFAR10_CLASSES)
    write_png_tree(root / "val", images[:len(val_labels)], val_labels, CIFAR10_CLASSES)
    return root


def compare_folder_and_memory_batches(root: Path, device: torch.device) -> Verdict:
    """The folder's batches (2 DataLoader workers, pinned memory, non_blocking copies) against the same images
    held in memory on the device: bit-identical images and labels, two epochs and a mid-epoch restart."""
    from ptengine.config import load_config
    from ptengine.datasets import build_datasets
    from ptengine.datasets.base import TensorSplit
    from ptengine.datasets.batches import LoaderBatches, build_batches
    from ptengine.datasets.transforms import build_transform

    cfg = load_config(None, ["DATA.DATASET_TYPE", "image_folder", "DATA.ROOT", str(root), "DATA.NUM_WORKERS", "2",
                             "DATA.TRANSFORM_LIST", repr(FOLDER_TRANSFORMS), "TRAIN.BATCH_SIZE", "64"])
    splits = build_datasets(cfg)
    decoded = [splits.train[index] for index in range(len(splits.train))]
    in_memory = TensorSplit(torch.stack([image for image, _ in decoded]), torch.tensor([label for _, label in decoded]))

    def source(split):
        transform = build_transform(cfg.DATA.TRANSFORM_LIST, splits.mean, splits.std, cfg.SEED, train=True)
        return build_batches(split, cfg.TRAIN.BATCH_SIZE, transform, device, shuffle=True, seed=cfg.SEED,
                             num_workers=cfg.DATA.NUM_WORKERS)

    folder, memory = source(splits.train), source(in_memory)
    pinned = device.type == "cuda"  # pinned memory is for copies to a GPU
    if not isinstance(folder, LoaderBatches) or (folder.loader.pin_memory, folder.loader.num_workers) != (pinned, 2):
        return verdict(False, f"the folder's batches do not come from 2 DataLoader workers "
                              f"{'into' if pinned else 'without'} pinned memory")
    compared, different = 0, []
    try:
        for epoch, start in ((0, 0), (1, 0), (1, 4)):
            for index, (a, b) in enumerate(zip(folder.epoch(epoch, start), memory.epoch(epoch, start), strict=True)):
                compared += 1
                same = a.images.device == b.images.device == device and torch.equal(a.images, b.images)
                if not (same and torch.equal(a.labels, b.labels)):
                    different.append(f"epoch {epoch} batch {start + index}")
    finally:
        del folder  # its persistent workers end with it
        gc.collect()
    return verdict(compared > 0 and not different, f"{compared} batches compared (2 epochs and a restart at batch "
                   f"4): " + (f"different in {different[:3]}" if different else "bit-identical to the in-memory "
                              f"path on {device}"))


# ---- the logged model ---------------------------------------------------------------------------------------
def validation_images(config_path: Path, device) -> torch.Tensor:
    """The run's validation images as the engine feeds them, in whole batches of PREDICTION_BATCH."""
    from ptengine.config import load_config
    from ptengine.tools.build import build_data

    images = torch.cat([batch.images for batch in build_data(load_config(str(config_path)), device).val.epoch(0)])
    return images[:len(images) // PREDICTION_BATCH * PREDICTION_BATCH]


def predict_with_logged_model(store: str, run_id: str, config_path: str, out: str) -> None:
    """Run in a process without CUDA: the run's logged model, loaded from MLflow, on the validation images."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(store)
    run = mlflow.MlflowClient(store).get_run(run_id)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    model = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    images = validation_images(Path(config_path), "cpu")
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in images.split(PREDICTION_BATCH)])
    torch.save({"logits": logits, "cuda_available": torch.cuda.is_available()}, out)


def compare_logged_model(workspace: Workspace, run: Finished, device: str = "cuda:0") -> Verdict:
    """The model the GPU run logged, loaded on the CPU in a process without CUDA, against model_final.pth on the
    GPU: the same class for every validation image, logits within LOGIT_TOLERANCE."""
    from ptengine.config import load_config
    from ptengine.networks import build_model

    out = workspace.root / "logged-model-cpu.pt"
    call = (f"import sys; sys.path.append({str(REPO)!r}); from ptengine.tools.gpu_check_inprocess import "
            f"predict_with_logged_model as p; p({workspace.store!r}, {run.mlflow_run().info.run_id!r}, "
            f"{str(run.output_dir / 'config.yaml')!r}, {str(out)!r})")
    loaded = workspace.run_command("logged-model-cpu", [PYTHON, "-c", call], env=child_env(CUDA_VISIBLE_DEVICES=""))
    if loaded.code != 0:
        return verdict(False, f"loading the logged model on the CPU failed: {loaded.summary()}")
    cpu = torch.load(out, weights_only=True)
    cfg = load_config(str(run.output_dir / "config.yaml"))
    model = build_model(cfg)
    model.load_state_dict(run.model_final())
    device = torch.device(device)
    model = model.to(device, memory_format=torch.channels_last).eval()
    torch.backends.cudnn.allow_tf32 = False  # float32 against float32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        gpu = torch.cat([model(chunk) for chunk in validation_images(run.output_dir / "config.yaml", device)
                         .split(PREDICTION_BATCH)]).cpu()
    same_classes = torch.equal(gpu.argmax(1), cpu["logits"].argmax(1))
    difference = (gpu - cpu["logits"]).abs().max().item()
    passed = same_classes and difference <= LOGIT_TOLERANCE and not cpu["cuda_available"]
    return verdict(passed, f"{len(gpu)} validation images: {'the same' if same_classes else 'different'} classes, "
                   f"logits within {difference:.1e} (<= {LOGIT_TOLERANCE:g}) of model_final.pth on the GPU"
                   + ("" if not cpu["cuda_available"] else "; but the loading process saw CUDA"))


# ---- speed --------------------------------------------------------------------------------------------------
SPEED_ARGS = ["--device", "cuda", "--model", "resnet18", "--amp", "--channels-last", "--batch-size", "256",
              "--images", "25600", "--epochs", "2", "--repeats", "2", "--modes", "bare,engine"]


def engine_against_bare_loop(folder: Path, argv=tuple(SPEED_ARGS)) -> tuple[float, float]:
    """Images per second of the engine (a ``ptengine.Runner`` run, as a user starts one) and of the bare loop,
    tools/benchmark.py's modes in this process (the order reversed every other repeat, medians of the timed
    epochs)."""
    from ptengine.tools import benchmark

    args = benchmark.parse_args(list(argv))
    results = {mode: benchmark.ModeStats() for mode in args.modes}
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as root:
        workspace = benchmark.Workspace(Path(root), args)
        try:
            for repeat in range(args.repeats):
                for mode in args.modes if repeat % 2 == 0 else args.modes[::-1]:
                    benchmark.record(results[mode], benchmark.run_mode(workspace, mode, with_costs=False))
                    gc.collect()
        finally:
            workspace.close()
    speed = {mode: benchmark.images_per_second(stats, args.images) for mode, stats in results.items()}
    print(f"  speed: engine {speed['engine']:,.0f} img/s, bare {speed['bare']:,.0f} img/s", file=sys.stderr)
    return speed["engine"], speed["bare"]
