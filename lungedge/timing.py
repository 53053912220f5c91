"""The one timing loop: warm-up calls first (never timed), then timed calls; and their percentiles."""

from __future__ import annotations

import time

import numpy as np


def time_calls(fn, warmup: int, iters: int | None, seconds: float | None, min_iters: int = 3) -> list[float]:
    """Seconds of each timed call of ``fn``: ``iters`` calls, or at least ``min_iters`` and ``seconds`` in all."""
    for _ in range(max(0, warmup)):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if iters is not None:
            if len(times) >= iters:
                break
        elif len(times) >= min_iters and time.perf_counter() - started >= (seconds or 0):
            break
    return times


TURNS = 5


def time_in_turns(fns, warmup: int, iters: int | None, seconds: float | None, turns: int = TURNS,
                  min_iters: int = 3) -> list[list[float]]:
    """Seconds of each timed call of each of ``fns``, timed in turns: a stretch of back-to-back calls of
    the first, then of the second, ..., round after round (about ``turns`` rounds). A burst of load on
    a shared machine then falls on all of them alike, so their ratio holds, while each stretch still
    times the steady state that a loop of one function times. Each gets ``iters`` calls, or at least
    ``min_iters`` and ``seconds`` of timed calls in all (as :func:`time_calls`); warm-up calls first."""
    for fn in fns:
        for _ in range(max(0, warmup)):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    per_turn = -(-iters // max(1, turns)) if iters is not None else None
    while True:
        for fn, ts in zip(fns, times):
            if per_turn is not None:
                ts += time_calls(fn, 0, min(per_turn, iters - len(ts)), None) if len(ts) < iters else []
            else:
                ts += time_calls(fn, 0, None, (seconds or 0) / max(1, turns), min_iters=1)
        if per_turn is not None:
            if all(len(ts) >= iters for ts in times):
                return times
        elif all(len(ts) >= min_iters and sum(ts) >= (seconds or 0) for ts in times):
            return times


def alternate(fns, repeats: int, warmup: int = 3) -> list[list[float]]:
    """Seconds of each of ``fns`` over ``repeats`` rounds of one call each (:func:`time_in_turns` with
    stretches of one call), warm-up rounds first; a burst of load hits all alike."""
    for _ in range(max(0, warmup)):
        for fn in fns:
            fn()
    return time_in_turns(fns, 0, repeats, None, turns=repeats)


def spread(values) -> float:
    """Interquartile range over median: the noise to read a median (or a ratio of medians) with."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.subtract(*np.percentile(v, [75, 25])) / np.median(v))


def latency_stats(seconds: list[float], batch: int) -> tuple[dict, float | None]:
    """(latency in ms: p50/p90/p99/mean/std/min/max, throughput in images/s from the mean)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": mean, "std": float(ms.std()),
            "min": float(ms.min()), "max": float(ms.max())}, (batch / (mean / 1e3) if mean > 0 else None)
