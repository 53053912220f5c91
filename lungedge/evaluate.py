"""Accuracy of any runner on a test set, with the metrics a clinician needs (:mod:`lungedge.metrics`).

For every job: accuracy, balanced accuracy, per-class sensitivity, specificity, precision and
F1, macro-F1, one-vs-rest AUROC, the confusion matrix, how well its probabilities are calibrated
(Brier score, ECE, the reliability diagram), and for FP16/INT8 the share of test images whose
predicted class differs from the FP32 model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import provenance, testset
from .batching import nonfinite_rows, runner_logits
from .errors import LungedgeError, display_name
from .metrics import UNDEFINED, calibration, classification_metrics, disagreement
from .results import job_row
from .runners import open_runner
from .runners.base import to_probabilities
from .runners.discover import Job, fp32_reference, source_checkpoint
from .stats import MAX_BACC_DROP, MAX_SENS_DROP, N_BOOT, bootstrap_metrics, gate_line, pm, release_gate
from .testset import TestImages, split_of_run

BATCH = 16


EvalImages = TestImages  # eval's name for the one test-set type (lungedge.testset)


def _run_split(model: str, artifact: Path, runs) -> Path | None:
    """The split manifest of the run that made this artifact (or of MODEL's latest run)."""
    from .runners.artifact import artifact_info, artifact_kind

    kind = artifact_kind(artifact)
    if kind == "checkpoint" and (split := split_of_run(artifact)):  # its own run's split
        return split
    ckpt = None
    if kind != "checkpoint":  # ONNX or engine: the run of the checkpoint it was made from
        from .runners.discover import checkpoint_with_sha

        ckpt = checkpoint_with_sha(model, runs, artifact_info(artifact).source_sha256)
    ckpt = ckpt or source_checkpoint(model, runs)
    return split_of_run(ckpt) if ckpt is not None else None


def load_test_set(model: str, artifact: Path, data=None, split=None, runs="runs") -> TestImages:
    """--split (its test part; --data overrides its root), else --data (every image), else the run's split."""
    if not split and not data:
        split = _run_split(model, Path(artifact), runs)
        if split is None:
            raise LungedgeError(f"no test set known for {model}: pass --split MANIFEST (and --data DIR) or --data DIR")
    return testset.load_test_set(split=split, data=data)


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


def _fp32_reference(job: Job, cache: dict, x_of) -> tuple[np.ndarray, str] | None:
    """FP32 predictions to compare a reduced-precision job with: the same backend's FP32 if already
    evaluated, else any FP32 of the model already evaluated, else :func:`fp32_reference` run now."""
    for key, (pred, label) in cache.items():
        if key[0] == job.model and key[1] == job.backend:
            return pred, label
    for key, (pred, label) in cache.items():
        if key[0] == job.model:
            return pred, label
    ref = fp32_reference(job)
    if ref is None:
        return None
    with open_runner(ref.artifact, ref.backend, ref.device, ref.precision) as r:
        pred = runner_logits(r, x_of(r.preprocessing), BATCH).argmax(1)
    return pred, f"{ref.backend} fp32 {ref.artifact.name}"


def eval_job(job: Job, ts: EvalImages, threads=None, n_boot: int = N_BOOT, log=lambda s: None
             ) -> tuple[dict, np.ndarray]:
    """One job's row (metrics, predictions, model facts) and its predicted classes. Where the artifact
    carries an input check (:mod:`lungedge.inputcheck`), ``row["unlike_training"]`` is the share of test
    images it flags (``log`` names a few); nothing else depends on it. ``row["exif_orientation_count"]``: the
    test images whose EXIF orientation turns them in photo viewers (the model sees them as stored)."""
    with open_runner(job.artifact, job.backend, job.device, job.precision, threads) as runner:
        unknown = sorted(set(ts.labels) - set(runner.classes))
        if unknown:
            raise LungedgeError(f"test labels {', '.join(unknown)} are not classes of {job.artifact.name} "
                                f"({', '.join(runner.classes)})")
        x = ts.inputs(runner.preprocessing)  # unreadable images leave the set here: labels after
        y = np.array([runner.classes.index(lbl) for lbl in ts.labels])
        logits = runner_logits(runner, x, BATCH)
        bad = nonfinite_rows(logits)
        if bad:
            raise LungedgeError(f"{job.artifact.name} ({job.backend} {job.precision}): the model's output is NaN "
                                f"or infinite on {bad} of {len(logits)} test images")
        pred = logits.argmax(1)
        probs = to_probabilities(logits, runner.output, runner.temperature)
        metrics = classification_metrics(y, pred, runner.classes, scores=probs)
        metrics["calibration"] = calibration(y, probs)
        row = {**job_row("eval", job, runner), "classes": runner.classes, "test_set": ts.where,
               "metrics": metrics, "predictions": pred.tolist(), "probabilities": probs.tolist(),
               "temperature": runner.temperature}
        # 95% intervals by bootstrap over the split's near-duplicate groups (issue #16)
        row["intervals"] = bootstrap_metrics(y, pred, ts.groups, runner.classes, n_boot=n_boot, scores=probs,
                                             probs=probs)
        row["images"] = [str(p) for p in ts.paths]
        row["labels"] = y.tolist()
        row["groups"] = list(ts.groups) if ts.groups is not None else None
        row["exif_orientation_count"] = len(ts.turned())
        if runner.input_check is not None:
            _input_check(runner, x, ts, row, job, log)
        if not runner.info.fixed_precision and job.precision == "fp32":
            row["model_info"] = model_info(runner, job.artifact)
        row["provenance"] = provenance.collect(threads=runner.threads_used())
    return row, pred


def _input_check(runner, x: np.ndarray, ts: EvalImages, row: dict, job: Job, log) -> None:
    """The share of test images the artifact's input check finds unlike the training images, and whether
    they differ from them as a set (``row["set_shift"]``: :meth:`lungedge.inputcheck.InputCheck.compare_set`),
    in the row; a line naming a few flagged images (the set's line: :func:`run_eval`)."""
    from .inputcheck import describe_in_chunks, summary_line

    values = describe_in_chunks([(x, runner.preprocessing)])
    flags = runner.input_check.flag_values(values)
    n = sum(f["unlike_training"] for f in flags)
    row["unlike_training"] = n / len(flags) if flags else 0.0
    row["unlike_training_count"] = n
    if n:
        log(f"{job.model}: " + summary_line(flags, [display_name(Path(p).name) for p in ts.paths]))
    row["set_shift"] = runner.input_check.compare_set(values, ts.groups)


def exif_line(model: str, ts: EvalImages) -> str | None:
    """One note when test images carry an EXIF orientation: a viewer shows them turned, the model (as in
    training) sees the pixels as stored, unturned; the figures are for the stored pixels. None when none does."""
    turned = ts.turned()
    if not turned:
        return None
    path, turn = turned[0]
    return (f"note {model}: {len(turned)} of the {len(ts.paths)} test images carry an EXIF orientation (first: "
            f"{display_name(path)}, {turn} in photo viewers); the model saw them unturned, as stored, as lungedge "
            "reads every image in training too")


def leakage(ts: EvalImages, model: str, artifact: Path, runs, data=None, split=None,
            show_progress: bool | None = None) -> dict | None:
    """How many test images the model has already seen, against the training and validation parts of the
    split it was trained with (:func:`lungedge.data.leak.trained_on`): byte-identical (SHA-256, as the
    manifest records them) and near-duplicates (re-encoded, resized, a neighbouring slice, a rotated/flipped
    copy: the pixel similarity ``data split`` groups by), each counted apart; None when that split is not
    known. The training files are read from the manifest's root, or from ``data`` when eval was given that
    same manifest with ``--split`` and ``--data``; those missing or changed there are checked by SHA-256
    only, and counted in ``near_duplicates.not_checked``. The training images' rotated thumbnails are cached
    beside the manifest (:func:`lungedge.data.leak.cache_path`), so the next eval against it reads none."""
    from .data.leak import cache_path, trained_on
    from .data.split import read_manifest

    manifest_path = _run_split(model, Path(artifact), runs)
    if manifest_path is None:
        return None
    try:
        manifest = read_manifest(manifest_path)
    except LungedgeError:
        return None
    root = None
    if data and split and Path(split).resolve() == Path(manifest_path).resolve():
        root = Path(data)  # eval's --data is this manifest's moved root
    return {"checked_against": str(manifest_path),
            **trained_on(manifest, list(ts.paths), root=root, cache=cache_path(manifest_path),
                         show_progress=show_progress, scanned=ts.scanned)}


def _leak_counts(leak: dict) -> tuple[int, int, int, int]:
    """(byte-identical in training, in validation, near-duplicates in training, in validation)."""
    near = leak.get("near_duplicates") or {}
    return leak["in_training"], leak["in_validation"], near.get("in_training", 0), near.get("in_validation", 0)


def not_checked_text(leak: dict) -> str | None:
    """What the near-duplicate check could not compare ("12 of the 932 training/validation images ..."), if anything."""
    near = leak.get("near_duplicates") or {}
    n = near.get("not_checked")
    if not n:
        return None
    first = near.get("first_not_checked") or {}
    return (f"{n} of the {n + near['compared_with']} training/validation images could not be read under "
            f"{near.get('root')} ({first.get('reason')}: {first.get('path')}{', ...' if n > 1 else ''}), so only "
            "their SHA-256 was checked, not their near-duplicates")


def leakage_line(model: str, leak: dict | None) -> str | None:
    """One line on stderr: a WARNING naming the byte-identical and the near-duplicate test images; a note when
    some training images could not be compared by their pixels and none leaked; None when the check found
    nothing and missed nothing."""
    if not leak:
        return None
    ident_t, ident_v, near_t, near_v = _leak_counts(leak)
    missed = not_checked_text(leak)
    near = leak.get("near_duplicates") or {}
    if not (ident_t or ident_v or near_t or near_v):
        return (f"note {model}: no test image is byte-identical to a training or validation image of "
                f"{leak['checked_against']}, nor a near-duplicate of the {near.get('compared_with', 0)} of them "
                f"that could be compared; {missed}") if missed else None
    return (f"WARNING {model}: {ident_t + ident_v + near_t + near_v} of the {leak['images']} test images are "
            f"training or validation images of {leak['checked_against']} or near-copies of them: {ident_t} "
            f"byte-identical to training images and {ident_v} to validation images, {near_t} near-duplicates of "
            f"training images and {near_v} of validation images (re-encoded, resized, a neighbouring slice or a "
            f"rotated/flipped copy: similarity >= {near.get('threshold', 0):g})" + (f"; {missed}" if missed else "")
            + ": these figures overstate how the model does on new patients (evaluate the split's test part: "
            "--split MANIFEST)")


def class_notes(row: dict) -> list[str]:
    """What a clinician must not miss in a row: classes without test images (sensitivity undefined, left out
    of balanced accuracy), classes the model never predicted (precision undefined), unchecked gate classes."""
    m, out = row["metrics"], []
    who = f"{row['model']} {row['backend']} {row['variant']}"
    if m.get("absent"):
        out.append(f"{who}: no test images of {', '.join(m['absent'])}: sensitivity undefined; balanced accuracy "
                   f"and macro-F1 average over {', '.join(m['averaged_over'])} only")
    if m.get("never_predicted"):
        out.append(f"{who}: never predicted {', '.join(m['never_predicted'])}: precision (PPV) undefined")
    return out


def run_eval(jobs: list[Job], data=None, split=None, runs="runs", threads=None, log=lambda s: None,
             n_boot: int = N_BOOT, max_bacc_drop: float = MAX_BACC_DROP,
             max_sens_drop: float = MAX_SENS_DROP) -> list[dict]:
    """Evaluate every job; reduced precisions also get ``row["gate"]``: the paired comparison with FP32
    on the same images (:func:`lungedge.stats.release_gate`, limits as fractions)."""
    from .inputcheck import set_line

    if not jobs:
        raise LungedgeError("nothing to evaluate")
    rows = []
    sets: dict[str, EvalImages] = {}
    fp32_preds: dict = {}
    leaks: dict = {}
    exif_said: set[int] = set()
    said: set[str] = set()

    def once(line: str) -> None:  # what the input check says of a test set: every backend and precision
        if line not in said:  # of a model sees the same pixels, so once, not once per row
            said.add(line)
            log(line)

    # FP32 first, so that FP16/INT8 compare with what was just measured
    for job in sorted(jobs, key=lambda j: (j.precision != "fp32",)):
        ts = load_test_set(job.model, job.artifact, data, split, runs)
        ts = sets.setdefault(ts.where, ts)  # images are loaded once per test set and preprocessing
        if ts.groups is None and (found := ts.group_by_pixels()) is not None:  # a folder's images: once
            log(f"note: {ts.where}: {found} near-duplicate groups by their pixels (as data split groups them); "
                "intervals resample groups, the set check counts them")
        noted = len(ts.skipped)
        row, pred = eval_job(job, ts, threads, n_boot, once)
        for bad in ts.skipped[noted:]:  # as data split and predict do: listed, not the end of the run
            log(f"skipped {display_name(bad['path'])}: {bad['reason']}")
        if id(ts) not in exif_said:  # once per test set, as the images are read once
            exif_said.add(id(ts))
            if (line := exif_line(job.model, ts)):
                log(line)
        key = (job.model, ts.where)
        if (line := set_line(row.get("set_shift"), job.model)):
            once(line)
        if key not in leaks:  # test images the model saw in training: said, and kept with every row
            leaks[key] = leakage(ts, job.model, job.artifact, runs, data, split)
            if (line := leakage_line(job.model, leaks[key])):
                log(line)
        row["leakage"] = leaks[key]
        for line in class_notes(row):
            log(line)
        if job.precision == "fp32":
            fp32_preds[(job.model, job.backend)] = (pred, f"{job.backend} fp32 {job.artifact.name}")
            row["differs_from_fp32"] = None
        else:
            ref = _fp32_reference(job, fp32_preds, ts.inputs)
            row["differs_from_fp32"] = disagreement(ref[0], pred) if ref else None
            row["fp32_reference"] = ref[1] if ref else None
            row["gate"] = release_gate(row["labels"], ref[0], pred, ts.groups, row["classes"], max_bacc_drop,
                                       max_sens_drop, n_boot) if ref is not None and len(ref[0]) == len(pred) else None
            if row["gate"] is not None and row["gate"].get("not_checked"):
                log(f"{job.model} {row['variant']} release gate: no test images of "
                    f"{', '.join(row['gate']['not_checked'])}: their sensitivity is not checked")
            if row["gate"] is not None:
                log(f"{job.model} {row['variant']} vs FP32 release gate: {gate_line(row['gate'])}")
        rows.append(row)
        m, d = row["metrics"], row["differs_from_fp32"]
        log(f"{job.model} {row['backend']} {row['device']} {row['variant']}: balanced accuracy "
            f"{m['balanced_accuracy']:.3f}, accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, "
            f"ECE {m['calibration']['ece']:.3f}" + (f", differs from FP32 on {d:.1%}" if d is not None else "")
            + (f", {row['unlike_training']:.1%} unlike the training images" if row.get("unlike_training") else "")
            + (", unlike the training images as a set" if (row.get("set_shift") or {}).get("differs") else "")
            + f" ({ts.where})")
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title=table_title(rows), title_justify="left")
    for col in ("model", "backend", "device", "precision", "images", "accuracy", "balanced acc", "macro-F1",
                "macro AUROC", "ECE", "≠ FP32", "gate", "sensitivity", "specificity"):
        t.add_column(col)
    for r in rows:
        m, ci = r["metrics"], r.get("intervals") or {}

        def one(key):
            return pm(m.get(key), ci.get(key))

        def per(key):
            return "\n".join(f"{k}={pm(v, (ci.get(key) or {}).get(k), 2)}" if v is not None
                             else f"{k}=– ({UNDEFINED[key]})" for k, v in m[key].items())

        gate = r.get("gate")
        t.add_row(r["model"], r["backend"], r["device"], r["variant"], str(m["n"]), one("accuracy"),
                  one("balanced_accuracy"), one("macro_f1"),
                  one("macro_auroc") if m.get("macro_auroc") is not None else "–", ece_pm(r),
                  f"{r['differs_from_fp32']:.1%}" if r.get("differs_from_fp32") is not None else "–",
                  ("pass" if gate["pass"] else "FAIL") if gate else "–", per("sensitivity"), per("specificity"))
    return t


