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
