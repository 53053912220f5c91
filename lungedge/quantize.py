"""Reduced precision decided in the ONNX, on any machine: FP16, and calibrated INT8 with Q/DQ.

Two INT8 forms, named for their target:

* ``trt``: symmetric QInt8 activations and weights (zero point 0), per-channel weights — the
  only form TensorRT accepts;
* ``cpu``: QUInt8 activations with QInt8 per-channel weights (U8S8), which ONNX Runtime runs
  much faster on x86 CPUs than the symmetric form.

Calibration streams: the model runs one image at a time with the activations the quantizer needs
as extra outputs, and only running minima/maxima and a fixed-width histogram of |x| per tensor are
kept, so memory does not grow with the number of calibration images (one image's activations at a
time, a few KB per tensor for the rest). Methods, from that one pass:

* ``minmax``: the observed range;
* ``entropy``: TensorRT's entropy calibration — a 2048-bin histogram of |x|, the clipping threshold
  that minimises the KL divergence between the histogram and its 128-level quantised copy;
* ``percentile``: |x| at the 99.99th percentile.

The ranges are cached as JSON (ONNX Runtime's calibration-cache format) beside the calibration
manifest under ``calibration/`` and reused when the same set is asked for; ONNX Runtime's
``quantize_static`` then places the Q/DQ nodes from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import LungedgeError
from .io import WriteError, atomic_write_bytes, shared_writers, temp_of, write_error, write_json

CALIB_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIB_METHOD = "minmax"  # measured on IQ-OTH/NCCD: see the README
CALIBRATOR = "lungedge-stream/2"  # part of the calibration key: ranges of older calibrators are not reused
HIST_BINS = 2048  # histogram bins over |x|, as TensorRT's entropy calibrator
QUANT_BINS = 128  # int8 levels on one side of zero
PERCENTILE = 99.99
CALIB_BATCH = 1  # images per forward pass while calibrating: one image's activations are all that is held
INT8_TARGETS = ("trt", "cpu")


def check_calib_method(method: str) -> str:
    if method not in CALIB_METHODS:
        raise LungedgeError(f"unknown --calib-method {method!r} (choose from {', '.join(CALIB_METHODS)})")
    return method


def check_calib_size(size) -> int:
    """``size`` if it is a whole number of calibration images, at least 1."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise LungedgeError(f"--calib-size must be at least 1, got {size}")
    return size


def calibration_sample(items: list[dict], classes: list[str], size: int, seed: int = 0) -> list[dict]:
    """A class-stratified sample of the training split: ``size`` items, classes in proportion.

    ``items`` are manifest entries (path, label, split, sha256). Deterministic for a seed; the
    sample is drawn by scikit-learn's stratified ``resample`` (a class below 1/``size`` of the
    training split may get none) and listed class by class (in ``classes`` order), each class in
    manifest order.
    """
    from sklearn.utils import resample

    check_calib_size(size)
    train = [it for it in items if it["split"] == "train"]
    if not train:
        raise LungedgeError("the split has no training images to calibrate on")
    picked = resample(range(len(train)), replace=False, n_samples=min(size, len(train)), random_state=seed,
                      stratify=[it["label"] for it in train])
    order = {c: k for k, c in enumerate(classes)}
    return [train[i] for i in sorted(picked, key=lambda i: (order.get(train[i]["label"], len(order)), i))]


def calibration_manifest(sample: list[dict], method: str, preprocessing: dict, dataset_fingerprint: str) -> dict:
    """What identifies a calibration set: its files (and their hash), method, size, preprocessing."""
    check_calib_method(method)
    listing = "".join(f"{it['path']}\t{it['sha256']}\n" for it in sample)
    files_hash = hashlib.sha256(listing.encode("utf-8")).hexdigest()
    key_src = json.dumps([files_hash, method, preprocessing, CALIBRATOR], sort_keys=True)
    return {
        "format": "lungedge-calibration/1",
        "key": hashlib.sha256(key_src.encode("utf-8")).hexdigest()[:16],
        "dataset_fingerprint": dataset_fingerprint,
        "method": method,
        "calibrator": CALIBRATOR,
        "size": len(sample),
        "files_sha256": files_hash,
        "preprocessing": preprocessing,
        "files": [{"path": it["path"], "label": it["label"], "sha256": it["sha256"]} for it in sample],
    }


