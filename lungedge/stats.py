"""Uncertainty for every figure: bootstrap over groups, paired comparisons and the release gate.

Images of one scan (IQ-OTH/NCCD) or augmented copies of one tile (LC25000) are not independent,
so intervals resample whole **groups** (the near-duplicate groups of the split manifest), never
single images. One bootstrap replicate draws G groups with replacement; each group then counts
as often as it was drawn. Because every metric here is a function of the confusion matrix, a
replicate's confusion matrix is the draw-weighted sum of the per-group confusion matrices, so a
thousand replicates cost one matrix product (the formulas are checked against scikit-learn in
the tests). Intervals are percentile intervals (2.5th and 97.5th percentile for 95%).

A reduced-precision model (FP16, INT8, BF16) is compared with FP32 on the *same* images: the
paired bootstrap resamples groups once and computes both models' metrics on that draw, so the
interval is that of the difference. McNemar's exact test (a binomial test on the discordant
pairs, from SciPy) asks whether the images one model gets right and the other wrong lean one way.
"""

from __future__ import annotations

import warnings

import numpy as np

from .errors import LungedgeError
from .gate_limits import MAX_BACC_DROP_POINTS, MAX_SENS_DROP_POINTS

N_BOOT = 1000
CONFIDENCE = 0.95
# release gate defaults: largest allowed drop, judged on the interval's lower bound
MAX_BACC_DROP = MAX_BACC_DROP_POINTS / 100
MAX_SENS_DROP = MAX_SENS_DROP_POINTS / 100


# -- metrics from (many) confusion matrices -----------------------------------------------------------

def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def metrics_from_confusion(cm: np.ndarray) -> dict:
    """Metrics of one or many confusion matrices (..., K, K; rows true, columns predicted).

    Returns arrays with the leading shape: accuracy, balanced_accuracy, macro_f1 and per class
    (last axis K) sensitivity, specificity, precision, f1. Classes never predicted get NaN precision;
    classes absent from the truth get NaN sensitivity and are left out of balanced accuracy and macro-F1, as in
    :func:`lungedge.metrics.classification_metrics`.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(-1)
    predicted = cm.sum(-2)
    n = cm.sum((-2, -1))
    fp, fn = predicted - tp, support - tp
    tn = n[..., None] - tp - fp - fn
    sens = _div(tp, support)
    spec = _div(tn, tn + fp)
    prec = _div(tp, predicted)  # NaN (undefined) for a class never predicted, as classification_metrics' None
    f1 = _div(2 * tp, 2 * tp + fp + fn)  # NaN for a class neither present nor predicted (0/0)
    present = support > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bacc = np.nanmean(np.where(present, sens, np.nan), axis=-1)
        mf1 = np.nanmean(np.where(present, f1, np.nan), axis=-1)
    return {"accuracy": _div(tp.sum(-1), n), "balanced_accuracy": bacc, "macro_f1": mf1,
            "sensitivity": sens, "specificity": spec, "precision": prec, "f1": f1}


def group_confusions(y_true, y_pred, groups, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(group ids, G x K x K confusion matrix of each group)."""
    y_true, y_pred = np.asarray(y_true, int).ravel(), np.asarray(y_pred, int).ravel()
    ids, g = np.unique(np.asarray(groups).ravel(), return_inverse=True)
    cms = np.zeros((len(ids), k, k), np.int64)
    np.add.at(cms, (g, y_true, y_pred), 1)
    return ids, cms


