"""Per-class accuracy in MLflow: one table over all evaluations of a split, and few figures.

``per_class_accuracy/<split>.json`` (an MLflow table: the run's Evaluation view, ``mlflow.load_table``) gains
one row per class at every evaluation: ``step``, ``class``, ``accuracy``, ``images``. During training the
figures are ``per_class_accuracy/val_latest.png`` and ``val_best.png`` (best ``val_acc1`` so far), replaced as
training goes, so the newest is found at once; a single evaluation (the test split, ``--eval-only``) has
``per_class_accuracy/<split>.png``.
"""

import math

from engine.evaluation import per_class_accuracy
from engine.figures import per_class_accuracy_figure
from engine.hooks import HookBase


def log_per_class_accuracy(tracker, class_names, split: str, results: dict, step: int, figures=()) -> None:
    """Append the evaluation's rows to the split's table; draw it into each artifact file of ``figures``."""
    accuracies = per_class_accuracy(results["confusion"])
    counts = results["confusion"].sum(dim=1).tolist()
    tracker.log_table({"step": [step] * len(class_names), "class": list(class_names), "accuracy": accuracies,
                       "images": counts}, f"per_class_accuracy/{split}.json")
    if figures:
        title = f"{split} accuracy per class at step {step} (overall {results['acc1']:.3f})"
        figure = per_class_accuracy_figure(accuracies, class_names, title)
        for name in figures:
            tracker.log_figure(figure, name)


class PerClassAccuracyReport(HookBase):
    """After each evaluation of the training (``trainer.latest_eval``, when fresh): the split's table and the
    latest figure, and the best figure when its accuracy is the best so far (kept across a resume)."""

    state_key = "per_class_accuracy"

    def __init__(self, tracker, class_names, split: str = "val"):
        self.tracker, self.class_names, self.split = tracker, list(class_names), split
        self.best = -math.inf

    def after_epoch(self):
        latest = self.trainer.latest_eval or {}
        confusion = latest.get(f"{self.split}_confusion")
        if confusion is None or latest.get("iteration") != self.trainer.iter:  # no evaluation at this epoch
            return
        accuracy = latest[f"{self.split}_acc1"]
        figures = [f"per_class_accuracy/{self.split}_latest.png"]
        if accuracy > self.best:
            self.best = accuracy
            figures.append(f"per_class_accuracy/{self.split}_best.png")
        log_per_class_accuracy(self.tracker, self.class_names, self.split, {"confusion": confusion, "acc1": accuracy},
                               self.trainer.iter, figures)

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]
