"""Temperature scaling (Guo et al. 2017): probabilities that mean what they say.

A network trained with cross-entropy is usually over-confident: of the images it calls at 90 %,
far fewer than 90 % are right (``eval``'s ECE and reliability diagram show it). One number T
divides the logits before the softmax; it is fitted on the validation images, the part of the
split that chose the best epoch and never the test part, to minimise their negative
log-likelihood. Dividing by T > 0 keeps the order of the logits, so no prediction, accuracy or
release gate changes; only the stated confidence does.

``export`` fits T with the FP32 ONNX on the run's validation part and writes it into every file's
metadata (``extra.temperature``); every runner applies it in
:func:`lungedge.runners.base.to_probabilities`. A checkpoint itself carries none (T = 1).
"""

from __future__ import annotations

import math

import numpy as np

BOUNDS = (0.25, 10.0)  # a fit at a bound says so; beyond them the validation set is the problem
MIN_IMAGES = 30  # fewer validation images than this: no temperature (one wrong image would set it)


def log_scores(scores: np.ndarray, kind: str) -> np.ndarray:
    """What the temperature divides: the logits, or the log of a model's own probabilities (the same
    thing up to a constant per image, which the softmax removes)."""
    s = np.asarray(scores, dtype=np.float64)
    return s if kind == "logits" else np.log(np.clip(s, 1e-300, None))


def scaled_log_probs(scores: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    from scipy.special import log_softmax

    return log_softmax(log_scores(scores, kind) / temperature, axis=1)


def fit(scores: np.ndarray, labels, kind: str = "logits") -> dict:
    """T minimising the mean negative log-likelihood of ``labels`` (bounded search over log T, SciPy):
    {"value", "nll_before", "nll_after", "images", "at_bound"}."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(labels, dtype=int)
    z = log_scores(scores, kind)  # once: the search then only divides
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-scaled_log_probs(z, "logits", math.exp(log_t))[rows, y].mean())

    lo, hi = (math.log(b) for b in BOUNDS)
    best = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    t = float(math.exp(best.x))
    return {"value": t, "nll_before": nll(0.0), "nll_after": float(best.fun), "images": int(len(y)),
            "at_bound": bool(min(abs(best.x - lo), abs(best.x - hi)) < 1e-3)}


def check(value, where: str) -> float:
    """A temperature read from a file: a finite number > 0, else a LungedgeError naming ``where``."""
    from .errors import LungedgeError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LungedgeError(f"{where}: temperature {value!r} is not a finite number above 0")
    return float(value)
