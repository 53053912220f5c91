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


def nonfinite_rows(outputs: np.ndarray) -> int:
    """How many images have a NaN or infinite output (FP16 overflow, a broken layer)."""
    return int((~np.isfinite(outputs)).reshape(len(outputs), -1).any(axis=1).sum())


def prefetched(fn: Callable, items):
    """``fn(item)`` for each item in order, the next one computed on a background thread while the
    caller works on the current one (decode batch k+1 while batch k runs through the model). An
    exception from ``fn`` is raised where that item's result would have been yielded; a caller that
    stops early leaves at most one item being computed."""
    from concurrent.futures import ThreadPoolExecutor

    items = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="lungedge-prefetch") as pool:
        ahead = next((pool.submit(fn, it) for it in items), None)
        while ahead is not None:
            current = ahead
            ahead = next((pool.submit(fn, it) for it in items), None)
            yield current.result()
