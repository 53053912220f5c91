"""Classification metrics, from scikit-learn where it has them.

:func:`classification_metrics` is what ``eval`` reports for every backend and precision;
``lungedge.train.metrics.summarize`` and ``lungedge.export.compare.accuracy`` delegate here.
Rows of the confusion matrix are the true class, columns the predicted class.
"""

from __future__ import annotations

import warnings

import numpy as np


# why a per-class figure is None (undefined), as eval's table and the report say it
UNDEFINED = {"sensitivity": "no test images", "specificity": "no images of other classes",
             "precision": "never predicted"}


def _none_if_nan(v):
    v = float(v)
    return None if np.isnan(v) else v


def classification_metrics(y_true, y_pred, classes, scores=None) -> dict:
    """Accuracy, balanced accuracy, per-class sensitivity/specificity/precision/F1, macro-F1, support,
    the confusion matrix and, given ``scores`` (N x K probabilities or logits), one-vs-rest AUROC.

    Classes absent from ``y_true`` get ``None`` sensitivity (and AUROC) and are left out of the
    balanced accuracy and macro-F1, which average over the classes present: ``averaged_over`` names
    them and ``absent`` the others. A class never predicted has ``None`` precision (PPV = 0/0 is
    undefined, not 0); ``never_predicted`` names those classes.
    """
    from sklearn.metrics import (accuracy_score, confusion_matrix, multilabel_confusion_matrix,
                                 precision_recall_fscore_support)

    y_true = np.asarray(y_true, dtype=int).ravel()
    y_pred = np.asarray(y_pred, dtype=int).ravel()
    k = len(classes)
    labels = list(range(k))
    n = len(y_true)
    if n == 0:
        return {"n": 0, "accuracy": 0.0, "balanced_accuracy": 0.0, "macro_f1": 0.0,
                "sensitivity": {c: None for c in classes}, "specificity": {c: None for c in classes},
                "precision": {c: None for c in classes}, "f1": {c: None for c in classes},
                "support": {c: 0 for c in classes}, "confusion_matrix": [[0] * k for _ in range(k)],
                "averaged_over": [], "absent": list(classes), "never_predicted": list(classes),
                **({"auroc": {c: None for c in classes}, "macro_auroc": None} if scores is not None else {})}
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    mcm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)  # per class [[tn, fp], [fn, tp]]
    prec, sens, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = [i for i in labels if support[i] > 0]
    tn, fp = mcm[:, 0, 0], mcm[:, 0, 1]
    # balanced accuracy and macro-F1 over the classes present in y_true (sklearn's own averaging)
    _, sens_p, f1_p, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    out = {
        "n": int(n),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(np.mean(sens_p)) if present else 0.0,
        "macro_f1": float(np.mean(f1_p)) if present else 0.0,
        "sensitivity": {c: (float(sens[i]) if support[i] > 0 else None) for i, c in enumerate(classes)},
        "specificity": {c: (float(tn[i] / (tn[i] + fp[i])) if tn[i] + fp[i] > 0 else None)
                        for i, c in enumerate(classes)},
        # PPV = TP / (TP + FP): undefined (None), not 0, for a class the model never predicted
        "precision": {c: (float(prec[i]) if cm[:, i].sum() > 0 else None) for i, c in enumerate(classes)},
        "f1": {c: (float(f1[i]) if support[i] + cm[:, i].sum() > 0 else None) for i, c in enumerate(classes)},
        "support": {c: int(support[i]) for i, c in enumerate(classes)},
        "confusion_matrix": cm.astype(int).tolist(),
        "averaged_over": [classes[i] for i in present],  # the classes balanced accuracy and macro-F1 average
        "absent": [classes[i] for i in labels if support[i] == 0],  # no test image: sensitivity undefined
        "never_predicted": [classes[i] for i in labels if cm[:, i].sum() == 0],  # precision undefined
    }
    if scores is not None:
        out.update(auroc(y_true, scores, classes))
    return out


def auroc(y_true, scores, classes) -> dict:
    """One-vs-rest AUROC per class (None where a class has no positives or no negatives) and their mean."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true, dtype=int).ravel()
    scores = np.asarray(scores, dtype=np.float64)
    per = {}
    for i, c in enumerate(classes):
        pos = y_true == i
        if pos.all() or not pos.any():
            per[c] = None
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per[c] = _none_if_nan(roc_auc_score(pos.astype(int), scores[:, i]))
    vals = [v for v in per.values() if v is not None]
    return {"auroc": per, "macro_auroc": float(np.mean(vals)) if vals else None}


CALIBRATION_BINS = 10


def calibration_parts(y_true, probs, bins: int = CALIBRATION_BINS) -> dict:
    """Per-image pieces of :func:`calibration` (so that a bootstrap can reweight them): each image's
    Brier loss (sum over classes of (p_k - y_k)^2), whether its top class is
    right, its top probability and the equal-width bin that probability falls in (1.0 in the last)."""
    y = np.asarray(y_true, dtype=int).ravel()
    p = np.asarray(probs, dtype=np.float64)
    p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)  # FP16/INT8 softmax heads sum to 1 +- rounding
    brier = ((p - np.eye(p.shape[1])[y]) ** 2).sum(axis=1)  # its mean is sklearn's brier_score_loss (tested)
    conf = p.max(axis=1)
    return {"brier": brier, "correct": (p.argmax(axis=1) == y).astype(np.float64), "confidence": conf,
            "bin": np.minimum((conf * bins).astype(int), bins - 1), "bins": bins}


def calibration(y_true, probs, bins: int = CALIBRATION_BINS) -> dict:
    """Whether the predicted probabilities mean what they say (a clinician reads "Malignant 97 %" as
    a frequency). ``brier``: the multiclass Brier score, mean over images of sum_k (p_k - y_k)^2
    (0 perfect, 2 worst; equals scikit-learn's ``brier_score_loss``). ``ece``: the top-label expected
    calibration error (Guo et al. 2017): images binned by top probability into ``bins`` equal-width
    bins; the sum over bins of |right answers - summed confidence| in the bin, over N.
    ``mean_confidence`` and ``top1_accuracy``: confidence above accuracy is over-confidence.
    ``reliability``: per non-empty bin, its range, image count, mean confidence and accuracy (the
    reliability diagram)."""
    c = calibration_parts(y_true, probs, bins)
    n = len(c["brier"])
    if n == 0:
        return {"brier": None, "ece": None, "mean_confidence": None, "top1_accuracy": None, "bins": bins,
                "reliability": []}
    count = np.bincount(c["bin"], minlength=bins)
    right = np.bincount(c["bin"], weights=c["correct"], minlength=bins)
    conf = np.bincount(c["bin"], weights=c["confidence"], minlength=bins)
    rel = [{"range": [b / bins, (b + 1) / bins], "n": int(count[b]), "confidence": float(conf[b] / count[b]),
            "accuracy": float(right[b] / count[b])} for b in range(bins) if count[b]]
    return {"brier": float(c["brier"].mean()), "ece": float(np.abs(right - conf).sum() / n),
            "mean_confidence": float(c["confidence"].mean()), "top1_accuracy": float(c["correct"].mean()),
            "bins": bins, "reliability": rel}


def softmax(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def disagreement(reference_pred, other_pred) -> float:
    """Share of images whose predicted class differs from the reference (FP32) prediction."""
    a, b = np.asarray(reference_pred).ravel(), np.asarray(other_pred).ravel()
    return float(np.mean(a != b)) if len(a) else 0.0