def calibration_folder(root: str | Path, manifest: dict) -> Path:
    """calibration/<key>/: manifest.json, plus one ranges file per model and INT8 target. The temporaries an
    export killed while it wrote there left are removed (when no other export writes there)."""
    folder = Path(root) / manifest["key"]
    with shared_writers(folder, left_in_calibration):
        if not (folder / "manifest.json").is_file():
            write_json(folder / "manifest.json", manifest)
    return folder


def left_in_calibration(name: str) -> bool:
    """``name`` is a temporary that a writer of a calibration folder leaves when killed: ONNX Runtime's for a
    ranges cache (``.calibcache_XXXXXXXX.tmp``, mkstemp's; the folder is lungedge's own) or ours for the
    manifest or a ranges file (``.manifest.json.XXXXXXXX.tmp``)."""
    return bool(re.fullmatch(r"\.calibcache_[a-z0-9_]{8}\.tmp", name)) or temp_of(
        name, lambda final: final == "manifest.json" or (final.startswith("ranges.") and final.endswith(".json")))


# -- streaming calibration ------------------------------------------------------------------------------

def entropy_threshold(hist: np.ndarray, width: float, quant_bins: int = QUANT_BINS, start: int = QUANT_BINS) -> float:
    """TensorRT's entropy calibration on a histogram of |x| (bins of ``width`` from 0).

    For every candidate threshold ``i`` bins wide (``start`` .. all bins) the reference P is the
    histogram cut at ``i`` with the clipped mass added to its last bin, and Q is P's first ``i``
    bins merged into ``quant_bins`` levels and spread back over the non-empty bins; the threshold
    with the smallest KL(P || Q) wins (the largest one among ties). As NVIDIA's reference
    implementation (pytorch-quantization), the zero bin is set to its neighbour's count first, so
    the zeros a ReLU makes do not dominate. Vectorised over the candidates with prefix sums.
    """
    h = np.asarray(hist, np.float64).copy()
    n = h.size
    if n <= start:
        return float(n * width)
    h[0] = h[1]
    total = h.sum()
    if total <= 0:
        return float(n * width)
    c = np.concatenate([[0.0], np.cumsum(h)])
    nz = np.concatenate([[0], np.cumsum(h > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    hl = np.concatenate([[0.0], np.cumsum(hlogh)])

    cand = np.arange(start, n + 1)  # i: number of bins kept
    j = np.arange(quant_bins + 1)
    bounds = -((-j[None, :] * cand[:, None]) // quant_bins)  # first source bin of each level: ceil(j*i/q)
    sums = c[bounds[:, 1:]] - c[bounds[:, :-1]]
    counts = nz[bounds[:, 1:]] - nz[bounds[:, :-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)  # Q's value on a non-empty source bin
        p_log_q = np.where(sums > 0, sums * np.log(np.where(level > 0, level, 1.0)), 0.0).sum(1)
        outliers = total - c[cand]
        last = h[cand - 1] + outliers
        p_log_p = hl[cand - 1] + np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
        last_q = level[:, -1]  # the last source bin belongs to the last level
        p_log_q = p_log_q + np.where(outliers > 0, outliers * np.log(np.where(last_q > 0, last_q, 1.0)), 0.0)
        kl = p_log_p / total - np.log(total) - p_log_q / total + np.log(c[cand])
    kl[(outliers > 0) & (h[cand - 1] <= 0)] = np.inf  # clipped mass where Q is empty
    kl[~np.isfinite(kl)] = np.inf
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return float(cand[best] * width)


class RangeCollector:
    """Running min/max and a fixed-width histogram of |x| for each tensor, updated batch by batch.

    The histogram starts with ``HIST_BINS`` bins over the first batch's largest |x|; when a later
    batch goes further, bins of the same width are added, and once there are more than twice
    ``HIST_BINS`` neighbouring bins are summed in pairs (exact: the edges stay aligned). Memory is a
    few KB per tensor whatever the number of images.
    """

    def __init__(self, bins: int = HIST_BINS, histograms: bool = True):
        self.bins = bins
        self.histograms = histograms  # False: running min/max only (all ``minmax`` needs; much faster)
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}
        self.width: dict[str, float] = {}
        self.zeros: dict[str, int] = {}  # values seen while the histogram had no width yet (all zero)

    def update(self, name: str, arr: np.ndarray) -> None:
        a = np.asarray(arr)
        if a.size == 0:
            return
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        self.lo[name] = min(lo, self.lo.get(name, lo))
        self.hi[name] = max(hi, self.hi.get(name, hi))
        if not self.histograms:
            return
        mag = np.abs(a, dtype=np.float32).ravel()
        amax = max(abs(lo), abs(hi))
        if name not in self.hist:
            if amax == 0.0:
                self.zeros[name] = self.zeros.get(name, 0) + mag.size
                return
            self.width[name] = amax / self.bins
            self.hist[name] = np.zeros(self.bins, np.int64)
            self.hist[name][0] += self.zeros.pop(name, 0)
        width, hist = self.width[name], self.hist[name]
        need = int(amax / width) + 1
        if need > hist.size:
            hist = np.concatenate([hist, np.zeros(need - hist.size, np.int64)])
            while hist.size > 2 * self.bins:
                if hist.size % 2:
                    hist = np.append(hist, 0)
                hist = hist.reshape(-1, 2).sum(1)
                width *= 2
            self.width[name] = width
        idx = np.minimum((mag / np.float32(width)).astype(np.int64), hist.size - 1)
        hist += np.bincount(idx, minlength=hist.size)
        self.hist[name] = hist

    def names(self) -> list[str]:
        return sorted(self.lo)

    def range(self, name: str, method: str) -> tuple[float, float]:
        """(low, high) for ``method``; a clipping threshold t gives (max(low, -t), min(high, t))."""
        lo, hi = self.lo[name], self.hi[name]
        if method == "minmax" or name not in self.hist:
            if method != "minmax" and not self.histograms:
                raise LungedgeError(f"{method} calibration needs histograms (collected without them)")
            return lo, hi
        hist, width = self.hist[name], self.width[name]
        if method == "entropy":
            t = entropy_threshold(hist, width)
        elif method == "percentile":
            cum = np.cumsum(hist) / max(int(hist.sum()), 1)
            t = float((int(np.searchsorted(cum, PERCENTILE / 100.0)) + 1) * width)
        else:
            raise LungedgeError(f"unknown calibration method {method!r}")
        return max(lo, -t), min(hi, t)


def trim_memory() -> None:
    """Hand freed memory back to the system (a framework's model and conversion buffers, dropped
    before calibration): garbage-collect, then glibc's ``malloc_trim`` where there is one."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the memory stays reserved for this process, still reusable


def calibration_tensors(model) -> list[str]:
    """The tensors ONNX Runtime's quantizer may ask a range for: float inputs and outputs of every node
    (initializers excepted), as its own calibrators select them. ``model`` must carry value_info."""
    import onnx

    infos = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    inits = {i.name for i in model.graph.initializer}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    names = []
    for node in model.graph.node:
        for t in list(node.input) + list(node.output):
            vi = infos.get(t)
            if (vi is not None and t not in inits and t not in names and vi.type.HasField("tensor_type")
                    and vi.type.tensor_type.elem_type in floats):
                names.append(t)
    return names


def _with_shapes(onnx_path: str | Path):
    """The ONNX model with value_info (shape inference run if it has none)."""
    import onnx

    model = onnx.load(str(onnx_path))
    if not any(vi.name for vi in model.graph.value_info):
        model = onnx.shape_inference.infer_shapes(model)
    return model


def collect_ranges(onnx_path: str | Path, batches: Iterable[np.ndarray], methods=CALIB_METHODS,
                   sub_batch: int = CALIB_BATCH, threads: int | None = None) -> dict[str, dict[str, tuple]]:
    """One streaming pass: {method: {tensor: (low, high)}} for each of ``methods``.

    The model runs ``sub_batch`` images at a time with its activations as extra outputs; each
    output is folded into a :class:`RangeCollector` and dropped before the next run.
    """
    import onnxruntime as ort

    model = _with_shapes(onnx_path)
    names = calibration_tensors(model)
    infos = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.input)}
    existing = {o.name for o in model.graph.output}
    for t in names:
        if t not in existing and t in infos:
            model.graph.output.append(infos[t])
    input_name = model.graph.input[0].name
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False  # the arena would keep the largest batch's activations reserved
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del model
    fetch = [t for t in names if t != input_name]
    collector = RangeCollector(histograms=any(m != "minmax" for m in methods))
    seen = 0
    for batch in batches:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        for i in range(0, len(batch), sub_batch):
            chunk = batch[i : i + sub_batch]
            collector.update(input_name, chunk)
            outs = sess.run(fetch, {input_name: chunk})
            for t, arr in zip(fetch, outs):
                collector.update(t, arr)
            del outs
            seen += len(chunk)
    if not seen:
        raise LungedgeError("the calibration set gave no images")
    return {m: {t: collector.range(t, m) for t in collector.names()} for m in methods}


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def write_ranges(path: str | Path, ranges: dict[str, tuple], method: str) -> Path:
    """Ranges as ONNX Runtime's calibration cache (what ``quantize_static`` reads back)."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = {t: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            for t, (lo, hi) in ranges.items()}
    # ONNX Runtime writes through a temporary beside the file (.calibcache_XXXXXXXX.tmp) that a kill leaves: the
    # folder's writers' lock tells the next export that no one is writing it any more (calibration_folder)
    with shared_writers(Path(path).parent, left_in_calibration):
        save_tensors_data(TensorsData(_ort_method(method), data), Path(path))
    Path(path).chmod(0o644)
    return Path(path)


def read_ranges(path: str | Path) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization.calibrate import load_tensors_data

    return {t: (float(d.lowest), float(d.highest)) for t, d in load_tensors_data(Path(path)).items()}


def ranges_problem(path: str | Path, tensors: list[str] | None = None) -> str | None:
    """Why the ranges cache ``path`` cannot be used (truncated, not ONNX Runtime's format, empty, a range
    not finite or upside down, ``tensors`` it has no range for), or None."""
    try:
        ranges = read_ranges(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        return f"not a calibration cache ({type(exc).__name__}: {str(exc)[:80]})"
    if not ranges:
        return "it holds no ranges"
    bad = [t for t, (lo, hi) in ranges.items() if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi)]
    if bad:
        return f"{len(bad)} range(s) not finite or upside down, e.g. {bad[0]}: {ranges[bad[0]]}"
    missing = [t for t in tensors or () if t not in ranges]
    if missing:
        return f"no range for {len(missing)} tensor(s) of the model, e.g. {missing[0]}"
    return None


# -- FP16 ------------------------------------------------------------------------------------------------

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


# -- INT8 ------------------------------------------------------------------------------------------------

# TensorRT's placement: Q/DQ on the inputs (activations, per-channel weights) of the layers that
# compute in INT8, plus the residual input of an Add that follows one of them; nothing on Concat,
# pooling or activations, which TensorRT runs in the precision of their neighbours.
TRT_QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# what a DequantizeLinear may feed for TensorRT to fold it into an INT8 layer
TRT_FOLDS_INTO = TRT_QUANTIZED_OPS + ("Add",)


def _producers(model) -> dict[str, object]:
    return {o: n for n in model.graph.node for o in n.output}


def _float_inputs_outside_layers(model, prod: dict, inits: set) -> None:
    """ONNX Runtime hands one DQ to every consumer of a tensor: Concat, pooling and the like read the
    float tensor instead (TensorRT would otherwise quantize there too)."""
    for node in model.graph.node:
        if node.op_type in TRT_FOLDS_INTO:
            continue
        for k, t in enumerate(node.input):
            p = prod.get(t)
            if p is not None and p.op_type == "DequantizeLinear" and p.input[0] not in inits \
                    and p.input[0] in prod and prod[p.input[0]].op_type == "QuantizeLinear":
                node.input[k] = prod[p.input[0]].input[0]


def _residual_qdq(model, t: str, value_range: tuple, new_nodes: list) -> str:
    """A symmetric INT8 Q/DQ pair on tensor ``t`` (scale from its calibrated range), appended to
    ``new_nodes``; the DQ's output name."""
    from onnx import helper, numpy_helper

    lo, hi = value_range
    scale = max(abs(lo), abs(hi)) / 127.0 or 1.0
    s_name, z_name = f"{t}_residual_scale", f"{t}_residual_zero_point"
    model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s_name),
                                    numpy_helper.from_array(np.array(0, np.int8), z_name)])
    q_out, dq_out = f"{t}_residual_QuantizeLinear_Output", f"{t}_residual_DequantizeLinear_Output"
    new_nodes.append(helper.make_node("QuantizeLinear", [t, s_name, z_name], [q_out], name=f"{t}_residual_Q"))
    new_nodes.append(helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=f"{t}_residual_DQ"))
    return dq_out


