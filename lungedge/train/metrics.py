"""Training-time metrics (summarize delegates to the scikit-learn based lungedge.metrics) and class weights."""

from __future__ import annotations

import numpy as np


def summarize(y_true, y_pred, classes) -> dict:
    """Accuracy, balanced accuracy (mean sensitivity over classes present), per-class sensitivity and
    specificity, macro-F1 and the confusion matrix (rows: true class, columns: predicted).

    Computed by scikit-learn through :func:`lungedge.metrics.classification_metrics`."""
    from ..metrics import classification_metrics

    m = classification_metrics(y_true, y_pred, classes)
    keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "sensitivity", "specificity", "support",
            "confusion_matrix")
    return {k: m[k] for k in keys}


def class_weights(labels, k: int) -> np.ndarray:
    """Inverse-frequency weights n / (k * n_c), so every class weighs the same in the loss."""
    counts = np.bincount(np.asarray(labels, int), minlength=k).astype(float)
    w = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)
