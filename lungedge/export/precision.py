"""Precision variants of an FP32 ONNX, through :mod:`lungedge.quantize`: FP16, and the two
calibrated INT8 forms (file names from :data:`lungedge.onnx_meta.VARIANTS`: ``int8`` is the
S8S8 file for TensorRT, ``int8-cpu`` the U8S8 file for ONNX Runtime on CPUs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .. import onnx_meta, quantize
from ..errors import LungedgeError
from . import metadata
from .source import Source

INT8_TARGETS = ("trt", "cpu")  # each INT8 file export writes, in this order


def variant_path(base: Path, variant: str) -> Path:
    """``engines/m/m`` + ``int8-cpu`` -> ``engines/m/m.int8-cpu.onnx``."""
    onnx_meta.variant_facts(variant)
    return Path(f"{base}.{variant}.onnx")


def write_fp16(fp32: Path, base: Path, source: Source) -> tuple[str, Path]:
    out = quantize.to_fp16(fp32, variant_path(base, "fp16"))
    metadata.restamp(out, source, "fp16")
    return "fp16", out


def graph_digest(path: Path) -> str:
    """SHA-256 of an ONNX file's graph (nodes, weights, inputs/outputs), its metadata left out."""
    import hashlib

    import onnx

    return hashlib.sha256(onnx.load(str(path)).graph.SerializeToString()).hexdigest()


@dataclass
class Calibration:
    manifest: dict  # quantize.calibration_manifest(...)
    folder: Path  # calibration/<key>/
    method: str
    batches: Callable[[], Iterator[np.ndarray]]  # a fresh pass over the calibration images

    def ranges(self, source: Source, fp32: Path) -> Path:
        """The ranges cache of this FP32 graph: keyed by the graph itself (weights included), not the source
        file, since one file gives other graphs under other options (--no-transform-input, --classes,
        --input-size, --output): ranges of one are wrong for another."""
        return self.folder / f"ranges.{source.architecture}-{graph_digest(fp32)[:12]}.json"

    def summary(self) -> dict:
        return {"folder": str(self.folder), "key": self.manifest["key"], "size": self.manifest["size"],
                "method": self.method}


def _calibration_split(source: Source, calib_data) -> dict:
    from ..data.split import make_split, read_manifest

    if calib_data and Path(calib_data).is_file():
        manifest = read_manifest(calib_data)
    elif calib_data:
        manifest = make_split(calib_data, val=0.0, test=0.0, group_by="none")
    elif source.split_path is not None:
        manifest = read_manifest(source.split_path)
    else:
        raise LungedgeError("--int8 needs calibration images: pass --calib-data DIR (or a split manifest)")
    if calib_data and source.split_fingerprint and manifest["dataset"]["fingerprint"] != source.split_fingerprint:
        raise LungedgeError(f"calibration set {calib_data} is from another data set than {source.path} was "
                            "trained on; calibrate on that data set (or omit --calib-data)")
    return manifest


def calibration(source: Source, calib_data, size: int, calib_root: Path, method: str, batch: int = 16) -> Calibration:
    """The class-stratified calibration set from the run's training split or --calib-data."""
    manifest = _calibration_split(source, calib_data)
    sample = quantize.calibration_sample(manifest["items"], manifest["classes"], size)
    cmeta = quantize.calibration_manifest(sample, method, source.preprocessing.to_dict(),
                                          manifest["dataset"]["fingerprint"])
    folder = quantize.calibration_folder(calib_root, cmeta)
    root = Path(manifest["dataset"]["root"])
    # equal batches: the histogram calibrators (entropy, percentile) stack them
    batch = max(d for d in range(1, min(batch, len(sample)) + 1) if len(sample) % d == 0)

    def batches():
        for i in range(0, len(sample), batch):
            yield source.preprocessing.load_batch([root / it["path"] for it in sample[i : i + batch]])

    return Calibration(cmeta, folder, method, batches)


def write_int8(fp32: Path, base: Path, source: Source, cal: Calibration, log=print) -> list[tuple[str, Path]]:
    """Both INT8 files; ranges are computed once and cached beside the calibration manifest."""
    ranges = cal.ranges(source, fp32)
    problem = quantize.ranges_problem(ranges) if ranges.is_file() else None
    if problem:  # a cache damaged on disk or by hand: derived data, computed again from the same images
        try:
            ranges.unlink()
        except OSError as exc:
            raise LungedgeError(f"calibration cache {ranges} cannot be used ({problem}) nor removed "
                                f"({exc.strerror}); remove it or pass another --calibration folder") from None
        log(f"note: calibration cache {ranges} could not be used ({problem}): calibrating again")
    written = []
    for target in INT8_TARGETS:
        variant = onnx_meta.variant_of("int8", target)
        reuse = ranges.is_file()
        q = quantize.to_int8(fp32, variant_path(base, variant), target, cal.method, ranges,
                             batches=None if reuse else cal.batches())
        metadata.restamp(q, source, "int8", int8_target=target, calibration=cal.manifest["key"])
        log(f"int8 ({target}) {q}: ranges {'reused from' if reuse else 'computed and saved to'} {ranges}")
        written.append((variant, q))
    if quantize.nncf_available():  # OpenVINO's own placement, from the same calibration images (#14)
        q = quantize.to_int8_nncf(fp32, variant_path(base, "int8-ov"), cal.batches, cal.manifest["size"])
        metadata.restamp(q, source, "int8", int8_target="ov", calibration=cal.manifest["key"])
        log(f"int8-ov {q}: NNCF's placement, for OpenVINO on CPUs")
        written.append(("int8-ov", q))
    else:
        log("note: NNCF is not installed: no int8-ov file (OpenVINO's INT8 placement); pip install nncf")
    return written
