"""Evaluation loop: loss, top-1 accuracy, per-class accuracy and the confusion matrix."""

import torch
import torch.nn.functional as F

from engine.distributed import all_reduce_sum, broadcast_buffers
from engine.precision import autocast_runs_on


@torch.no_grad()
def evaluate(model, batches, num_classes: int, device, amp: bool = False, amp_dtype=torch.float16) -> dict:
    """Evaluate ``model`` on every batch of ``batches`` (a batch source, no shuffling).

    Under DDP each rank evaluates its share and the sums (of loss and of the confusion matrix, so of
    correct and count) are added over ranks: the result equals a single process's exactly. Every rank first takes
    rank 0's buffers (``broadcast_buffers``): the ranks evaluate the model rank 0 saves.
    Sums stay on the device and are read once at the end. Returns ``loss`` (mean), ``acc1`` (a fraction),
    ``count`` and ``confusion`` (a CPU ``[true, predicted]`` int64 matrix).
    """
    broadcast_buffers(model)
    model.eval()
    device = torch.device(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for batch in batches.epoch(0):
        with torch.autocast(device.type, amp_dtype, enabled=amp and autocast_runs_on(device, amp_dtype)):
            logits = model(batch.images)
        loss_sum += F.cross_entropy(logits.float(), batch.labels, reduction="sum").double()
        predicted = logits.argmax(dim=1)
        confusion += torch.bincount(batch.labels * num_classes + predicted, minlength=num_classes**2)
    all_reduce_sum(loss_sum)
    all_reduce_sum(confusion)
    return summarize(loss_sum.cpu(), confusion.view(num_classes, num_classes).cpu())


def summarize(loss_sum: torch.Tensor, confusion: torch.Tensor) -> dict:
    count = int(confusion.sum())
    correct = int(confusion.diag().sum())
    return {
        "loss": float(loss_sum) / max(count, 1),
        "acc1": correct / max(count, 1),
        "count": count,
        "confusion": confusion,
    }


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    totals = confusion.sum(dim=1).clamp_min(1)
    return (confusion.diag().double() / totals).tolist()
