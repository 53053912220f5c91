"""Accuracy of any runner on a test set, with the metrics a clinician needs (all from scikit-learn).

For every target: accuracy, balanced accuracy, per-class sensitivity, specificity, precision and
F1, macro-F1, one-vs-rest AUROC, the confusion matrix, and for FP16/INT8 the share of test
images whose predicted class differs from the FP32 model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import provenance
from .errors import LungedgeError
from .io import sha256_file
from .metrics import classification_metrics, disagreement, softmax
from .runners import open_runner
from .runners.discover import Target, source_checkpoint

BATCH = 16


class EvalImages:
    def __init__(self, paths: list[Path], labels: list[str], where: str):
        self.paths, self.labels, self.where = paths, labels, where
        self._cache: dict[str, np.ndarray] = {}

    def inputs(self, prep) -> np.ndarray:
        key = json.dumps(prep.to_dict(), sort_keys=True)
        if key not in self._cache:
            self._cache[key] = prep.load_batch(self.paths)
        return self._cache[key]


def _from_manifest(manifest_path, data=None) -> EvalImages:
    from .data.split import read_manifest

    manifest = read_manifest(manifest_path)
    root = Path(data) if data else Path(manifest["dataset"]["root"])
    items = [it for it in manifest["items"] if it["split"] == "test"]
    if not items:
        raise LungedgeError(f"{manifest_path} has no test images")
    missing = [it["path"] for it in items if not (root / it["path"]).is_file()]
    if missing:
        raise LungedgeError(f"{len(missing)} test images of {manifest_path} are missing under {root} "
                            f"(first: {missing[0]}); pass --data DIR with the data set's folder")
    return EvalImages([root / it["path"] for it in items], [it["label"] for it in items],
                   f"{len(items)} test images of {manifest_path}")


def _run_split(model: str, artifact: Path, runs) -> Path | None:
    """The split manifest of the run that made this artifact (or of MODEL's latest run)."""
    from .export import run_split

    if artifact.suffix.lower() in (".pth", ".pt", ".h5", ".hdf5") and (split := run_split(artifact)):
        return split
    ckpt = None
    if artifact.suffix.lower() in (".onnx", ".engine"):
        from .runners import artifact_info
        from .runners.discover import checkpoint_with_sha

        ckpt = checkpoint_with_sha(model, runs, artifact_info(artifact).source_sha256)
    ckpt = ckpt or source_checkpoint(model, runs)
    return run_split(ckpt) if ckpt is not None else None


def load_test_set(model: str, artifact: Path, data=None, split=None, runs="runs") -> EvalImages:
    """--split (its test part; --data overrides its root), else --data (every image), else the run's split."""
    if split:
        return _from_manifest(split, data)
    if data:
        from .data.layout import detect_layout

        layout = detect_layout(data)
        return EvalImages([layout.root / f.path for f in layout.files], [f.label for f in layout.files],
                       f"all {len(layout.files)} images of {layout.root}")
    manifest = _run_split(model, Path(artifact), runs)
    if manifest is None:
        raise LungedgeError(f"no test set known for {model}: pass --split MANIFEST (and --data DIR) or --data DIR")
    return _from_manifest(manifest)


def predict_logits(runner, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    outs = [runner.infer(x[i : i + batch]) for i in range(0, len(x), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, len(runner.classes)), np.float32)


def run_config(artifact: Path) -> dict:
    try:
        return json.loads((Path(artifact).parent / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def model_info(runner, artifact: Path) -> dict:
    """The research group's table columns for a source checkpoint."""
    info = runner.describe()
    meta = getattr(runner, "meta", {}) or {}
    cfg = run_config(artifact)
    info.update({"epochs": cfg.get("epochs"), "best_epoch": meta.get("epoch"), "batch_size": cfg.get("batch_size"),
                 "image_size": runner.preprocessing.size, "method": info.get("method") or cfg.get("mode"),
                 "weights": cfg.get("weights")})
    return info


def _fp32_reference(target: Target, cache: dict, x_of, device: str) -> tuple[np.ndarray, str] | None:
    """FP32 predictions to compare a reduced-precision target with: the same backend's FP32 if
    already evaluated, else the FP32 ONNX next to it (or the same checkpoint in FP32)."""
    for key, (pred, label) in cache.items():
        if key[0] == target.model and key[1] == target.backend:
            return pred, label
    for key, (pred, label) in cache.items():
        if key[0] == target.model:
            return pred, label
    if target.artifact.suffix.lower() == ".onnx" or target.artifact.suffix.lower() == ".engine":
        sib = target.artifact.parent / f"{target.model}.fp32.onnx"
        if not sib.is_file():
            return None
        backend, path = "onnxruntime", sib
    else:
        backend, path = target.backend, target.artifact
    with open_runner(path, backend, device if backend != "onnxruntime" else "cpu", "fp32") as r:
        pred = predict_logits(r, x_of(r.preprocessing)).argmax(1)
    return pred, f"{backend} fp32 {path.name}"


def run_eval(targets: list[Target], data=None, split=None, runs="runs", threads=None, log=lambda s: None) -> list[dict]:
    if not targets:
        raise LungedgeError("nothing to evaluate")
    rows = []
    sets: dict[str, EvalImages] = {}
    fp32_preds: dict = {}
    # FP32 first, so that FP16/INT8 compare with what was just measured
    order = sorted(targets, key=lambda t: (t.precision != "fp32",))
    for t in order:
        ts = load_test_set(t.model, t.artifact, data, split, runs)
        ts = sets.setdefault(ts.where, ts)  # images are loaded once per test set and preprocessing
        with open_runner(t.artifact, t.backend, t.device, t.precision, threads) as runner:
            unknown = sorted(set(ts.labels) - set(runner.classes))
            if unknown:
                raise LungedgeError(f"test labels {', '.join(unknown)} are not classes of {t.artifact.name} "
                                    f"({', '.join(runner.classes)})")
            y = np.array([runner.classes.index(lbl) for lbl in ts.labels])
            logits = predict_logits(runner, ts.inputs(runner.preprocessing))
            pred = logits.argmax(1)
            metrics = classification_metrics(y, pred, runner.classes, scores=softmax(logits))
            row = {"format": "lungedge-result/1", "kind": "eval", "model": t.model, "backend": runner.backend,
                   "source_framework": runner.info.framework, "device": runner.device, "precision": t.precision,
                   "variant": runner.variant, "artifact": str(t.artifact), "artifact_sha256": sha256_file(t.artifact),
                   "source_sha256": runner.info.source_sha256, "classes": runner.classes, "test_set": ts.where,
                   "metrics": metrics, "predictions": pred.tolist()}
            if runner.info.kind == "checkpoint" and t.precision == "fp32":
                row["model_info"] = model_info(runner, t.artifact)
            threads_used = runner.threads_used()
        if t.precision == "fp32":
            fp32_preds[(t.model, t.backend)] = (pred, f"{t.backend} fp32 {t.artifact.name}")
            row["differs_from_fp32"] = None
        else:
            ref = _fp32_reference(t, fp32_preds, ts.inputs, t.device)
            row["differs_from_fp32"] = disagreement(ref[0], pred) if ref else None
            row["fp32_reference"] = ref[1] if ref else None
        row["provenance"] = provenance.collect(threads=threads_used)
        rows.append(row)
        d = row["differs_from_fp32"]
        log(f"{t.model} {row['backend']} {row['device']} {row['variant']}: balanced accuracy "
            f"{metrics['balanced_accuracy']:.3f}, accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
            + (f", differs from FP32 on {d:.1%}" if d is not None else "") + f" ({ts.where})")
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="lungedge eval", title_justify="left")
    for col in ("model", "backend", "device", "precision", "images", "accuracy", "balanced acc", "macro-F1",
                "macro AUROC", "≠ FP32", "sensitivity", "specificity"):
        t.add_column(col)
    for r in rows:
        m = r["metrics"]

        def per(d):
            return " ".join(f"{k[:4]}={v:.2f}" if v is not None else f"{k[:4]}=–" for k, v in d.items())

        t.add_row(r["model"], r["backend"], r["device"], r["variant"], str(m["n"]), f"{m['accuracy']:.3f}",
                  f"{m['balanced_accuracy']:.3f}", f"{m['macro_f1']:.3f}",
                  f"{m['macro_auroc']:.3f}" if m.get("macro_auroc") is not None else "–",
                  f"{r['differs_from_fp32']:.1%}" if r.get("differs_from_fp32") is not None else "–",
                  per(m["sensitivity"]), per(m["specificity"]))
    return t


def confusion_text(row: dict) -> str:
    classes = row["classes"]
    w = max(len(c) for c in classes) + 2
    lines = ["true \\ predicted".ljust(w) + "".join(c[:10].rjust(11) for c in classes)]
    for c, counts in zip(classes, row["metrics"]["confusion_matrix"]):
        lines.append(c.ljust(w) + "".join(str(v).rjust(11) for v in counts))
    return "\n".join(lines)