def _add_residual_qdq(model, ranges: dict[str, tuple]) -> int:
    """TensorRT's placement on top of ONNX Runtime's Q/DQ of the layers' inputs: ops other than the
    layers (and Add) read float tensors, and the residual input of each Add that sums a quantized
    layer's output with another activation is quantized, so TensorRT fuses the Add into that layer
    (an existing DQ of the same tensor is reused: shared scale). Returns the number of Add inputs
    quantized."""
    import onnx

    prod = _producers(model)
    inits = {i.name for i in model.graph.initializer}
    dq_of = {}  # tensor -> output of a DQ that dequantizes its Q
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in prod and prod[n.input[0]].op_type == "QuantizeLinear":
            dq_of.setdefault(prod[n.input[0]].input[0], n.output[0])
    _float_inputs_outside_layers(model, prod, inits)
    new_nodes, done = [], 0
    for node in list(model.graph.node):
        if node.op_type != "Add" or len(node.input) != 2 or any(t in inits for t in node.input):
            continue
        srcs = [prod.get(t) for t in node.input]
        if any(s is None or s.op_type in ("DequantizeLinear", "Constant") for s in srcs):
            continue
        from_layer = [s.op_type in TRT_QUANTIZED_OPS for s in srcs]
        if not any(from_layer):
            continue
        k = 1 if from_layer[0] else 0  # the other input is the residual (the second when both are layers)
        t = node.input[k]
        if t in dq_of:
            node.input[k] = dq_of[t]
        else:
            if t not in ranges:
                continue
            dq_of[t] = node.input[k] = _residual_qdq(model, t, ranges[t], new_nodes)
        done += 1
    if new_nodes:
        model.graph.node.extend(new_nodes)
        from onnxruntime.transformers.onnx_model import OnnxModel

        OnnxModel(model).topological_sort()
    onnx.checker.check_model(model)
    return done


