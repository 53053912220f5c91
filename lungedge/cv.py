"""Grouped, class-stratified k-fold cross-validation: ``lungedge cv MODEL --data DIR``.

Folds come from scikit-learn's ``StratifiedGroupKFold`` on the near-duplicate groups that
``lungedge data split`` finds (:func:`lungedge.data.split.group_images`), so no scan or tile
straddles a fold's training and test part. Each fold is one training through
:func:`lungedge.train.train` on a split manifest written for the fold (test = the held-out fold;
validation = a grouped, stratified 15% of the remaining groups, used for checkpoint selection);
its best checkpoint is then evaluated on the held-out groups through a runner.

Results: mean, standard deviation and a 95% t-interval of each metric across folds, plus the
pooled out-of-fold predictions with a group-bootstrap interval and the pooled confusion matrix.
Every finished fold leaves ``result.json`` in its folder and is reused by a rerun (an interrupted
training resumes from its ``last.pth``). ``group_by="none"`` splits image by image: the difference
to the grouped figure is the leakage gap.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import LungedgeError
from .io import FolderLock, write_json

FORMAT = "lungedge-cv/1"
VAL_FRACTION = 0.15


def fold_assignment(labels, groups, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..folds-1) per image: class-stratified, and every group inside one fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = np.asarray(labels), np.asarray(groups)
    if folds < 2:
        raise LungedgeError(f"--folds must be at least 2, got {folds}")
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise LungedgeError(f"only {n_groups} groups for {folds} folds; use fewer --folds")
    out = np.full(len(labels), -1, int)
    skf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    import warnings

    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits"
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test) in enumerate(skf.split(np.zeros(len(labels)), labels, groups)):
            out[test] = k
    return out


def _groups(root: Path, group_by: str, threshold: float, out: Path, log) -> tuple[list, list[int], str]:
    """(ok records, group id per record, fingerprint); near-duplicate groups are cached in ``out``."""
    from .data.scan import fingerprint
    from .data.split import group_images, scan_dataset

    layout, records = scan_dataset(root, thumbs=False)
    ok = [r for r in records if r.ok]
    if len({r.label for r in ok}) < 2:
        raise LungedgeError(f"fewer than 2 classes have readable images in {layout.root}")
    fp = fingerprint(ok)
    cache = out / f"groups-{group_by}.json"
    if cache.is_file():
        c = json.loads(cache.read_text())
        if c.get("fingerprint") == fp and c.get("threshold") == threshold and len(c["groups"]) == len(ok):
            return ok, c["groups"], fp
    if group_by != "none":
        log(f"finding near-duplicate groups in {len(ok)} images ...")
        _, records = scan_dataset(root, thumbs=True)
        ok = [r for r in records if r.ok]
    groups = group_images(ok, group_by, threshold)
    write_json(cache, {"fingerprint": fp, "group_by": group_by, "threshold": threshold, "groups": groups})
    for r in ok:
        r.thumb = None
    return ok, groups, fp


def fold_manifest(root: Path, records, groups, fold_of, k: int, classes: list[str], fp: str, group_by: str,
                  threshold, seed: int) -> dict:
    """A split manifest (lungedge-split/1) for fold ``k``: test = fold k, val = a grouped 15% of the rest."""
    from .data.split import FORMAT as SPLIT_FORMAT, assign_splits

    rest = [i for i in range(len(records)) if fold_of[i] != k]
    sub = assign_splits([records[i].label for i in rest], [groups[i] for i in rest], classes, VAL_FRACTION, 0.0, seed)
    split = {i: s for i, s in zip(rest, sub)}
    items, counts = [], {s: {c: 0 for c in classes} for s in ("train", "val", "test")}
    for i, r in enumerate(records):
        s = split.get(i, "test")
        counts[s][r.label] += 1
        items.append({"path": r.path, "label": r.label, "split": s, "group": int(groups[i]), "sha256": r.sha256})
    from . import __version__

    return {"format": SPLIT_FORMAT, "lungedge_version": __version__,
            "params": {"val": VAL_FRACTION, "test": round(counts_total(counts, "test") / max(1, len(records)), 6),
                       "seed": seed, "group_by": group_by,
                       "threshold": threshold if group_by != "none" else None, "cv_fold": k},
            "dataset": {"root": str(root), "layout": "cv", "fingerprint": fp, "images": len(records)},
            "classes": classes, "counts": counts, "groups": len(set(groups)), "warnings": [], "skipped": [],
            "items": items}


def counts_total(counts: dict, split: str) -> int:
    return sum(counts[split].values())


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _evaluate_checkpoint(ckpt: Path, root: Path, items: list[dict], classes: list[str], threads) -> dict:
    from .runners.base import to_probabilities
    from .runners import open_runner

    paths = [root / it["path"] for it in items]
    with open_runner(ckpt, device="cpu", threads=threads) as runner:
        if runner.classes != classes:
            raise LungedgeError(f"{ckpt} has classes {runner.classes}, the data set {classes}")
        x = runner.preprocessing.load_batch(paths)
        logits = np.concatenate([runner.infer(x[i:i + 32]) for i in range(0, len(x), 32)])
    probs = to_probabilities(logits, runner.output, runner.temperature)
    return {"pred": logits.argmax(1).tolist(), "probs": np.round(probs, 5).tolist()}


def run_fold(model: str, root: Path, manifest: dict, fold_dir: Path, settings: dict, log) -> dict:
    """Train and evaluate one fold; reuse its ``result.json`` when it matches these settings."""
    from .metrics import classification_metrics
    from .train import TrainConfig, train
    from .train.common import run_checkpoint

    key = _key({"settings": settings, "items": [(it["path"], it["split"]) for it in manifest["items"]]})
    res_path = fold_dir / "result.json"
    if res_path.is_file():
        try:
            res = json.loads(res_path.read_text())
            if res.get("key") == key:
                log(f"{fold_dir.name}: reusing {res_path}")
                return res
        except ValueError:
            pass
    runs = fold_dir / "runs"
    run_dir = runs / model / "run"
    # what the fold's training depends on (not --threads): a training started otherwise is never reused
    trained_for = {k: v for k, v in settings.items() if k != "threads"}
    train_key = _key({"settings": trained_for, "items": [(it["path"], it["split"]) for it in manifest["items"]]})
    _check_fold_training(fold_dir, run_dir, train_key, trained_for)
    fold_dir.mkdir(parents=True, exist_ok=True)
    write_json(fold_dir / "fold.json", {"format": FORMAT, "train_key": train_key, "settings": trained_for})
    split_path = write_json(fold_dir / "split.json", manifest)
    cfg = TrainConfig(model=model, split=str(split_path), out=str(runs), run_name="run",
                      **{k: v for k, v in settings.items() if k in ("epochs", "image_size", "batch_size", "lr", "weights",
                                                                    "seed", "threads")})
    finished = False
    if (run_dir / "metrics.json").is_file():
        finished = json.loads((run_dir / "metrics.json").read_text()).get("status") == "finished"
    if not finished:
        resume = run_checkpoint(run_dir) is not None
        n = {s: sum(v.values()) for s, v in manifest["counts"].items()}
        log(f"{fold_dir.name}: {'resuming' if resume else 'training'} {model} on {n['train']} images "
            f"(val {n['val']}, held out {n['test']})")
        summary = train(cfg, resume=resume, show_progress=False,
                        on_epoch=lambda rec: log(f"  {fold_dir.name} epoch {rec['epoch']}: val balanced acc "
                                                 f"{rec['val_balanced_accuracy']:.3f}"))
        if summary.get("status") != "finished":
            raise LungedgeError(f"{fold_dir.name}: training ended with status {summary.get('status')}")
    best = run_checkpoint(run_dir, "best")
    if best is None:
        raise LungedgeError(f"{run_dir} has no best checkpoint")
    classes = manifest["classes"]
    test = [it for it in manifest["items"] if it["split"] == "test"]
    ev = _evaluate_checkpoint(best, root, test, classes, settings.get("threads"))
    y = [classes.index(it["label"]) for it in test]
    res = {"format": FORMAT, "key": key, "fold": fold_dir.name, "checkpoint": str(best),
           "paths": [it["path"] for it in test], "groups": [it["group"] for it in test], "y": y, **ev,
           "metrics": classification_metrics(y, ev["pred"], classes, scores=np.array(ev["probs"]))}
    write_json(res_path, res)
    return res


def _check_fold_training(fold_dir: Path, run_dir: Path, key: str, settings: dict) -> None:
    """Refuse a fold folder whose training was started with other settings or folds: reusing it (finished) or
    resuming it would report that training under these settings, and, for other folds, test on images it
    trained on."""
    if not (run_dir / "config.json").is_file():
        return
    try:
        trained = json.loads((fold_dir / "fold.json").read_text())
    except (OSError, ValueError):
        return  # a fold folder of an older lungedge: resumed or reused as before
    if not isinstance(trained, dict) or trained.get("train_key") in (None, key):
        return
    was = trained.get("settings") or {}
    differ = [f"--{k.replace('_', '-')} {v} (trained with {was.get(k)})" for k, v in settings.items()
              if k in was and was.get(k) != v]
    why = "; ".join(differ) if differ else "its folds differ (the data changed)"
    raise LungedgeError(f"{fold_dir} holds a training started with other settings: {why}; give cv another --out, "
                        f"or remove {fold_dir} to train that fold again")


METRIC_KEYS = ("balanced_accuracy", "accuracy", "macro_f1")
PER_CLASS_KEYS = ("sensitivity", "specificity")


def summarize(results: list[dict], classes: list[str], n_boot: int = 1000) -> dict:
    """Across-fold mean/std/t-interval per metric and the pooled out-of-fold figures with a group bootstrap."""
    from .metrics import classification_metrics
    from .stats import bootstrap_metrics, mean_interval

    across = {k: mean_interval([r["metrics"][k] for r in results], bounds=(0, 1)) for k in METRIC_KEYS}
    for k in PER_CLASS_KEYS:
        across[k] = {c: mean_interval([r["metrics"][k][c] for r in results], bounds=(0, 1)) for c in classes}
    pooled = {}
    by_repeat: dict[str, list[dict]] = {}
    for r in results:
        by_repeat.setdefault(r["fold"].split("-")[0], []).append(r)
    for rep, rs in sorted(by_repeat.items()):
        y = np.concatenate([r["y"] for r in rs])
        pred = np.concatenate([r["pred"] for r in rs])
        groups = np.concatenate([r["groups"] for r in rs])
        m = classification_metrics(y, pred, classes)
        pooled[rep] = {"metrics": m, "ci": bootstrap_metrics(y, pred, groups, classes, n_boot=n_boot)}
    return {"across_folds": across, "pooled": pooled}


MAX_REPEATS = 100


def run_cv(model: str, data, folds: int = 5, repeats: int = 1, group_by: str = "near-duplicate",
           image_size: int | None = None, epochs: int | None = None, batch_size: int | None = None,
           lr: float | None = None, weights: str | None = None, threads: int | None = None, seed: int = 0,
           out="cv", threshold: float | None = None, log=lambda s: None) -> dict:
    """Run (or resume) the whole cross-validation; write and return ``<out>/cv-<group_by>.json``."""
    from .data.defaults import DEFAULT_THRESHOLD, GROUP_BY
    from .errors import check_choice
    from .limits import check_input_size, check_positive, check_seed, check_threads
    from .models.registry import get_spec

    check_choice(group_by, GROUP_BY, "--group-by")
    check_seed(seed)
    check_threads(threads)
    if not 1 <= repeats <= MAX_REPEATS:  # 10**12 trained until killed
        raise LungedgeError(f"--repeats must be from 1 to {MAX_REPEATS}, got {repeats}")
    # the training options, checked before the folds' settings are written (--lr nan failed there: exit 3)
    check_positive(lr, "--lr", upper=1.0)
    check_positive(epochs, "--epochs", integer=True)
    check_positive(batch_size, "--batch-size", integer=True)
    if image_size is not None:
        check_input_size(image_size, "--image-size")
    spec = get_spec(model)
    root = Path(data) if data else None
    if root is None or not root.is_dir():
        raise LungedgeError(f"data folder not found: {data}")
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    out = Path(out) / model / group_by
    # one cv at a time in OUT/MODEL/GROUP_BY: a second one would write the same folds' split and cache files
    # and then stumble on the first one's trainings
    with FolderLock(out, "lungedge cv"):
        out.mkdir(parents=True, exist_ok=True)
        return _run_cv(model, spec, root, out, folds, repeats, group_by, image_size, epochs, batch_size, lr,
                       weights, threads, seed, threshold, log)


def _run_cv(model, spec, root: Path, out: Path, folds, repeats, group_by, image_size, epochs, batch_size, lr,
            weights, threads, seed, threshold, log) -> dict:
    from .data.layout import detect_layout

    layout = detect_layout(root)
    classes = list(layout.classes)
    records, groups, fp = _groups(layout.root, group_by, threshold, out, log)
    labels = [r.label for r in records]
    if weights is None:
        weights = "none" if getattr(spec, "name", "") == "smallcnn" else "imagenet"
    settings = {"model": model, "epochs": epochs, "image_size": image_size, "batch_size": batch_size, "lr": lr,
                "weights": weights, "seed": seed, "threads": threads}
    results = []
    for rep in range(repeats):
        fold_of = fold_assignment(labels, groups, folds, seed=seed + rep)
        for k in range(folds):
            manifest = fold_manifest(layout.root, records, groups, fold_of, k, classes, fp, group_by, threshold,
                                     seed + rep)
            missing = [c for c in classes if manifest["counts"]["test"][c] == 0]
            if missing:
                log(f"r{rep}-f{k}: no test images of {', '.join(missing)} (too few groups of that class)")
            res = run_fold(model, layout.root, manifest, out / f"r{rep}-f{k}", settings, log)
            log(f"r{rep}-f{k}: balanced accuracy {res['metrics']['balanced_accuracy']:.3f} "
                f"on {len(res['y'])} held-out images")
            results.append(res)
    summary = summarize(results, classes)
    report = {"format": FORMAT, "model": model, "data": str(layout.root), "fingerprint": fp, "classes": classes,
              "folds": folds, "repeats": repeats, "group_by": group_by, "threshold": threshold if group_by != "none" else None,
              "groups": len(set(groups)), "images": len(records), "settings": settings,
              "per_fold": [{"fold": r["fold"], "n": len(r["y"]), "groups": len(set(r["groups"])),
                            "metrics": {k: r["metrics"][k] for k in (*METRIC_KEYS, *PER_CLASS_KEYS, "confusion_matrix")}}
                           for r in results],
              "pooled_confusion_matrix": np.sum([r["metrics"]["confusion_matrix"] for r in results], axis=0).tolist(),
              **summary}
    report["path"] = str(write_json(out.parent / f"cv-{group_by}.json", report))
    gap = leakage_gap(out.parent.parent, model)
    if gap is not None:
        report["leakage_gap"] = gap
        write_json(out.parent / "leakage-gap.json", gap)
        log(f"leakage gap (image-level minus grouped, paired group bootstrap): balanced accuracy "
            f"{gap['balanced_accuracy']['delta']:+.3f} [{gap['balanced_accuracy']['ci'][0]:+.3f}, "
            f"{gap['balanced_accuracy']['ci'][1]:+.3f}]")
    return report


def table_rows(report: dict) -> list[list[str]]:
    """Rows (metric, across folds mean ± sd [95% CI], pooled [95% group-bootstrap CI])."""
    from .stats import pm

    acr = report["across_folds"]
    pooled = report["pooled"][sorted(report["pooled"])[0]]

    def across(d):
        if d["mean"] is None:
            return "–"
        sd = f" ± {d['std']:.3f}" if d["std"] is not None else ""
        ci = f" [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]" if d["ci"][0] is not None else ""
        return f"{d['mean']:.3f}{sd}{ci}"

    rows = []
    for k in METRIC_KEYS:
        rows.append([k.replace("_", " "), across(acr[k]), pm(pooled["metrics"][k], pooled["ci"][k])])
    for k in PER_CLASS_KEYS:
        for c in report["classes"]:
            rows.append([f"{k} {c}", across(acr[k][c]),
                         pm(pooled["metrics"][k][c], (pooled["ci"][k] or {}).get(c))])
    return rows


def leakage_gap(out, model: str, n_boot: int = 1000) -> dict | None:
    """Image-level minus grouped pooled out-of-fold figures, on the same images, with a paired bootstrap over
    the near-duplicate groups; None until both ``cv --group-by near-duplicate`` and ``--group-by none`` ran."""
    from .stats import paired_bootstrap

    base = Path(out) / model
    runs = {}
    for g in ("near-duplicate", "none"):
        path = base / f"cv-{g}.json"
        if not path.is_file():
            return None
        rep = json.loads(path.read_text())
        preds = {}
        for f in rep["per_fold"]:
            if not f["fold"].startswith("r0-"):
                continue
            res = json.loads((base / g / f["fold"] / "result.json").read_text())
            preds.update(zip(res["paths"], zip(res["y"], res["pred"])))
        runs[g] = (rep, preds)
    groups_file = base / "near-duplicate" / "groups-near-duplicate.json"
    (rep, grouped), (_, leaky) = runs["near-duplicate"], runs["none"]
    common = sorted(set(grouped) & set(leaky))
    if not common or not groups_file.is_file():
        return None
    # group ids in the order the data set was scanned: match them to paths through the grouped run's folds
    gid = {}
    for f in rep["per_fold"]:
        res = json.loads((base / "near-duplicate" / f["fold"] / "result.json").read_text())
        gid.update(zip(res["paths"], res["groups"]))
    y = [grouped[p][0] for p in common]
    out_ = paired_bootstrap(y, [grouped[p][1] for p in common], [leaky[p][1] for p in common],
                            [gid[p] for p in common], rep["classes"], n_boot=n_boot)
    out_["images"] = len(common)
    out_["meaning"] = "image-level minus grouped (positive: the leaky folds look better)"
    return out_
