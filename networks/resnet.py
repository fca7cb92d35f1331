"""ResNet-18 adapted to 32x32 images: a 3x3 stride-1 stem and no max-pool, so small images keep their detail."""

from torch import nn


def build_resnet18(cfg) -> nn.Module:
    from torchvision.models import resnet18  # here: torchvision takes ~1.3 s to import, most runs need none of it

    model = resnet18(weights=None, num_classes=len(cfg.DATA.CLASSES))
    model.conv1 = nn.Conv2d(cfg.DATA.INPUT_DIM, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