def trt_qdq_report(path_or_model) -> dict:
    """Structural check of an INT8 file for TensorRT.

    ``unquantized``: Conv/Gemm/MatMul nodes whose activation input or weight is not dequantized
    from INT8 (or whose Conv weight is not per channel); ``unfoldable``: Q/DQ pairs whose DQ feeds
    an op TensorRT cannot fold it into (Concat, pooling, activations, ...), i.e. extra
    quantize/dequantize work at run time, listed as ``"<DQ node> -> <op type> <node>"``.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path_or_model)) if isinstance(path_or_model, (str, Path)) else path_or_model
    prod = _producers(model)
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def dequantized(t):
        p = prod.get(t)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    unquantized = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        act, w = dequantized(n.input[0]), dequantized(n.input[1])
        ok = act is not None and w is not None
        if ok and n.op_type == "Conv":
            scale = inits.get(w.input[1])
            ok = scale is not None and numpy_helper.to_array(scale).size > 1
        if not ok:
            unquantized.append(f"{n.op_type} {n.name}")
    unfoldable = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] in inits:
            continue  # weight DQs are folded into the weights
        for c in consumers.get(n.output[0], []):
            if c.op_type not in TRT_FOLDS_INTO:
                unfoldable.append(f"{n.name} -> {c.op_type} {c.name}")
    return {"unquantized": unquantized, "unfoldable": unfoldable,
            "qdq_pairs": sum(n.op_type == "QuantizeLinear" for n in model.graph.node)}


def to_int8(onnx_in: str | Path, onnx_out: str | Path, target: str, method: str, ranges_cache: str | Path,
            batches: Iterable[np.ndarray] | None = None) -> Path:
    """Q/DQ INT8 ONNX for ``target``; ranges come from ``ranges_cache`` if present, else from ``batches``
    (one streaming pass, then cached)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if target not in INT8_TARGETS:
        raise LungedgeError(f"unknown INT8 target {target!r} (choose from {', '.join(INT8_TARGETS)})")
    check_calib_method(method)
    ranges_cache = Path(ranges_cache)
    if batches is None and not ranges_cache.is_file():
        raise LungedgeError("--int8 needs calibration data (--calib-data or a split manifest) the first time")
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
        if ranges_cache.is_file():
            problem = ranges_problem(ranges_cache, calibration_tensors(_with_shapes(pre)))
            if problem:
                raise LungedgeError(f"calibration cache {ranges_cache} cannot be used: {problem}; delete it to "
                                    "calibrate again")
        else:
            write_ranges(ranges_cache, collect_ranges(pre, batches, methods=(method,))[method], method)
        extra = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
        ops = None
        if symmetric:
            extra["QuantizeBias"] = False  # TensorRT takes float biases
            extra["OpTypesToExcludeOutputQuantization"] = list(TRT_QUANTIZED_OPS)  # Conv+ReLU stay fused
            ops = list(TRT_QUANTIZED_OPS)
        quantize_static(
            pre, tmp, None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=ops,
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=_ort_method(method),
            extra_options=extra,
            calibration_cache_path=str(ranges_cache),
        )
        if symmetric:
            model = onnx.load(tmp)
            _add_residual_qdq(model, read_ranges(ranges_cache))
            _save_model(model, Path(tmp))
        os.replace(tmp, out)
    except LungedgeError as exc:
        if isinstance(exc, WriteError):  # a temporary file's name is no use to the user: name the file made
            raise WriteError(str(exc).replace(pre, str(out)).replace(tmp, str(out))) from None
        raise
    except OSError as exc:  # ONNX Runtime's quantizer writes its intermediate files itself (no file named)
        raise write_error(out, exc) from None
    except Exception:
        # onnx's shape inference (C++) writes its copy of the model without checking the write: on a full disk
        # the quantizer then fails to parse a truncated file ("Wire format was corrupt")
        if _short_of_space(out.parent, onnx_in):
            raise WriteError(f"cannot write {out}: No space left on device") from None
        raise
    finally:
        root_logger.setLevel(level)
        Path(tmp).unlink(missing_ok=True)
        Path(pre).unlink(missing_ok=True)
        for left in out.parent.glob(f"{Path(pre).stem}-inferred*"):  # the quantizer's own copy, if it failed
            left.unlink(missing_ok=True)
    return out


