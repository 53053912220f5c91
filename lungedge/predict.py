"""Classify image files with any artifact: class and probabilities per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import LungedgeError
from .metrics import softmax
from .runners import open_runner


def predict(artifact, images, backend: str | None = None, device: str = "cpu", precision: str | None = None,
            threads: int | None = None, batch: int = 16) -> dict:
    """{"artifact", "backend", "classes", "predictions": [{"image", "class", "probabilities"}]}"""
    images = [Path(p) for p in images]
    if not images:
        raise LungedgeError("give at least one IMAGE")
    with open_runner(artifact, backend, device, precision, threads) as runner:
        preds = []
        for i in range(0, len(images), batch):
            chunk = images[i : i + batch]
            probs = softmax(runner.infer(runner.preprocessing.load_batch(chunk)))
            for path, p in zip(chunk, probs):
                k = int(np.argmax(p))
                preds.append({"image": str(path), "class": runner.classes[k],
                              "probabilities": {c: round(float(v), 6) for c, v in zip(runner.classes, p)}})
        return {"artifact": str(artifact), "model": runner.info.architecture, "backend": runner.backend,
                "device": runner.device, "precision": runner.variant, "classes": runner.classes,
                "predictions": preds}


def resolve_artifact(spec: str, backend=None, device="cpu", precision=None, runs="runs", engines="engines") -> Path:
    """An artifact path as given, or MODEL's first default target (source checkpoint, else FP32 ONNX)."""
    from .runners.discover import resolve

    if Path(spec).is_file():
        return Path(spec)
    targets = resolve([spec], device=device, backends=[backend] if backend else None,
                      precisions=[precision] if precision else None, runs=runs, engines=engines)
    return targets[0].artifact
