"""Run a model over an array in batches: the one helper eval, export parity and the trainers share."""

from __future__ import annotations

from typing import Callable

import numpy as np


def predict_in_batches(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 16,
                       width: int = 0) -> np.ndarray:
    """``fn`` over ``x[i:i+batch]``, concatenated (float32). ``width``: columns of the empty result."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    outs = [np.asarray(fn(x[i : i + batch]), dtype=np.float32) for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, width), np.float32)


def runner_logits(runner, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """Logits of an open runner over a preprocessed array, ``batch`` images a call."""
    return predict_in_batches(runner.infer, x, batch, len(runner.classes))
