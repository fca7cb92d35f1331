"""The run's data as MLflow dataset inputs: a name, a digest over every image and label, the source and the
class counts of each split.

MLflow's own dataset classes hash only the first 10,000 values; two different splits of the same size would
look alike. The digest here reads everything, on a background thread (CIFAR-10's 150 MB take ~0.3 s; a folder
dataset is read file by file), so training does not wait for it.
"""

import hashlib
import json
import threading
from collections import Counter
from pathlib import Path

import torch

from ptengine.datasets import TensorSplit

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


class DatasetInputs(threading.Thread):
    """Describes every split and logs them as the run's inputs, on a background thread."""

    def __init__(self, tracker, cfg, splits):
        super().__init__(name="dataset-digest", daemon=True)
        self.tracker, self.cfg, self.splits = tracker, cfg, splits
        self.described: list[dict] = []

    def run(self) -> None:
        self.described = [describe_split(self.cfg, self.splits, name) for name in CONTEXTS
                          if getattr(self.splits, name) is not None]
        self.tracker.log_inputs(self.described)


def describe_split(cfg, splits, name: str) -> dict:
    split = getattr(splits, name)
    labels = split_labels(split)
    counts = Counter(labels)
    class_counts = {class_name: counts.get(index, 0) for index, class_name in enumerate(cfg.DATA.CLASSES)}
    source_type, source = _source(splits.source)
    return {
        "name": f"{cfg.DATA.DATASET_TYPE}-{name}",
        "digest": split_digest(split),
        "source_type": source_type,
        "source": json.dumps(source),
        "profile": json.dumps({"num_rows": len(labels), "class_counts": class_counts}),
        "context": CONTEXTS[name],
    }


def split_labels(split) -> list[int]:
    if isinstance(split, TensorSplit):
        return split.labels.tolist()
    if hasattr(split, "samples"):  # folder data: labels without decoding an image
        return [label for _, label in split.samples]
    return [int(split[index][1]) for index in range(len(split))]


def split_digest(split) -> str:
    """SHA-256 (first 16 hex digits) over every image and label of the split, in order."""
    digest = hashlib.sha256()
    if isinstance(split, TensorSplit):
        digest.update(split.images.contiguous().numpy().tobytes())
        digest.update(split.labels.numpy().tobytes())
    elif hasattr(split, "samples"):  # the files' bytes, not the decoded pixels: no decoding pass
        for path, label in split.samples:
            digest.update(Path(path).read_bytes())
            digest.update(str(label).encode())
    else:
        for index in range(len(split)):
            image, label = split[index]
            digest.update(torch.as_tensor(image).contiguous().numpy().tobytes())
            digest.update(str(int(label)).encode())
    return digest.hexdigest()[:16]


def _source(source: str) -> tuple[str, dict]:
    if source.startswith(("http://", "https://")):
        return "http", {"url": source}
    if source.startswith("/"):
        return "local", {"uri": source}
    return "code", {"tags": {"description": source}}
