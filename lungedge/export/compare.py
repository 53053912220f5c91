"""Parity: run two things on the same inputs and say how far apart they are (what Polygraphy's
``Comparator`` does). Export checks ONNX against the source framework and each reduced precision
against FP32 with it; eval and the GPU check compare runners the same way.

Each side is a callable ``float32 batch -> outputs`` (a source's ``run``, an ONNX Runtime
session, a runner's ``infer``); :func:`compare` feeds both the same batches, and
:func:`compare_outputs` measures: maximum absolute and relative error, top-1 agreement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..batching import nonfinite_rows, predict_in_batches

PARITY_MAX_REL = 1e-3  # the largest relative error export accepts between ONNX and its source

Run = Callable[[np.ndarray], np.ndarray]


def compare_outputs(reference: np.ndarray, other: np.ndarray, tie: float = PARITY_MAX_REL) -> dict:
    """Max absolute and relative (to the largest reference output) difference, and top-1 agreement.

    ``top1_agreement`` counts every image. ``top1_agreement_decisive`` leaves out images whose
    two best reference outputs are closer than ``tie`` x scale: a randomly initialised network
    can output near-equal logits, whose order any rounding flips. ``nonfinite``: images whose
    ``other`` output is NaN or infinite; they count as disagreeing and the errors are measured on the
    rest. A reference with such outputs is refused (ValueError): there is nothing to compare with.
    """
    if reference.shape != other.shape:
        raise ValueError(f"outputs of different shapes: {reference.shape} vs {other.shape}")
    bad = nonfinite_rows(reference)
    if bad:
        raise ValueError(f"the reference output is NaN or infinite on {bad} of {len(reference)} images")
    ok = np.isfinite(other).reshape(len(other), -1).all(axis=1)
    diff = np.abs(reference[ok] - other[ok])
    scale = max(float(np.abs(reference).max(initial=0.0)), 1e-12)
    agree = (reference.argmax(1) == other.argmax(1)) & ok
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    decisive = (top2[:, 1] - top2[:, 0]) > tie * scale
    return {"images": int(len(reference)), "max_abs": float(diff.max(initial=0.0)),
            "max_rel": float(diff.max(initial=0.0) / scale),
            "top1_agreement": float(agree.mean()) if len(agree) else 1.0,
            "top1_agreement_decisive": float(agree[decisive].mean()) if decisive.any() else 1.0,
            "decisive_images": int(decisive.sum()), "nonfinite": int((~ok).sum())}


def within(result: dict, max_rel: float = PARITY_MAX_REL) -> bool:
    """The export's pass mark: no NaN/inf output, every decisive image agrees and the relative error is small."""
    return (not result.get("nonfinite") and result["top1_agreement_decisive"] >= 1.0
            and result["max_rel"] <= max_rel)


def compare(reference: Run, other: Run, x: np.ndarray, batch: int = 16) -> dict:
    """Run both on ``x`` (in batches) and compare their outputs."""
    return compare_outputs(predict_in_batches(reference, x, batch), predict_in_batches(other, x, batch))


def onnx_cpu(path: str | Path) -> Run:
    """An ONNX file as a callable, on ONNX Runtime's CPU provider (the portable reference)."""
    import onnxruntime as ort

    from .. import onnx_meta

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {onnx_meta.INPUT_NAME: x})[0]


def run_onnx(path: str | Path, x: np.ndarray, batch: int = 16) -> np.ndarray:
    return predict_in_batches(onnx_cpu(path), x, batch)


def accuracy(outputs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Balanced accuracy and per-class sensitivity of outputs against labels (indices)."""
    from ..metrics import classification_metrics

    m = classification_metrics(labels, outputs.argmax(1), classes)
    return {"images": m["n"], "balanced_accuracy": m["balanced_accuracy"],
            "sensitivity": {c: (s or 0.0) for c, s in m["sensitivity"].items()}}
