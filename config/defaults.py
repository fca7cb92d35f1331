"""Every configuration key, with its default and meaning. No other file adds keys.

Keys kept from the Lightning template users port their configs from: SEED, TRAIN.*, MLFLOW.EXPERIMENT_NAME
and DATA.* with the same names and meanings.
"""

from pathlib import Path

from yacs.config import CfgNode as CN

REPO_ROOT = Path(__file__).resolve().parent.parent

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]

_C = CN()
_C.SEED = 42  # seeds model init, data split, shuffling and augmentation (keyed by seed, epoch, sample)
_C.OUTPUT_DIR = ""  # checkpoints, log.txt, config.yaml; empty = <repo>/output/<timestamp>
# Python files (my_models.py) or modules (mypkg.models) imported before the run is built, so that what they
# register (@MODEL_REGISTRY.register("mynet"), engine/registry.py) can be named here; --import FILE adds one.
_C.IMPORTS = []

_C.TRAIN = CN()
_C.TRAIN.BATCH_SIZE = 128  # global batch: the sum over all devices and processes
_C.TRAIN.DISTRIBUTED_BACKEND = "dp"  # dp (one process, nn.DataParallel), ddp (torchrun), none
_C.TRAIN.GPUS = -1  # -1 = all visible GPUs (CPU when there is no CUDA), 0 = CPU, N = the first N GPUs
_C.TRAIN.LR = 0.01  # base learning rate
_C.TRAIN.MAX_EPOCHS = 2  # number of passes over the training split
_C.TRAIN.MODEL_TYPE = "simple_cnn"  # a name in networks.MODEL_REGISTRY: simple_cnn, resnet18
_C.TRAIN.MOMENTUM = 0.9  # SGD momentum; Adam/AdamW use it as beta1
_C.TRAIN.OPTIMIZER_TYPE = "sgd"  # sgd, adam, adamw
_C.TRAIN.WEIGHT_DECAY = 0.0  # L2 penalty (decoupled for adamw)
# LR schedule. Every schedule is applied per iteration; step_lr and multistep change the LR only at
# epoch boundaries (as a per-epoch StepLR would), cosine decays smoothly every iteration.
_C.TRAIN.SCHEDULER_TYPE = "step_lr"  # step_lr, multistep, cosine, constant
_C.TRAIN.STEP_SIZE = 5  # step_lr: multiply the LR by GAMMA every STEP_SIZE epochs
_C.TRAIN.GAMMA = 0.1  # step_lr / multistep decay factor
_C.TRAIN.MILESTONES = []  # multistep: epochs at which the LR is multiplied by GAMMA
_C.TRAIN.WARMUP_EPOCHS = 0.0  # linear warmup from 0 to LR over this many epochs (per iteration); 0 = off
# Mixed precision: autocast to TRAIN.AMP_DTYPE. float16 (the default) is CUDA only, with a GradScaler; on the
# CPU it is ignored with a log line (float32). bfloat16 needs no GradScaler and runs on CUDA and the CPU.
_C.TRAIN.AMP = False
_C.TRAIN.AMP_DTYPE = "float16"  # float16 or bfloat16; a resume may change it only while TRAIN.AMP is off
_C.TRAIN.CLIP_GRAD_NORM = 0.0  # clip the global gradient norm to this value; 0 = off
_C.TRAIN.ACCUM_STEPS = 1  # gradient accumulation: batches per optimizer step; 1 = off
# False (the GPU's fast path): cuDNN autotuning (cudnn.benchmark) and TF32 float32 matmuls and convolutions on
# GPUs. True: exact reproducibility, deterministic algorithms and full float32, so a run (and a resumed run) gives
# the same bits; on a GPU this costs speed. Runs on the CPU are exact either way (it pays nothing for it). The
# MLflow tag `reproducibility` says which ran: exact or fast.
_C.TRAIN.DETERMINISTIC = False
_C.TRAIN.SYNC_BN = False  # ddp only: convert BatchNorm layers to SyncBatchNorm
_C.TRAIN.CHANNELS_LAST = False  # CUDA: channels_last memory format for model and batches
# torch.compile of the model (inductor). Compiled once per input shape: the full batch and the epoch's last,
# smaller one; evaluation runs the plain module. Saved weights never carry compile prefixes, and a resume may
# switch it on or off (the compiled kernels may round differently from the plain ones).
_C.TRAIN.COMPILE = False
# torch.compile's backend: inductor (generated kernels), cudagraphs, or eager / aot_eager, which skip code
# generation: to tell a compiler problem from a model problem, or to compile in seconds.
_C.TRAIN.COMPILE_BACKEND = "inductor"
# The modern recipe. Each is off at 0 and bit for bit the same under --resume and any number of processes.
# Exponential moving average of the weights after every optimizer step, with the warm-up
# decay_t = min(EMA_DECAY, (1 + t) / (10 + t)) at update t; buffers (BatchNorm statistics) are copied.
# With EMA on, evaluation (val_acc1, val_loss), model_best.pth, model_final.pth and the logged model are the
# EMA weights'; the raw weights' are logged as val_acc1_raw and val_loss_raw. Typical: 0.999-0.9999.
_C.TRAIN.EMA_DECAY = 0.0
_C.TRAIN.LABEL_SMOOTHING = 0.0  # the training loss's targets: (1 - s) * target + s / classes; evaluation keeps 0
# mixup (blend two images) and cutmix (paste a box of one into the other), with the targets mixed alike,
# lambda ~ Beta(alpha, alpha). Both on: one of the two per batch, at random. Samples are paired within groups
# of 8 (the largest divisor <= 8 of a process's share of the batch) of the global batch; the epoch's last,
# smaller batch is not mixed. Draws are keyed by (SEED, epoch, batch): the same mixes resumed or on N processes.
_C.TRAIN.MIXUP_ALPHA = 0.0  # typical 0.2 (CIFAR) - 0.8 (ImageNet)
_C.TRAIN.CUTMIX_ALPHA = 0.0  # typical 1.0

