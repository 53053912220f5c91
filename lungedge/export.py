"""Export a checkpoint to ONNX (FP32), FP16 and calibrated INT8, then (on the target) an engine.

``export(...)`` is the library entry point the CLI calls. Steps, each a small function:

1. :func:`load_source` — a lungedge checkpoint, or the group's own files: a Keras ``.h5`` saved
   with ``model.save()``, a ``.pth`` bare torchvision state dict (head size read from the
   weights), a whole pickled model only with ``trust_pickle``;
2. :func:`to_onnx` — FP32 ONNX with dynamic batch, input ``input``, output ``logits`` and the
   lungedge metadata, checked with ``onnx.checker``;
3. :func:`parity` — source framework vs ONNX Runtime on test images; fails below 100 % top-1
   agreement or above 1e-3 relative error;
4. FP16 / INT8 through :mod:`lungedge.quantize`, each measured against FP32;
5. the TensorRT engine through :mod:`lungedge.trt`, only where TensorRT and a GPU are present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import onnx_meta, quantize, trt
from .errors import LungedgeError
from .io import atomic_write_bytes, sha256_file, write_json
from .preprocess import Preprocessing

PARITY_MAX_REL = 1e-3
PARITY_IMAGES = 32


@dataclass
class Source:
    model: object
    framework: str  # "torch" | "keras"
    architecture: str
    classes: list[str]
    preprocessing: Preprocessing
    path: Path
    sha256: str
    split_path: Path | None = None
    split_fingerprint: str | None = None
    notes: list[str] = field(default_factory=list)


# -- 1. the source checkpoint -------------------------------------------------------------------------

def resolve_checkpoint(model_name: str, checkpoint: str | Path | None, runs: str | Path = "runs") -> Path:
    """``checkpoint`` if given, else the best checkpoint of MODEL's latest run under ``runs``."""
    from .models.registry import get_spec

    spec = get_spec(model_name)
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise LungedgeError(f"checkpoint not found: {path}")
        return path
    suffix = ".h5" if spec.framework == "keras" else ".pth"
    found = sorted(Path(runs, model_name).glob(f"*/best{suffix}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise LungedgeError(f"no trained {model_name} under {Path(runs, model_name)}; train one with "
                            f"'lungedge train {model_name} --data DIR' or pass --checkpoint PATH")
    return found[-1]


def run_split(path: Path) -> Path | None:
    """The split manifest a training run used (its run folder's split.json or config's --split)."""
    if (path.parent / "split.json").is_file():
        return path.parent / "split.json"
    try:
        split = json.loads((path.parent / "config.json").read_text()).get("split")
    except (OSError, ValueError):
        return None
    return Path(split) if split and Path(split).is_file() else None


def _class_names(classes: str | None, data: str | Path | None, path: Path) -> list[str]:
    if classes:
        names = [c.strip() for c in classes.split(",") if c.strip()]
        if len(names) < 2:
            raise LungedgeError(f"--classes needs at least 2 comma-separated names, got {classes!r}")
        return names
    if data:
        from .data.layout import detect_layout

        return detect_layout(data).classes
    raise LungedgeError(f"{path} carries no class names; give --classes A,B,C (in output order) or --data DIR")


def _first_outputs(model, k: int):
    """Wrap a torch model whose head has more outputs than labelled classes: keep the first k."""
    import torch

    class FirstOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x)[:, :k]

    return FirstOutputs().eval()