def table_title(rows: list[dict]) -> str:
    """What every figure of the table is: the test set(s), the interval's level and method."""
    sets = sorted({r.get("test_set", "?") for r in rows})
    methods = sorted({f"{(r.get('intervals') or {}).get('confidence', 0.95):.0%} intervals: "
                      f"{(r.get('intervals') or {}).get('method', '?')}" for r in rows})
    return f"lungedge eval on {'; '.join(sets)} ({'; '.join(methods)})"


def ece_pm(row: dict) -> str:
    """The row's expected calibration error with its interval ("–" for rows written before it was measured)."""
    cal = row["metrics"].get("calibration") or {}
    return pm(cal["ece"], (row.get("intervals") or {}).get("ece")) if cal.get("ece") is not None else "–"


def gate_lines(rows: list[dict]) -> list[str]:
    """One line per reduced-precision row: its release-gate verdict against FP32."""
    return [f"release gate {r['model']} {r['backend']} {r['variant']} vs {r.get('fp32_reference')}: "
            f"{gate_line(r['gate'])}" for r in rows if r.get("gate")]


def confusion_text(row: dict) -> str:
    classes = row["classes"]
    w = max(len(c) for c in classes) + 2
    lines = ["true \\ predicted".ljust(w) + "".join(c[:10].rjust(11) for c in classes)]
    for c, counts in zip(classes, row["metrics"]["confusion_matrix"]):
        lines.append(c.ljust(w) + "".join(str(v).rjust(11) for v in counts))
    return "\n".join(lines)