_C.DATA = CN()
_C.DATA.CACHE_DIR = str(REPO_ROOT / ".data")  # where datasets are downloaded to and read from
# Class names in label order. Empty = the dataset's own: CIFAR-10's, "0".."9" (digits, synthetic), or the sorted
# class folders of DATA.ROOT/train (image_folder; a list given is checked against them).
_C.DATA.CLASSES = []
_C.DATA.DATASET_TYPE = "cifar10"  # cifar10 (also spelled cifer10), digits, image_folder, synthetic
_C.DATA.INPUT_DIM = 3  # image channels fed to the model (digits are repeated to this many)
# DataLoader workers per process for folder data, capped at the process's share of the CPUs it may use (its
# affinity, e.g. Slurm's --cpus-per-gpu, divided among the processes torchrun starts on the node).
_C.DATA.NUM_WORKERS = 2
# Applied in this order to whole batches on the training device. Random ones (random_crop with padding
# 4, random_horizontal_flip) act on training batches only. to_tensor scales uint8 to [0, 1];
# normalize uses the dataset's per-channel mean and std.
_C.DATA.TRANSFORM_LIST = ["to_tensor", "normalize"]
# In-memory datasets: apply to_tensor and normalize once to the whole split instead of to every batch
# (also when listed after random_crop / random_horizontal_flip: the crop's padding then holds what a zero
# pixel becomes). Bit-identical results, faster steps; the split takes 4x the memory (float32).
_C.DATA.PRETRANSFORM = True
# Fraction of the training images held out for validation, in (0, 1), chosen by SEED. image_folder: only
# without a val/ folder (with one, val/ is the validation split and this is not used).
_C.DATA.VALIDATION_SIZE = 0.25
_C.DATA.ROOT = ""  # image_folder: folder holding train/<class name>/ (and optionally val/, test/): ImageFolder layout
_C.DATA.IMAGE_SIZE = 32  # image_folder / synthetic: images are resized to IMAGE_SIZE x IMAGE_SIZE
_C.DATA.SYNTHETIC_SIZE = 2048  # synthetic: number of images (train + val)

_C.MODEL = CN()
_C.MODEL.WEIGHTS = ""  # a model_final.pth or checkpoint to start from (or to evaluate with --eval-only)

_C.MLFLOW = CN()
# Created on first use. Empty = named after the data: the dataset (digits, cifar10, synthetic) or, for
# image_folder, DATA.ROOT's folder name (DATA.ROOT ~/data/flowers -> flowers).
_C.MLFLOW.EXPERIMENT_NAME = ""
# Empty = the MLFLOW_TRACKING_URI environment variable, else the project's local store
# (sqlite:///<repo>/mlruns/mlflow.db with artifacts in <repo>/mlruns/artifacts).
_C.MLFLOW.TRACKING_URI = ""
_C.MLFLOW.RUN_NAME = ""  # empty = MLflow picks a name
# False: no MLflow run at all (no tracker, no delivery process); the run's files and log.txt only.
_C.MLFLOW.ENABLED = True
# Log the trained model with mlflow.pytorch.log_model at the end (torch.export "pt2" format: loading it
# back does not unpickle code).
_C.MLFLOW.LOG_MODEL = True
# Register the logged model as a new version of this registered model (empty = off; needs LOG_MODEL True).
# MLflow reserves the alias "latest"; models:/<name>/latest already resolves to the newest version.
_C.MLFLOW.REGISTER_MODEL = ""
# CPU, memory, disk and network (GPU utilisation, memory and power on NVIDIA GPUs) as system/... metrics,
# sampled every 10 s by MLflow's monitor on a background thread, plus a last sample at the end.
_C.MLFLOW.SYSTEM_METRICS = True
# Seconds a finished run waits at most for MLflow to take what is still queued (an unreachable server, a slow
# store). What is left then stays in OUTPUT_DIR/mlflow_pending.jsonl for tools/upload_pending.py.
_C.MLFLOW.END_WAIT = 60.0

_C.LOG = CN()
_C.LOG.PERIOD = 20  # iterations between metric writes and console lines (every step's loss is logged)
_C.LOG.PROGRESS_BAR = True  # one tqdm bar for the run, with its ETA, on a terminal only (never in log.txt)

_C.EVAL = CN()
_C.EVAL.PERIOD = 1  # evaluate on the validation split every PERIOD epochs (and after the last); 0 = end only
_C.EVAL.SPLIT = "val"  # split used by --eval-only: val, or test where the dataset has one

_C.CHECKPOINT = CN()
_C.CHECKPOINT.PERIOD = 0  # iterations between checkpoints, besides one at every epoch end; 0 = epoch ends only
_C.CHECKPOINT.KEEP = 3  # newest periodic checkpoints kept (model_best.pth and model_final.pth are extra)


def get_default_config() -> CN:
    """A fresh, mutable copy of the defaults."""
    return _C.clone()