def _foreign_torch(path: Path, spec, classes, data, trust_pickle: bool) -> Source:
    import pickle

    import torch

    notes = []
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        if "weights_only" not in str(exc) and not isinstance(exc, pickle.UnpicklingError):
            raise LungedgeError(f"{path} is not a readable .pth file ({str(exc).splitlines()[0][:120]})") from None
        if not trust_pickle:
            raise LungedgeError(f"{path} holds a whole pickled model, which runs code when loaded; refusing it. "
                                "If you trust its origin, pass --trust-pickle") from None
        payload = torch.load(str(path), map_location="cpu", weights_only=False)
        notes.append("loaded a whole pickled model (--trust-pickle)")
    if isinstance(payload, torch.nn.Module):
        model = payload.eval()
        out_features = None
    elif isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        head_key = f"{spec.head}.weight"
        if head_key not in payload:
            raise LungedgeError(f"{path} is not a {spec.name} state dict (no {head_key})")
        out_features = int(payload[head_key].shape[0])
        from .models.registry import create

        model = create(spec.name, num_classes=out_features, weights="none", mode="full")
        state = {k.removeprefix("module."): v for k, v in payload.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if [k for k in missing if "num_batches_tracked" not in k] or unexpected:
            raise LungedgeError(f"{path} does not fit {spec.name}: {len(missing)} missing and "
                                f"{len(unexpected)} unexpected tensors")
        model.eval()
    else:
        raise LungedgeError(f"{path} is neither a lungedge checkpoint nor a plain state dict of tensors")
    names = _class_names(classes, data, path)
    if out_features is not None and out_features != len(names):
        if out_features < len(names):
            raise LungedgeError(f"{path} has {out_features} outputs but {len(names)} class names were given")
        notes.append(f"the head has {out_features} outputs; exporting the first {len(names)}, labelled {', '.join(names)}")
        model = _first_outputs(model, len(names))
    return Source(model, "torch", spec.name, names, spec.preprocessing, path, sha256_file(path), notes=notes)


def _foreign_keras(path: Path, spec, classes, data) -> Source:
    from .models.registry import import_keras

    keras = import_keras()
    try:
        model = keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001
        raise LungedgeError(f"{path}: cannot load the Keras model ({str(exc).splitlines()[0][:160]})") from None
    names = _class_names(classes, data, path)
    outputs = int(model.output_shape[-1])
    if outputs != len(names):
        raise LungedgeError(f"{path} has {outputs} outputs but {len(names)} class names")
    size = model.input_shape[1] or spec.native_size
    return Source(model, "keras", spec.name, names, spec.preprocessing_for(size), path, sha256_file(path),
                  notes=[f"{path.name} carries no lungedge metadata; classes {', '.join(names)}"])


def load_source(path: str | Path, model_name: str, classes: str | None = None, data: str | Path | None = None,
                trust_pickle: bool = False) -> Source:
    from .models.checkpoint import load_checkpoint, read_meta
    from .models.registry import get_spec, import_torch_first

    import_torch_first()
    spec = get_spec(model_name)
    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if (spec.framework == "keras") != (suffix in (".h5", ".hdf5", ".keras")):
        raise LungedgeError(f"{path} is not a {spec.framework} checkpoint, which {spec.name} needs")
    try:
        meta = read_meta(path)
    except LungedgeError:
        meta = None  # not a lungedge checkpoint: the group's own file?
    if meta is None or meta.get("format") is None:
        if spec.framework == "keras":
            return _foreign_keras(path, spec, classes, data)
        return _foreign_torch(path, spec, classes, data, trust_pickle)
    if meta["architecture"] != spec.name:
        raise LungedgeError(f"{path} is a checkpoint of {meta['architecture']}, not {spec.name}")
    model, meta = load_checkpoint(path)
    return Source(model, spec.framework, spec.name, list(meta["classes"]),
                  Preprocessing.from_dict(meta["preprocessing"]), path, meta["checkpoint_sha256"],
                  split_path=run_split(path), split_fingerprint=meta.get("split_fingerprint"))


# -- 2. FP32 ONNX -------------------------------------------------------------------------------------

def run_source(source: Source, x: np.ndarray) -> np.ndarray:
    if source.framework == "keras":
        return np.asarray(source.model(x, training=False), dtype=np.float32)
    import torch

    with torch.no_grad():
        return source.model(torch.from_numpy(x)).float().numpy()


def to_onnx(source: Source, out: Path, opset: int = 17) -> Path:
    """FP32 ONNX, dynamic batch, one self-contained file, lungedge metadata, checker-clean."""
    import onnx

    shape = source.preprocessing.input_shape
    if source.framework == "keras":
        import tensorflow as tf
        import tf2onnx

        spec = (tf.TensorSpec((None, *shape), tf.float32, name=onnx_meta.INPUT_NAME),)
        model, _ = tf2onnx.convert.from_keras(source.model, input_signature=spec, opset=opset)
        old = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = [onnx_meta.OUTPUT_NAME if o == old else o for o in node.output]
        model.graph.output[0].name = onnx_meta.OUTPUT_NAME
    else:
        import io

        import torch

        buf = io.BytesIO()
        torch.onnx.export(source.model, torch.zeros(1, *shape), buf, input_names=[onnx_meta.INPUT_NAME],
                          output_names=[onnx_meta.OUTPUT_NAME], opset_version=opset, dynamo=False,
                          dynamic_axes={onnx_meta.INPUT_NAME: {0: "batch"}, onnx_meta.OUTPUT_NAME: {0: "batch"}})
        model = onnx.load_from_string(buf.getvalue())
    onnx_meta.attach(model, _metadata(source, "fp32"))
    onnx.checker.check_model(model)
    return atomic_write_bytes(out, model.SerializeToString())


def _metadata(source: Source, precision: str, **extra) -> dict:
    return onnx_meta.make_metadata(source.architecture, source.framework, source.classes, source.preprocessing,
                                   precision, source.sha256, **extra)


def restamp(path: Path, source: Source, precision: str, **extra) -> None:
    """Re-write a derived ONNX's metadata for its own precision."""
    import onnx

    model = onnx.load(str(path))
    onnx_meta.attach(model, _metadata(source, precision, **extra))
    atomic_write_bytes(path, model.SerializeToString())


# -- 3. parity and accuracy -----------------------------------------------------------------------------

def run_onnx(path: Path, x: np.ndarray, batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {onnx_meta.INPUT_NAME: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


def parity(reference: np.ndarray, other: np.ndarray, tie: float = PARITY_MAX_REL) -> dict:
    """Max absolute and relative (to the largest reference logit) difference, and top-1 agreement.

    ``top1_agreement`` counts every image. ``top1_agreement_decisive`` leaves out images whose
    two best reference logits are closer than ``tie`` x scale: a randomly initialised network
    can output near-equal logits, whose order any rounding flips.
    """
    diff = np.abs(reference - other)
    scale = max(float(np.abs(reference).max()), 1e-12)
    agree = reference.argmax(1) == other.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    decisive = (top2[:, 1] - top2[:, 0]) > tie * scale
    return {"images": int(len(reference)), "max_abs": float(diff.max()), "max_rel": float(diff.max() / scale),
            "top1_agreement": float(agree.mean()),
            "top1_agreement_decisive": float(agree[decisive].mean()) if decisive.any() else 1.0,
            "decisive_images": int(decisive.sum())}


def accuracy(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    from .metrics import classification_metrics

    m = classification_metrics(labels, logits.argmax(1), classes)
    return {"images": m["n"], "balanced_accuracy": m["balanced_accuracy"],
            "sensitivity": {c: (s or 0.0) for c, s in m["sensitivity"].items()}}


@dataclass
class EvalSet:
    x: np.ndarray
    y: np.ndarray | None
    where: str

    def head(self, n: int) -> "EvalSet":
        """The first ``n`` images (what ``evaluation_set(..., limit=n)`` would load)."""
        if len(self.x) <= n:
            return self
        where = f"first {n} of {self.where}"
        return EvalSet(self.x[:n], None if self.y is None else self.y[:n], where)


def evaluation_set(source: Source, data: str | Path | None, limit: int | None = None, seed: int = 0) -> EvalSet:
    """Test images of the run's split, else images of --data, else random inputs (said so)."""
    prep = source.preprocessing
    if source.split_path is not None:
        from .data.split import read_manifest

        manifest = read_manifest(source.split_path)
        root = Path(data) if data else Path(manifest["dataset"]["root"])
        items = [it for it in manifest["items"] if it["split"] == "test"]
        if items and all((root / it["path"]).is_file() for it in items):
            items = items[:limit] if limit else items
            x = prep.load_batch([root / it["path"] for it in items])
            y = np.array([source.classes.index(it["label"]) for it in items])
            return EvalSet(x, y, f"{len(items)} test images of {source.split_path}")
    if data:
        from .data.layout import detect_layout

        layout = detect_layout(data)
        files = layout.files[:: max(1, len(layout.files) // (limit or PARITY_IMAGES))][: limit or PARITY_IMAGES]
        x = prep.load_batch([layout.root / f.path for f in files])
        y = np.array([source.classes.index(f.label) if f.label in source.classes else -1 for f in files])
        return EvalSet(x, y if (y >= 0).all() else None, f"{len(files)} images of {layout.root}")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(limit or PARITY_IMAGES, *prep.input_shape)).astype(np.float32)
    return EvalSet(x, None, f"{len(x)} random inputs (no test images known: pass --data DIR)")


def calibration_batches(source: Source, calib_data: str | Path | None, size: int, calib_root: Path, method: str,
                        batch: int = 16):
    """(calibration manifest, folder, batches) from the split's training part or --calib-data."""
    from .data.split import read_manifest

    if calib_data and Path(calib_data).is_file():
        manifest = read_manifest(calib_data)
    elif calib_data:
        from .data.split import make_split

        manifest = make_split(calib_data, val=0.0, test=0.0, group_by="none")
    elif source.split_path is not None:
        manifest = read_manifest(source.split_path)
    else:
        raise LungedgeError("--int8 needs calibration images: pass --calib-data DIR (or a split manifest)")
    fp = manifest["dataset"]["fingerprint"]
    if calib_data and source.split_fingerprint and fp != source.split_fingerprint:
        raise LungedgeError(f"calibration set {calib_data} is from another data set than {source.path} was "
                            "trained on; calibrate on that data set (or omit --calib-data)")
    sample = quantize.calibration_sample(manifest["items"], manifest["classes"], size)
    cmeta = quantize.calibration_manifest(sample, method, source.preprocessing.to_dict(), fp)
    folder = quantize.calibration_folder(calib_root, cmeta)
    root = Path(manifest["dataset"]["root"])

    # equal batches: the histogram calibrators (entropy, percentile) stack them
    batch = max(d for d in range(1, min(batch, len(sample)) + 1) if len(sample) % d == 0)

    def batches():
        for i in range(0, len(sample), batch):
            yield source.preprocessing.load_batch([root / it["path"] for it in sample[i : i + batch]])

    return cmeta, folder, batches


# -- the whole export ----------------------------------------------------------------------------------

def export(model_name: str, checkpoint=None, fp16: bool = False, int8: bool = False, calib_data=None,
           calib_size: int = 300, calib_method: str = "entropy", max_batch: int = 8, opset: int = 17,
           engine: bool | None = None, out="engines", runs="runs", calibration="calibration",
           classes: str | None = None, data=None, trust_pickle: bool = False, log=print) -> dict:
    """Export MODEL; returns the summary that is also written as ``<model>.export.json``."""
    quantize.check_calib_method(calib_method)  # before any work
    if max_batch < 1:
        raise LungedgeError(f"--max-batch must be at least 1, got {max_batch}")
    path = resolve_checkpoint(model_name, checkpoint, runs)
    source = load_source(path, model_name, classes=classes, data=data, trust_pickle=trust_pickle)
    for note in source.notes:
        log(f"note: {note}")
    folder = Path(out) / source.architecture
    base = folder / source.architecture
    summary = {"model": source.architecture, "checkpoint": str(path), "checkpoint_sha256": source.sha256,
               "classes": source.classes, "notes": list(source.notes), "files": {}, "parity": {}, "accuracy": {}}

    fp32 = to_onnx(source, Path(f"{base}.fp32.onnx"), opset)
    summary["files"]["fp32"] = str(fp32)
    # the whole test part when other precisions are compared, its first images for parity
    test = evaluation_set(source, data) if (fp16 or int8) else None
    check = test.head(PARITY_IMAGES) if test is not None else evaluation_set(source, data, limit=PARITY_IMAGES)
    summary["parity_images"] = check.where
    p = parity(run_source(source, check.x), run_onnx(fp32, check.x))
    summary["parity"]["fp32_vs_source"] = p
    log(f"fp32 ONNX {fp32}: top-1 agreement {p['top1_agreement']:.1%}, max rel error {p['max_rel']:.2e} "
        f"on {check.where}")
    if p["top1_agreement_decisive"] < 1.0 or p["max_rel"] > PARITY_MAX_REL:
        write_json(f"{base}.export.json", summary)
        raise LungedgeError(f"ONNX export of {path} does not match the source (top-1 agreement "
                            f"{p['top1_agreement']:.1%}, relative error {p['max_rel']:.1e} > {PARITY_MAX_REL})")

    ref = run_onnx(fp32, test.x) if test is not None else None
    if test is not None and test.y is not None:
        summary["accuracy"]["fp32"] = accuracy(ref, test.y, source.classes)
    variants = []
    if fp16:
        out16 = quantize.to_fp16(fp32, f"{base}.fp16.onnx")
        restamp(out16, source, "fp16")
        variants.append(("fp16", out16))
    if int8:
        cmeta, cfolder, batches = calibration_batches(source, calib_data, calib_size, Path(calibration), calib_method)
        summary["calibration"] = {"folder": str(cfolder), "key": cmeta["key"], "size": cmeta["size"],
                                  "method": calib_method}
        ranges = cfolder / f"ranges.{source.architecture}-{source.sha256[:12]}.json"
        for target, suffix in (("trt", "int8"), ("cpu", "int8-cpu")):
            reuse = ranges.is_file()
            q = quantize.to_int8(fp32, f"{base}.{suffix}.onnx", target, calib_method, ranges,
                                 batches=None if reuse else batches())
            restamp(q, source, "int8", int8_target=target, calibration=cmeta["key"])
            log(f"int8 ({target}) {q}: ranges {'reused from' if reuse else 'computed and saved to'} {ranges}")
            variants.append((suffix, q))
    for name, file in variants:
        summary["files"][name] = str(file)
        got = run_onnx(file, test.x)
        agreement = parity(ref, got)
        summary["parity"][f"{name}_vs_fp32"] = agreement
        line = f"{name} {file}: top-1 agreement with fp32 {agreement['top1_agreement']:.1%}"
        if test.y is not None:
            summary["accuracy"][name] = accuracy(got, test.y, source.classes)
            line += f", balanced accuracy {summary['accuracy'][name]['balanced_accuracy']:.3f}" \
                    f" (fp32 {summary['accuracy']['fp32']['balanced_accuracy']:.3f})"
        log(line + f" on {test.where}")

    summary["engines"] = _engines(source, summary["files"], fp16, int8, engine, max_batch, out, log)
    write_json(f"{base}.export.json", summary)
    return summary


def _engines(source: Source, files: dict, fp16: bool, int8: bool, engine: bool | None, max_batch: int, out,
             log) -> list[str]:
    if engine is False:
        return []
    precisions = [p for p, asked in (("int8", int8), ("fp16", fp16)) if asked] or ["fp32"]
    try:
        trt.detect_target()
    except LungedgeError as exc:
        if engine:
            raise
        builds = "; ".join(f"lungedge engine build {files[p]} --max-batch {max_batch}" for p in precisions)
        log(f"no TensorRT engine built here ({exc}); on the target run: {builds}")
        return []
    return [str(trt.build_engine(files[p], source.architecture, p, max_batch, out)) for p in precisions]
