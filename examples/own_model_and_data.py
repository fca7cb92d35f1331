"""Your own model, dataset and hook, trained by the engine, from any folder once the project is installed
(``pip install -e <the repository>``). Nothing in the repository is edited.

    python own_model_and_data.py --output-dir runs/shapes           # train
    python own_model_and_data.py --output-dir runs/shapes --resume  # continue it after Ctrl+C (bit for bit)

The same model, by its registered name, from the command line (in the repository):

    python tools/train_net.py --import examples/own_model_and_data.py --config-file config/digits.yaml \\
        TRAIN.MODEL_TYPE shapes_net
"""

import argparse
import math

import torch
from torch import nn
from torch.utils.data import Dataset

import ptengine
from engine import MODEL_REGISTRY, HookBase


class Shapes(Dataset):
    """Grey 16x16 images of a cross or a square at a random place, made from the index (no files needed)."""

    classes = ["cross", "square"]

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        label = int(torch.randint(2, (), generator=generator))
        y, x = torch.randint(2, 9, (2,), generator=generator).tolist()
        image = torch.randint(0, 40, (1, 16, 16), dtype=torch.uint8, generator=generator)  # noise
        if label == 1:
            image[0, y:y + 6, x:x + 6] = 220
        else:
            image[0, y + 2:y + 4, x:x + 6] = 220
            image[0, y:y + 6, x + 2:x + 4] = 220
        return image, label


class ShapesNet(nn.Module):
    """Two convolutions and a linear layer; any image size."""

    def __init__(self, channels: int = 1, num_classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, images):
        return self.classifier(self.features(images).flatten(1))


@MODEL_REGISTRY.register("shapes_net")  # TRAIN.MODEL_TYPE shapes_net, once this file is imported
def build_shapes_net(cfg):
    return ShapesNet(cfg.DATA.INPUT_DIM, len(cfg.DATA.CLASSES))


class LowestLoss(HookBase):
    """Keeps the lowest training loss seen every 10 steps; its state joins every checkpoint."""

    state_key = "lowest_loss"  # the name of its state in checkpoints

    def __init__(self):
        self.lowest = math.inf

    def after_step(self):
        if self.trainer.iter % 10 == 0:  # reading the loss waits for the step: not every step
            self.lowest = min(self.lowest, float(self.trainer.step_outputs.loss))

    def after_train(self):
        print(f"lowest training loss: {self.lowest:.4f}")

    def state_dict(self):
        return {"lowest": self.lowest}

    def load_state_dict(self, state):
        self.lowest = state["lowest"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    cfg = ptengine.load_config(opts=[
        "OUTPUT_DIR", args.output_dir, "MLFLOW.TRACKING_URI", args.tracking_uri, "MLFLOW.EXPERIMENT_NAME", "shapes",
        "DATA.INPUT_DIM", "1", "TRAIN.MAX_EPOCHS", str(args.epochs), "TRAIN.BATCH_SIZE", "32", "TRAIN.LR", "0.05",
        "TRAIN.GPUS", "0", "LOG.PERIOD", "10",
    ])
    torch.manual_seed(cfg.SEED)  # your model's initial weights: the same in every run of this script
    runner = ptengine.Runner(cfg, model=ShapesNet(channels=1, num_classes=2), train_data=Shapes(640, seed=0),
                             val_data=Shapes(160, seed=1), hooks=[LowestLoss()])
    result = runner.train(resume=args.resume)
    print(f"{result.status}: val_acc1 {result.final_metrics.get('val_acc1', float('nan')):.3f}, "
          f"MLflow run {result.run_id}, files in {result.output_dir}")
    return 0 if result.status == "FINISHED" else 130


if __name__ == "__main__":
    raise SystemExit(main())
