"""Reduced precision decided in the ONNX, on any machine: FP16, and calibrated INT8 with Q/DQ.

Two INT8 forms, named for their target:

* ``trt``: symmetric QInt8 activations and weights (zero point 0), per-channel weights — the
  only form TensorRT accepts;
* ``cpu``: QUInt8 activations with QInt8 per-channel weights (U8S8), which ONNX Runtime runs
  much faster on x86 CPUs than the symmetric form.

Calibration uses ``onnxruntime.quantization``; the computed ranges are cached as JSON beside
the calibration manifest under ``calibration/`` and reused when the same set is asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import LungedgeError
from .io import atomic_write_bytes, write_json

CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_TARGETS = ("trt", "cpu")


def check_calib_method(method: str) -> str:
    if method not in CALIB_METHODS:
        raise LungedgeError(f"unknown --calib-method {method!r} (choose from {', '.join(CALIB_METHODS)})")
    return method


def calibration_sample(items: list[dict], classes: list[str], size: int, seed: int = 0) -> list[dict]:
    """A class-stratified sample of the training split: ``size`` items, classes in proportion.

    ``items`` are manifest entries (path, label, split, sha256). Deterministic for a seed.
    """
    if size < 1:
        raise LungedgeError(f"--calib-size must be at least 1, got {size}")
    train = [it for it in items if it["split"] == "train"]
    if not train:
        raise LungedgeError("the split has no training images to calibrate on")
    size = min(size, len(train))
    rng = np.random.default_rng(seed)
    by_class = {c: [it for it in train if it["label"] == c] for c in classes}
    # largest-remainder apportionment, at least one image for every class that has any
    quotas = {c: len(v) * size / len(train) for c, v in by_class.items()}
    take = {c: min(len(by_class[c]), max(1 if by_class[c] else 0, int(q))) for c, q in quotas.items()}
    for c in sorted(quotas, key=lambda c: quotas[c] - int(quotas[c]), reverse=True):
        if sum(take.values()) >= size:
            break
        if take[c] < len(by_class[c]):
            take[c] += 1
    chosen = []
    for c in classes:
        pool = by_class[c]
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), take[c], replace=False))] if take[c] else []
    return chosen


def calibration_manifest(sample: list[dict], method: str, preprocessing: dict, dataset_fingerprint: str) -> dict:
    """What identifies a calibration set: its files (and their hash), method, size, preprocessing."""
    check_calib_method(method)
    listing = "".join(f"{it['path']}\t{it['sha256']}\n" for it in sample)
    files_hash = hashlib.sha256(listing.encode("utf-8")).hexdigest()
    key_src = json.dumps([files_hash, method, preprocessing], sort_keys=True)
    return {
        "format": "lungedge-calibration/1",
        "key": hashlib.sha256(key_src.encode("utf-8")).hexdigest()[:16],
        "dataset_fingerprint": dataset_fingerprint,
        "method": method,
        "size": len(sample),
        "files_sha256": files_hash,
        "preprocessing": preprocessing,
        "files": [{"path": it["path"], "label": it["label"], "sha256": it["sha256"]} for it in sample],
    }


def calibration_folder(root: str | Path, manifest: dict) -> Path:
    """calibration/<key>/: manifest.json, plus one ranges file per model and INT8 target."""
    folder = Path(root) / manifest["key"]
    if not (folder / "manifest.json").is_file():
        write_json(folder / "manifest.json", manifest)
    return folder


class ArrayReader:
    """Feeds batches of preprocessed images to ONNX Runtime's calibrator."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self._input = input_name
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {self._input: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self):  # the calibrator may ask; our iterator is single-pass
        raise LungedgeError("calibration data can only be read once")


def _save_model(model, out: Path) -> Path:
    return atomic_write_bytes(out, model.SerializeToString())


def to_fp16(onnx_in: str | Path, onnx_out: str | Path) -> Path:
    """FP16 weights and compute; graph inputs and outputs stay FP32 (keep_io_types)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(onnx_in))
    fp16 = OnnxModel(convert_float_to_float16(model, keep_io_types=True))
    fp16.topological_sort()  # the converter appends the input casts at the end of the graph
    onnx.checker.check_model(fp16.model)
    return _save_model(fp16.model, Path(onnx_out))


def to_int8(onnx_in: str | Path, onnx_out: str | Path, target: str, method: str, ranges_cache: str | Path,
            batches: Iterable[np.ndarray] | None = None) -> Path:
    """Q/DQ INT8 ONNX for ``target``; ranges come from ``ranges_cache`` if present, else from ``batches``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if target not in INT8_TARGETS:
        raise LungedgeError(f"unknown INT8 target {target!r} (choose from {', '.join(INT8_TARGETS)})")
    check_calib_method(method)
    ranges_cache = Path(ranges_cache)
    if batches is None and not ranges_cache.is_file():
        raise LungedgeError("--int8 needs calibration data (--calib-data or a split manifest) the first time")
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    input_name = onnx.load(str(onnx_in), load_external_data=False).graph.input[0].name
    reader = ArrayReader(input_name, batches) if batches is not None else None
    symmetric = target == "trt"
    out = Path(onnx_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.onnx", dir=out.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    ranges_cache.parent.mkdir(parents=True, exist_ok=True)
    pre = tmp + ".pre.onnx"
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # ORT's quantizer logs a warning per tensor on the root logger
    try:
        # shape inference and graph optimisation first, as ONNX Runtime recommends for quantisation
        quant_pre_process(str(onnx_in), pre, skip_symbolic_shape=True)
        quantize_static(
            pre, tmp, reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calib,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
            calibration_cache_path=str(ranges_cache),
        )
        os.replace(tmp, out)
        ranges_cache.chmod(0o644)
    finally:
        root_logger.setLevel(level)
        Path(tmp).unlink(missing_ok=True)
        Path(pre).unlink(missing_ok=True)
    return out
