"""Figures logged to MLflow (rendered off-screen with matplotlib's Agg backend)."""

import torch


def confusion_matrix_figure(confusion: torch.Tensor, class_names):
    """A labelled confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.numpy()
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(counts, cmap="Blues")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    threshold = counts.max() / 2 if counts.size else 0
    for row in ticks:
        for column in ticks:
            axes.text(column, row, str(counts[row, column]), ha="center", va="center", fontsize=8,
                      color="white" if counts[row, column] > threshold else "black")
    axes.set_title(f"confusion matrix (accuracy {counts.trace() / max(counts.sum(), 1):.3f})")
    figure.tight_layout()
    plt.close(figure)  # keep pyplot's registry empty; the Figure object itself stays usable
    return figure


def per_class_accuracy_figure(accuracies, class_names, title: str):
    """Accuracy of each class as horizontal bars, the value written at the end of each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, max(2.5, 0.35 * len(class_names) + 1)))
    rows = range(len(class_names))
    axes.barh(rows, accuracies, color="tab:blue")
    axes.set_yticks(rows, labels=class_names)
    axes.invert_yaxis()  # first class on top, as in the table
    axes.set_xlim(0, 1.08)
    axes.set_xlabel("accuracy")
    for row, value in zip(rows, accuracies, strict=True):
        axes.text(min(value, 1.0) + 0.01, row, f"{value:.3f}", va="center", fontsize=8)
    axes.set_title(title)
    figure.tight_layout()
    plt.close(figure)
    return figure