def group_draws(n_groups: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """B x G: how often each group is drawn in each replicate (G draws with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)


def _check(y_true, groups):
    if len(y_true) == 0:
        raise LungedgeError("no predictions to bootstrap")
    if groups is not None and len(groups) != len(y_true):
        raise LungedgeError(f"{len(groups)} group ids for {len(y_true)} predictions")


def _interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    a = (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo = np.nanpercentile(samples, 100 * a, axis=0)
        hi = np.nanpercentile(samples, 100 * (1 - a), axis=0)
    return lo, hi


def _num(v):
    v = float(v)
    return None if np.isnan(v) else v


def _pack(point: dict, lo: dict, hi: dict, classes) -> dict:
    out = {}
    for key in point:
        if np.ndim(point[key]) == 0:
            out[key] = [_num(lo[key]), _num(hi[key])]
        else:
            out[key] = {c: [_num(lo[key][i]), _num(hi[key][i])] if not np.isnan(point[key][i]) else None
                        for i, c in enumerate(classes)}
    return out


def bootstrap_metrics(y_true, y_pred, groups, classes, n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
                      seed: int = 0, scores=None, probs=None) -> dict:
    """95% (``confidence``) percentile intervals, by resampling whole groups, of every metric
    ``classification_metrics`` reports: {"accuracy": [lo, hi], "sensitivity": {class: [lo, hi]}, ...,
    "n_boot", "groups", "confidence"}. With ``scores`` (N x K), AUROC intervals as well; with ``probs``
    (N x K probabilities), the Brier score's and ECE's (:func:`lungedge.metrics.calibration`), from the
    same replicates. ``groups=None`` treats every image as its own group (the classic image bootstrap)."""
    y_true = np.asarray(y_true, int).ravel()
    _check(y_true, groups)
    by_image = groups is None
    groups = np.arange(len(y_true)) if by_image else np.asarray(groups)
    k = len(classes)
    ids, cms = group_confusions(y_true, y_pred, groups, k)
    draws = group_draws(len(ids), n_boot, seed)
    reps = metrics_from_confusion(np.tensordot(draws, cms, axes=(1, 0)))
    point = metrics_from_confusion(cms.sum(0))
    lo, hi = _interval_dict(reps, confidence)
    out = _pack(point, lo, hi, classes)
    out["exact_fallback"] = _exact_fallback(out, point, cms, classes, confidence)
    if scores is not None:
        out.update(_auroc_intervals(y_true, np.asarray(scores, float), groups, ids, draws, classes, confidence))
        out["auroc_n_boot"] = int(min(n_boot, AUROC_MAX_REPS))  # AUROC is costlier: fewer replicates, said
    if probs is not None:
        reps = calibration_replicates(y_true, probs, np.searchsorted(ids, groups), draws)
        out.update({key: [_num(v) for v in _interval(reps[key], confidence)] for key in reps})
    out.update({"n_boot": int(n_boot), "groups": int(len(ids)), "confidence": confidence,
                "method": ("percentile bootstrap over images (no near-duplicate groups known: pass --split)"
                           + (EXACT_NOTE.replace("each group", "each image") if out["exact_fallback"] else ""))
                if by_image else "percentile bootstrap over groups" + (EXACT_NOTE if out["exact_fallback"] else "")})
    return out


EXACT_NOTE = ("; an estimate of exactly 0 or 1 (where every replicate agrees and the bootstrap interval "
              "collapses to a point) gets the Clopper-Pearson exact interval counting each group once")


def clopper_pearson(x: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact binomial interval of x successes in n trials (0 <= x <= n, n >= 1)."""
    from scipy.stats import beta

    a = (1 - confidence) / 2
    lo = 0.0 if x == 0 else float(beta.ppf(a, x, n - x + 1))
    hi = 1.0 if x == n else float(beta.ppf(1 - a, x + 1, n - x))
    return lo, hi


def _exact_fallback(out: dict, point: dict, cms: np.ndarray, classes, confidence: float) -> list[str]:
    """A proportion estimated at exactly 0 or 1 (84 of 84 Malignant found, 0 of 63 Normal) has a percentile
    bootstrap interval of zero width: no replicate can differ. That is not certainty, so such a proportion
    (accuracy, a class's sensitivity, specificity or precision) gets the Clopper-Pearson interval of
    0 or n successes in n = the groups that hold its denominator's images (a conservative count: a group
    of near-duplicates is one observation); balanced accuracy at 0 or 1 the mean of its classes' bounds.
    Changes ``out`` in place; returns what it changed ("sensitivity Malignant", ...)."""
    support, predicted = cms.sum(-1) > 0, cms.sum(-2) > 0  # G x K: the group has images of / predictions for
    n_all = cms.shape[0]
    other = cms.sum((-2, -1))[:, None] - cms.sum(-1) > 0  # G x K: the group has images of another class
    denominators = {"sensitivity": support.sum(0), "specificity": other.sum(0), "precision": predicted.sum(0)}
    changed = []

    def exact(p: float, n: int):
        return list(clopper_pearson(int(round(p * n)), int(n), confidence))

    if float(point["accuracy"]) in (0.0, 1.0):
        out["accuracy"] = exact(float(point["accuracy"]), n_all)
        changed.append("accuracy")
    for key, n_groups in denominators.items():
        for i, c in enumerate(classes):
            p = float(point[key][i])
            if p in (0.0, 1.0) and n_groups[i] > 0:
                out[key][c] = exact(p, n_groups[i])
                changed.append(f"{key} {c}")
    b = float(point["balanced_accuracy"])
    if b in (0.0, 1.0):
        present = [c for i, c in enumerate(classes) if support[:, i].any()]
        if present:
            out["balanced_accuracy"] = [float(np.mean([out["sensitivity"][c][j] for c in present])) for j in (0, 1)]
            changed.append("balanced_accuracy")
    return changed


def calibration_replicates(y_true, probs, group_index, draws: np.ndarray) -> dict:
    """Brier score and ECE of every replicate (B values each): each image counts as often as its group
    (``group_index``, 0..G-1) was drawn in the replicate (``draws``, B x G), so a replicate is a few
    matrix products on per-group sums, like the confusion matrices above."""
    from .metrics import calibration_parts

    c = calibration_parts(y_true, probs)
    g, n_groups, bins = np.asarray(group_index), draws.shape[1], c["bins"]

    def per_group(v, width=1, at=0):  # G x width sums of v over each group's images (in bin ``at``)
        return np.bincount(g * width + at, weights=v, minlength=n_groups * width).reshape(n_groups, width)

    d = draws.astype(np.float64)
    n = d @ per_group(np.ones(len(g)))[:, 0]
    right = d @ per_group(c["correct"], bins, c["bin"])
    conf = d @ per_group(c["confidence"], bins, c["bin"])
    return {"brier": d @ per_group(c["brier"])[:, 0] / n, "ece": np.abs(right - conf).sum(1) / n}


def _interval_dict(reps: dict, confidence: float):
    lo, hi = {}, {}
    for key, v in reps.items():
        lo[key], hi[key] = _interval(v, confidence)
    return lo, hi


AUROC_MAX_REPS = 300


def _auroc_intervals(y, scores, groups, ids, draws, classes, confidence, max_reps: int = AUROC_MAX_REPS) -> dict:
    """One-vs-rest AUROC intervals: each replicate weights every image by its group's draw count
    (scikit-learn's ``sample_weight``). Capped at ``max_reps`` replicates (AUROC is costlier)."""
    from sklearn.metrics import roc_auc_score

    g = np.searchsorted(ids, groups)
    per = np.full((min(len(draws), max_reps), len(classes)), np.nan)
    for b, d in enumerate(draws[: len(per)]):
        w = d[g].astype(float)
        for i in range(len(classes)):
            pos = (y == i) & (w > 0)
            neg = (y != i) & (w > 0)
            if pos.any() and neg.any():
                per[b, i] = roc_auc_score((y == i).astype(int), scores[:, i], sample_weight=w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        macro = np.nanmean(per, axis=1)
    lo, hi = _interval(per, confidence)
    mlo, mhi = _interval(macro[:, None], confidence)
    return {"auroc": {c: ([_num(lo[i]), _num(hi[i])] if not np.isnan(lo[i]) else None) for i, c in enumerate(classes)},
            "macro_auroc": [_num(mlo[0]), _num(mhi[0])]}


# -- paired comparison and the release gate -----------------------------------------------------------

def mcnemar_exact(y_true, pred_ref, pred_new) -> dict:
    """McNemar's exact test on the images exactly one of the two models classifies correctly:
    b = reference right / new wrong, c = reference wrong / new right; two-sided binomial p-value
    of min(b, c) out of b + c at 1/2 (SciPy). Also counts ``flips``: images whose predicted class
    changed at all."""
    from scipy.stats import binomtest

    y, a, b_ = (np.asarray(v, int).ravel() for v in (y_true, pred_ref, pred_new))
    ref_ok, new_ok = a == y, b_ == y
    b = int(np.sum(ref_ok & ~new_ok))
    c = int(np.sum(~ref_ok & new_ok))
    p = 1.0 if b + c == 0 else float(binomtest(min(b, c), b + c, 0.5).pvalue)
    return {"ref_right_new_wrong": b, "ref_wrong_new_right": c, "flips": int(np.sum(a != b_)), "p_value": p,
            "test": "McNemar exact (binomial)"}


def paired_bootstrap(y_true, pred_ref, pred_new, groups, classes, n_boot: int = N_BOOT,
                     confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Change (new - reference) in balanced accuracy and in each class's sensitivity, with a paired
    percentile interval: both models are scored on the same group draw in every replicate."""
    y = np.asarray(y_true, int).ravel()
    _check(y, groups)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    k = len(classes)
    ids, cm_ref = group_confusions(y, pred_ref, groups, k)
    _, cm_new = group_confusions(y, pred_new, groups, k)
    draws = group_draws(len(ids), n_boot, seed)
    ref = metrics_from_confusion(np.tensordot(draws, cm_ref, axes=(1, 0)))
    new = metrics_from_confusion(np.tensordot(draws, cm_new, axes=(1, 0)))
    p_ref, p_new = metrics_from_confusion(cm_ref.sum(0)), metrics_from_confusion(cm_new.sum(0))
    out = {"n_boot": int(n_boot), "groups": int(len(ids)), "confidence": confidence}
    for key in ("balanced_accuracy", "accuracy", "macro_f1"):
        lo, hi = _interval(new[key] - ref[key], confidence)
        out[key] = {"delta": _num(p_new[key] - p_ref[key]), "ci": [_num(lo), _num(hi)]}
    lo, hi = _interval(new["sensitivity"] - ref["sensitivity"], confidence)
    d = p_new["sensitivity"] - p_ref["sensitivity"]
    out["sensitivity"] = {c: ({"delta": _num(d[i]), "ci": [_num(lo[i]), _num(hi[i])]} if not np.isnan(d[i]) else None)
                          for i, c in enumerate(classes)}
    return out


def check_gate_limits(max_bacc_drop: float, max_sens_drop: float) -> None:
    """Both allowed drops are fractions in [0, 1) (the CLIs take points: 1 = 0.01)."""
    for name, v in (("--max-bacc-drop", max_bacc_drop), ("--max-sens-drop", max_sens_drop)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise LungedgeError(f"{name} must be at least 0 and under 100 points, got {v * 100:g}"
                                if isinstance(v, (int, float)) and not isinstance(v, bool)
                                else f"{name} must be a number of points, got {v!r}")


def release_gate(y_true, pred_ref, pred_new, groups, classes, max_bacc_drop: float = MAX_BACC_DROP,
                 max_sens_drop: float = MAX_SENS_DROP, n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
                 seed: int = 0) -> dict:
    """Pass when the interval's lower bound of the change in balanced accuracy is >= -max_bacc_drop
    and that of every class's sensitivity >= -max_sens_drop (drops as fractions: 0.01 = 1 point)."""
    check_gate_limits(max_bacc_drop, max_sens_drop)
    paired = paired_bootstrap(y_true, pred_ref, pred_new, groups, classes, n_boot, confidence, seed)
    checks = []
    b = paired["balanced_accuracy"]
    checks.append({"metric": "balanced_accuracy", "delta": b["delta"], "lower": b["ci"][0], "limit": -max_bacc_drop,
                   "pass": b["ci"][0] is not None and b["ci"][0] >= -max_bacc_drop - 1e-12})
    not_checked = [c for c, s in paired["sensitivity"].items() if s is None]  # no test images of c
    for c, s in paired["sensitivity"].items():
        if s is None:
            continue
        checks.append({"metric": f"sensitivity {c}", "delta": s["delta"], "lower": s["ci"][0], "limit": -max_sens_drop,
                       "pass": s["ci"][0] is not None and s["ci"][0] >= -max_sens_drop - 1e-12})
    # what the bootstrap cannot say: with no (or few) changes its interval is [0, 0] on 2 images as on 2,000;
    # the exact bound says how large a share of groups could still lose a right answer
    y = np.asarray(y_true, int).ravel()
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    worse = (np.asarray(pred_ref).ravel() == y) & (np.asarray(pred_new).ravel() != y)
    n_groups, x = len(np.unique(g)), len(np.unique(g[worse]))
    evidence = {"images": int(len(y)), "groups": int(n_groups), "groups_worse": int(x),
                "worse_share_upper": clopper_pearson(x, n_groups, confidence)[1],
                "what": f"exact (Clopper-Pearson) {confidence:.0%} upper bound of the share of groups holding an "
                        "image FP32 gets right and the reduced precision wrong"}
    return {"pass": all(ch["pass"] for ch in checks), "checks": checks, "not_checked": not_checked, "paired": paired,
            "evidence": evidence, "mcnemar": mcnemar_exact(y_true, pred_ref, pred_new),
            "limits": {"max_balanced_accuracy_drop": max_bacc_drop, "max_sensitivity_drop": max_sens_drop,
                       "judged_on": f"lower bound of the {confidence:.0%} paired group-bootstrap interval"}}


def gate_line(gate: dict) -> str:
    """One line: PASS/FAIL and the worst check."""
    # the check closest to failing (smallest margin of its lower bound over its limit); a lower bound of exactly
    # 0 is a margin like any other, not a missing one
    worst = min(gate["checks"], key=lambda ch: (ch["pass"], (ch["lower"] if ch["lower"] is not None else -1)
                                                - ch["limit"]))
    m, ev = gate["mcnemar"], gate.get("evidence")
    return (f"{'PASS' if gate['pass'] else 'FAIL'}: {worst['metric']} change {worst['delta']:+.3f} "
            f"(lower bound {worst['lower']:+.3f}, limit {worst['limit']:+.3f}); {m['flips']} flips, "
            f"McNemar p={m['p_value']:.3g}"
            + (f"; on {ev['images']} images in {ev['groups']} groups, up to {ev['worse_share_upper']:.1%} of groups "
               f"could lose a right answer (exact 95% bound; {ev['groups_worse']} observed)" if ev else ""))


# -- across folds --------------------------------------------------------------------------------------

def mean_interval(values, confidence: float = CONFIDENCE, bounds: tuple[float, float] | None = None) -> dict:
    """Mean, sample standard deviation and the t-interval of the mean of per-fold values (NaN/None
    ignored). Folds share training data, so this interval is optimistic; the group bootstrap of the
    pooled out-of-fold predictions is reported beside it. ``bounds`` clips the interval (e.g. (0, 1))."""
    from scipy import stats as st

    v = np.array([np.nan if x is None else x for x in values], float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return {"mean": None, "std": None, "ci": [None, None], "n": 0}
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "std": None, "ci": [None, None], "n": 1}
    sd = float(v.std(ddof=1))
    half = float(st.t.ppf(0.5 + confidence / 2, len(v) - 1) * sd / np.sqrt(len(v)))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "std": sd, "ci": [lo, hi], "n": int(len(v))}


def pm(value, ci, digits: int = 3) -> str:
    """'0.812 [0.770, 0.851]': a point estimate and its interval (intervals are asymmetric, so no ±)."""
    if value is None:
        return "–"
    if not ci or ci[0] is None or ci[1] is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


# -- the gate as a later step reads it (bundle) ------------------------------------------------------

def gate_results(results, sha256: str) -> dict | None:
    """The newest release-gate verdict that ``eval`` wrote (JSON-lines under ``results``, a file or folder)
    for the artifact with this SHA-256: {"pass", "line", "file", "date"}; None when never evaluated."""
    import json
    from pathlib import Path

    root = Path(results)
    files = sorted(root.rglob("*.jsonl")) if root.is_dir() else ([root] if root.is_file() else [])
    found = None
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or row.get("kind") != "eval" or row.get("artifact_sha256") != sha256 \
                    or not row.get("gate"):
                continue
            date = str((row.get("provenance") or {}).get("date") or "")
            if found is None or date >= found["date"]:
                found = {"pass": bool(row["gate"]["pass"]), "line": gate_line(row["gate"]), "file": str(f),
                         "date": date}
    return found
