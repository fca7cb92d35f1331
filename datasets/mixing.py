"""mixup and cutmix on whole training batches on the device, keyed so that resumed and multi-process runs mix alike.

The semantics are torchvision's ``transforms.v2.MixUp`` / ``CutMix`` (lambda ~ Beta(alpha, alpha); each sample
is mixed with its neighbour; cutmix pastes a box whose area is about ``1 - lambda`` and corrects lambda to the
box actually pasted; the targets are mixed with the same lambda). Those classes draw from torch's global random
stream and pair samples across the whole local batch, which depends on the order of the calls and on the number
of processes. Here instead:

- a global batch is cut into groups of ``group_size`` consecutive samples, and a sample is paired with the next
  one of its group (the last with the first). A process's share of the batch is a whole number of groups
  (``group_size`` divides it), so every pair lies inside one process, whatever their number;
- mixup or cutmix (when both are on, one of them per batch, with even odds), and per group lambda and the box
  centre, are drawn from a generator seeded by ``(SEED, epoch, batch index)``: a resumed run and any number of
  processes draw the same values, without any state to save;
- the epoch's last, smaller batch is not mixed (its share per process would not be whole groups for every
  number of processes); its targets are one-hot.
"""

import numpy as np
import torch
import torch.nn.functional as F

from ptengine.config import ConfigError

MAX_GROUP_SIZE = 8
_SALT = 0x6D6978  # "mix": a stream apart from the shuffling's


def mixing_group_size(per_process_batch: int) -> int:
    """The largest divisor of a process's share of the batch that is at most ``MAX_GROUP_SIZE``.

    It is the same for any number of processes whose share is a multiple of it (8 for the usual power-of-two
    batches), and so are the mixes.
    """
    return max(size for size in range(1, MAX_GROUP_SIZE + 1) if per_process_batch % size == 0)


class BatchMixing:
    """``mixing(images, labels, epoch, batch_index, first_position, global_size) -> (images, targets)``.

    ``images`` [b, C, H, W] float and ``labels`` [b] are this process's share of global batch ``batch_index``,
    starting at position ``first_position`` of the ``global_size`` samples of that batch. ``targets`` are
    per-class probabilities [b, num_classes] (float32), for a loss that takes soft targets.
    """

    def __init__(self, num_classes: int, batch_size: int, group_size: int, seed: int, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0):
        self.num_classes, self.batch_size, self.group_size, self.seed = num_classes, batch_size, group_size, seed
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha

    def __call__(self, images, labels, epoch: int, batch_index: int, first_position: int, global_size: int):
        targets = F.one_hot(labels, self.num_classes).float()
        if global_size != self.batch_size or len(labels) == 0:
            return images, targets
        size, device = self.group_size, images.device
        cutmix, lam, centre = self._draws(epoch, batch_index, global_size // size, images.shape[2:])
        groups = slice(first_position // size, (first_position + len(labels)) // size)
        lam, centre = lam[groups], centre[groups]
        partner = torch.arange(len(labels), device=device).view(-1, size).roll(-1, dims=1).flatten()
        if cutmix:
            lam, low, high = _boxes(lam, centre, images.shape[2:])
            mask = _box_masks(_to_device(low, device), _to_device(high, device), images.shape[2:])
            images = torch.where(_per_sample(mask, size), images[partner], images)
        partner_share = _per_sample(_to_device((1 - lam).astype(np.float32), device), size)
        if not cutmix:
            images = images.lerp(images[partner], partner_share.view(-1, 1, 1, 1).to(images.dtype))
        return images, targets.lerp(targets[partner], partner_share.view(-1, 1))

    def _draws(self, epoch: int, batch_index: int, groups: int, image_size):
        """Whether the batch is cut-mixed, and every group's lambda and box centre (row, column) in the batch."""
        rng = np.random.default_rng([self.seed, epoch, batch_index, _SALT])
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = bool(rng.random() < 0.5)
        else:
            cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = rng.beta(alpha, alpha, size=groups)
        centre = np.stack([rng.integers(0, extent, size=groups) for extent in image_size], axis=1)
        return cutmix, lam, centre


def _boxes(lam: np.ndarray, centre: np.ndarray, image_size):
    """Per group, lambda corrected to the box pasted, and the box's first and last-but-one (row, column)
    (torchvision's CutMix: half-sides ``int(0.5 * sqrt(1 - lam) * side)`` around the centre, clipped)."""
    height, width = image_size
    half = np.floor(0.5 * np.sqrt(1.0 - lam)[:, None] * np.array([height, width])).astype(np.int64)
    low = np.clip(centre - half, 0, None)
    high = np.minimum(centre + half, [height, width])
    return 1.0 - (high - low).prod(axis=1) / (height * width), low, high


def _box_masks(low: torch.Tensor, high: torch.Tensor, image_size) -> torch.Tensor:
    """[groups, 1, H, W]: True inside each group's box, built on the boxes' device."""
    rows, columns = (torch.arange(extent, device=low.device) for extent in image_size)
    inside_rows = (rows >= low[:, :1]) & (rows < high[:, :1])
    inside_columns = (columns >= low[:, 1:]) & (columns < high[:, 1:])
    return (inside_rows[:, :, None] & inside_columns[:, None, :]).unsqueeze(1)


def _per_sample(per_group: torch.Tensor, size: int) -> torch.Tensor:
    """Each group's value repeated for its ``size`` samples (an expand: no host sync, unlike some repeats)."""
    return per_group.unsqueeze(1).expand(-1, size, *per_group.shape[1:]).flatten(0, 1)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A few per-batch numbers on the device without waiting for it: a plain copy to CUDA from pageable
    memory would synchronize the host with the GPU at every step; from pinned memory it is queued."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def build_mixing(cfg, world_size: int) -> BatchMixing | None:
    """The training batches' mixing from ``TRAIN.MIXUP_ALPHA`` / ``TRAIN.CUTMIX_ALPHA``; None when both are 0."""
    if cfg.TRAIN.MIXUP_ALPHA == 0 and cfg.TRAIN.CUTMIX_ALPHA == 0:
        return None
    share = cfg.TRAIN.BATCH_SIZE // world_size
    group_size = mixing_group_size(share)
    if group_size < 2:
        raise ConfigError(f"TRAIN.MIXUP_ALPHA / TRAIN.CUTMIX_ALPHA pair samples within groups of 2 to "
                          f"{MAX_GROUP_SIZE} of each process's share of the batch, and {share} "
                          f"(TRAIN.BATCH_SIZE {cfg.TRAIN.BATCH_SIZE} / {world_size} processes) has no such divisor; "
                          "use a TRAIN.BATCH_SIZE whose share per process is a multiple of 8")
    return BatchMixing(len(cfg.DATA.CLASSES), cfg.TRAIN.BATCH_SIZE, group_size, cfg.SEED,
                       mixup_alpha=cfg.TRAIN.MIXUP_ALPHA, cutmix_alpha=cfg.TRAIN.CUTMIX_ALPHA)
