"""Shortcut check: could a trivial classifier tell the classes apart without looking at the anatomy?

Per image a handful of features that carry no anatomy: width, height, aspect ratio, non-square or not, file size per
pixel, mean and spread of the intensity, the mean of a thin border frame, and the share of
near-white pixels in the image and in its four corners (burned-in text, rulers and markers are
almost always saturated white). A logistic regression (scikit-learn, class-balanced) on those
features alone is cross-validated with grouped folds (``StratifiedGroupKFold`` over the
near-duplicate groups, so a scan never sits on both sides), and its balanced accuracy is set
against chance (1 / classes). When it beats chance by more than :data:`WARN_MARGIN`, a model can
score well by learning the shortcut: the check says so loudly and names the strongest feature
(single-feature classifiers, same folds).

On IQ-OTH/NCCD the image shape is such a shortcut: all ~60 non-square slices but one are
Malignant. lungedge's preprocessing centre-crops every image to a square so that the shape
itself never reaches the model, but what differs with the shape (another scanner, another
reconstruction) may still show in the pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import LungedgeError

FEATURES = ("width", "height", "aspect_ratio", "non_square", "bytes_per_pixel", "mean_intensity", "std_intensity",
            "border_mean", "bright_fraction", "corner_bright_fraction")
WARN_MARGIN = 0.15  # balanced accuracy above chance + this margin is a loud warning
BRIGHT = 250
SIDE = 256  # features are computed on the image resized to at most SIDE px on its long side


def image_features(path: Path) -> list[float]:
    """The anatomy-free features of one image file (see :data:`FEATURES`)."""
    from PIL import Image

    from ..preprocess import to_gray

    nbytes = Path(path).stat().st_size
    with Image.open(path) as img:
        w, h = img.size
        img.draft("L", (SIDE, SIDE))
        g = to_gray(img)  # 16-bit stretched, as the model sees it
        g.thumbnail((SIDE, SIDE))
        a = np.asarray(g, dtype=np.float32)
    bh, bw = max(1, a.shape[0] // 20), max(1, a.shape[1] // 20)
    frame = np.concatenate([a[:bh].ravel(), a[-bh:].ravel(), a[:, :bw].ravel(), a[:, -bw:].ravel()])
    ch, cw = max(1, a.shape[0] // 6), max(1, a.shape[1] // 6)
    corners = np.concatenate([a[:ch, :cw].ravel(), a[:ch, -cw:].ravel(), a[-ch:, :cw].ravel(), a[-ch:, -cw:].ravel()])
    return [float(w), float(h), w / h, float(w != h), nbytes / (w * h), float(a.mean()), float(a.std()), float(frame.mean()),
            float((a >= BRIGHT).mean()), float((corners >= BRIGHT).mean())]


def feature_matrix(paths, progress=None) -> np.ndarray:
    rows = []
    for p in paths:
        rows.append(image_features(p))
        if progress:
            progress()
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(FEATURES))


def grouped_balanced_accuracy(x: np.ndarray, y: np.ndarray, groups, folds: int = 5, seed: int = 0) -> float:
    """Balanced accuracy of a class-balanced logistic regression on ``x``, out of fold (grouped CV)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(folds, len(np.unique(groups)), int(np.bincount(y).max()))
    if folds < 2:
        raise LungedgeError("too few groups for a grouped cross-validation of the shortcut check")
    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = cross_val_predict(clf, x, y, groups=groups, cv=cv)
    return float(balanced_accuracy_score(y, pred))


def check(paths, labels, groups, classes, folds: int = 5, seed: int = 0, progress=None) -> dict:
    """Per-class feature summary and the trivial classifier's grouped balanced accuracy.

    Returns {"features", "per_class": {class: {feature: {"median", "mean"}, "non_square"}},
    "balanced_accuracy", "chance", "by_feature": {feature: balanced accuracy}, "strongest",
    "warning": str | None, "groups", "folds"}."""
    labels = list(labels)
    if len(labels) != len(paths) or len(groups) != len(paths):
        raise LungedgeError("paths, labels and groups differ in length")
    x = feature_matrix(paths, progress)
    present = [c for c in classes if c in labels]
    if len(present) < 2:
        raise LungedgeError("the shortcut check needs at least 2 classes with images")
    y = np.array([present.index(lbl) for lbl in labels])
    groups = np.asarray(groups)
    per_class = {}
    for i, c in enumerate(present):
        xc = x[y == i]
        per_class[c] = {f: {"median": float(np.median(xc[:, j])), "mean": float(xc[:, j].mean())}
                        for j, f in enumerate(FEATURES)}
        per_class[c]["images"] = int(len(xc))
        per_class[c]["non_square"] = int(np.sum(xc[:, 0] != xc[:, 1]))
    bacc = grouped_balanced_accuracy(x, y, groups, folds, seed)
    by_feature = {}
    for j, f in enumerate(FEATURES):
        by_feature[f] = grouped_balanced_accuracy(x[:, [j]], y, groups, folds, seed) if np.ptp(x[:, j]) > 0 \
            else 1.0 / len(present)
    strongest = max(by_feature, key=by_feature.get)
    chance = 1.0 / len(present)
    warning = None
    if bacc > chance + WARN_MARGIN:
        warning = (f"SHORTCUT RISK: a logistic regression on image size, shape and intensity statistics alone "
                   f"reaches a grouped balanced accuracy of {bacc:.2f} (chance {chance:.2f}); strongest single "
                   f"feature: {strongest} ({by_feature[strongest]:.2f}). A model can score by learning this "
                   f"instead of the anatomy: check its saliency maps and compare accuracy within one image size.")
    return {"features": list(FEATURES), "per_class": per_class, "balanced_accuracy": bacc, "chance": chance,
            "by_feature": by_feature, "strongest": strongest, "warning": warning, "groups": int(len(np.unique(groups))),
            "folds": int(min(folds, len(np.unique(groups)))), "warn_margin": WARN_MARGIN}


def table_rows(result: dict) -> list[list[str]]:
    """Rows: class, images, non-square, median width x height, aspect, mean intensity, border mean, bright %."""
    rows = []
    for c, d in result["per_class"].items():
        rows.append([c, d["images"], d["non_square"], f"{d['width']['median']:.0f}x{d['height']['median']:.0f}",
                     f"{d['aspect_ratio']['mean']:.3f}", f"{d['mean_intensity']['mean']:.1f}",
                     f"{d['border_mean']['mean']:.1f}", f"{100 * d['bright_fraction']['mean']:.2f}%",
                     f"{100 * d['corner_bright_fraction']['mean']:.2f}%"])
    return rows


TABLE_COLUMNS = ("class", "images", "non-square", "median size", "mean aspect", "mean intensity", "border mean",
                 "near-white px", "near-white corners")


def summary_line(result: dict) -> str:
    return (f"shortcut check: a logistic regression on size/shape/intensity features alone reaches grouped balanced "
            f"accuracy {result['balanced_accuracy']:.2f} (chance {result['chance']:.2f}, {result['folds']}-fold over "
            f"{result['groups']} groups); strongest feature {result['strongest']} "
            f"({result['by_feature'][result['strongest']]:.2f})")
