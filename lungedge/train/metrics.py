"""Classification metrics from a confusion matrix (NumPy only)."""

from __future__ import annotations

import numpy as np


def confusion(y_true, y_pred, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def summarize(y_true, y_pred, classes) -> dict:
    """Accuracy, balanced accuracy (mean sensitivity over classes present), per-class sensitivity and
    specificity, macro-F1 and the confusion matrix (rows: true class, columns: predicted)."""
    k = len(classes)
    cm = confusion(y_true, y_pred, k)
    support = cm.sum(axis=1)
    tp = np.diag(cm).astype(float)
    pred = cm.sum(axis=0)
    total = cm.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
        spec = np.where(total - support > 0, (total - support - (pred - tp)) / np.maximum(total - support, 1), np.nan)
        prec = np.where(pred > 0, tp / np.maximum(pred, 1), 0.0)
        f1 = np.where(prec + np.nan_to_num(sens) > 0, 2 * prec * np.nan_to_num(sens) / (prec + np.nan_to_num(sens)), 0.0)
    present = support > 0
    return {
        "n": int(total),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "balanced_accuracy": float(np.mean(sens[present])) if present.any() else 0.0,
        "macro_f1": float(np.mean(f1[present])) if present.any() else 0.0,
        "sensitivity": {c: (None if np.isnan(s) else float(s)) for c, s in zip(classes, sens)},
        "specificity": {c: (None if np.isnan(s) else float(s)) for c, s in zip(classes, spec)},
        "support": {c: int(n) for c, n in zip(classes, support)},
        "confusion_matrix": cm.tolist(),
    }


def class_weights(labels, k: int) -> np.ndarray:
    """Inverse-frequency weights n / (k * n_c), so every class weighs the same in the loss."""
    counts = np.bincount(np.asarray(labels, int), minlength=k).astype(float)
    w = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)
