"""LeNet-style CNN for 32x32 inputs: the Lightning template's default model."""

from torch import nn


class SimpleCNN(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, images):
        return self.classifier(self.features(images))


def build_simple_cnn(cfg) -> nn.Module:
    return SimpleCNN(in_channels=cfg.DATA.INPUT_DIM, num_classes=len(cfg.DATA.CLASSES))