def _short_of_space(folder: Path, model: str | Path) -> bool:
    """True when ``folder`` has less room left than a copy of ``model`` needs (the quantizer writes several)."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < 2 * os.path.getsize(model)
    except OSError:
        return False


# -- INT8 for OpenVINO: NNCF's placement ------------------------------------------------------------

def nncf_available() -> bool:
    """True where NNCF (the workstation install's OpenVINO quantizer) imports."""
    from .models.frameworks import installed

    return installed("nncf")


class _Images:
    """The calibration images one at a time, as NNCF feeds them (re-iterable: NNCF makes several passes)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for b in self.batches():
            for i in range(len(b)):
                yield {"input": b[i : i + 1]}


def to_int8_nncf(onnx_in: str | Path, onnx_out: str | Path, batches, size: int) -> Path:
    """Q/DQ INT8 ONNX by NNCF's post-training quantization (its ONNX backend: MinMax ranges where NNCF
    places Q/DQ for OpenVINO's CPU plugin, plus its fast bias correction) from the same calibration images
    as the other INT8 files; ``batches()`` gives a fresh pass over them, ``size`` is their number.
    OpenVINO runs this file as fast as NNCF's own OpenVINO model (issue #14: DenseNet121, where ONNX
    Runtime's placement costs OpenVINO half its speed)."""
    import onnx

    if not nncf_available():
        raise LungedgeError("the int8-ov file needs NNCF (pip install nncf; the workstation install has it)")
    import nncf

    nncf.set_log_level(logging.ERROR)
    # NNCF imports torch's C++ extension helper, which warns "No CUDA runtime is found" on every CPU machine
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    out = Path(onnx_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        q = nncf.quantize(onnx.load(str(onnx_in)), nncf.Dataset(_Images(batches)), subset_size=int(size))
    except Exception as exc:  # noqa: BLE001 - NNCF raises its own errors and those of ONNX Runtime
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LungedgeError(f"NNCF could not quantize {Path(onnx_in).name}: {first}") from None
    return _save_model(q, out)
