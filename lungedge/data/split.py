"""Inspect a data set, split it by near-duplicate groups, and audit a split's leakage.

A split manifest is JSON: the parameters, the data set's root and fingerprint, the
class order, and one entry per image (``path`` relative to the root, ``label``,
``split``, ``group``, ``sha256``). The same data and parameters always give the same
bytes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import LungedgeError, check_choice
from ..io import read_json, write_json
from ..limits import check_seed
from ..ui import progress
from . import dedup
from .defaults import GROUP_BY, SPLITS
from .layout import ImageFile, detect_layout
from .scan import ScannedImage, fingerprint, scan

FORMAT = "lungedge-split/1"


def scan_dataset(root, thumbs: bool = True, show_progress: bool | None = None):
    """Detect the layout under ``root`` and scan every image: (layout, records)."""
    layout = detect_layout(root)
    with progress(len(layout.files), "reading images", show_progress) as advance:
        records = scan(layout.root, layout.files, thumbs=thumbs, progress=advance)
    return layout, records


def _unreadable(records: list[ScannedImage]) -> list[dict]:
    return [{"path": r.path, "reason": r.error} for r in records if not r.ok]


def _identical_sets(records: list[ScannedImage]) -> list[list[str]]:
    return [[records[i].path for i in members] for members in dedup.identical_sets([r.sha256 for r in records])]


def inspect(root, show_progress: bool | None = None, shortcuts: bool = True) -> dict:
    """What a data set holds: classes, counts, sizes, modes, identical and unreadable files, the images an EXIF
    orientation turns in photo viewers (``exif_orientation``: lungedge trains and predicts on the pixels as
    stored, unturned), and (with ``shortcuts``) the shortcut check of :mod:`lungedge.data.shortcut` over
    near-duplicate groups."""
    layout, records = scan_dataset(root, thumbs=shortcuts, show_progress=show_progress)
    readable = [r for r in records if r.ok]
    sizes = Counter(f"{r.size[0]}x{r.size[1]}" for r in readable)
    non_square = Counter(r.label for r in readable if r.size[0] != r.size[1])
    turned = [r for r in readable if r.turn]
    shortcut = None
    if shortcuts and len({r.label for r in readable}) >= 2:
        from .shortcut import check

        groups = group_images(readable, "near-duplicate", dedup.DEFAULT_THRESHOLD, show_progress)
        shortcut = check([layout.root / r.path for r in readable], [r.label for r in readable], groups,
                         layout.classes)
    return {
        "shortcut": shortcut,
        "root": str(layout.root),
        "layout": layout.kind,
        "classes": layout.classes,
        "class_folders": layout.class_dirs,
        "counts": layout.counts(),
        "readable_counts": {c: sum(r.label == c for r in readable) for c in layout.classes},
        "total": len(records),
        "sizes": dict(sizes.most_common()),
        "non_square": {c: non_square.get(c, 0) for c in layout.classes},
        "modes": dict(Counter(r.mode for r in readable).most_common()),
        "identical": _identical_sets(records),
        "unreadable": _unreadable(records),
        "exif_orientation": {"count": len(turned), "per_class": {c: sum(r.label == c for r in turned)
                                                                 for c in layout.classes},
                             "first": {"path": turned[0].path, "turn": turned[0].turn} if turned else None},
        "other_files": layout.other_files,
        "notes": layout.notes,
        "fingerprint": fingerprint(records),
    }


def _check_fractions(val: float, test: float) -> None:
    for name, frac in (("--val", val), ("--test", test)):
        if not 0.0 <= frac < 1.0:
            raise LungedgeError(f"{name} must be a fraction in [0, 1), got {frac}")
    if val + test >= 1.0:
        raise LungedgeError(f"--val + --test must leave images for training, got {val} + {test}")


def _check_threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise LungedgeError(f"--threshold must be in (0, 1], got {threshold}")
    return threshold


def near_pairs(records: list[ScannedImage], threshold: float, show_progress: bool | None = None):
    """:func:`dedup.similar_pairs` of the records' thumbnails at ``threshold``, with a progress bar
    (the search takes minutes on LC25000's 15,000 images)."""
    with progress(2 * len(records), "finding near-duplicates", show_progress) as advance:
        return dedup.similar_pairs(dedup.features(np.stack([r.thumb for r in records]), advance), threshold, advance)


def group_images(records: list[ScannedImage], group_by: str, threshold: float,
                 show_progress: bool | None = None) -> list[int]:
    """Group id per record: near-duplicate components, or one group per image."""
    check_choice(group_by, GROUP_BY, "--group-by")
    if group_by == "none":
        return list(range(len(records)))
    near = near_pairs(records, threshold, show_progress)
    pairs = dedup.duplicate_pairs(near, threshold) + dedup.identical_pairs([r.sha256 for r in records])
    return dedup.components(len(records), pairs)


def assign_splits(labels: list[str], groups: list[int], classes: list[str], val: float, test: float, seed: int) -> list[str]:
    """Class-stratified split that keeps each group inside one split.

    Each group counts for its majority label. Per class, groups are shuffled with
    ``seed``, then placed largest first into the split furthest below its target.
    """
    members: dict[int, list[int]] = {}
    for idx, g in enumerate(groups):
        members.setdefault(g, []).append(idx)
    by_class: dict[str, list[int]] = {c: [] for c in classes}
    for g in sorted(members):
        votes = Counter(labels[i] for i in members[g])
        top = max(votes.values())
        majority = next(c for c in classes if votes.get(c) == top)
        by_class[majority].append(g)

    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    rng = np.random.default_rng(seed)
    split_of_group: dict[int, str] = {}
    for c in classes:
        gs = [by_class[c][i] for i in rng.permutation(len(by_class[c]))]
        gs.sort(key=lambda g: -len(members[g]))  # stable: shuffled order among equal sizes
        total = sum(len(members[g]) for g in gs)
        filled = dict.fromkeys(SPLITS, 0)
        for g in gs:
            # deficit relative to target; ties go to test, then val, then train
            best = max(("test", "val", "train"), key=lambda s: fractions[s] * total - filled[s] if fractions[s] > 0 else -np.inf)
            split_of_group[g] = best
            filled[best] += len(members[g])
    return [split_of_group[g] for g in groups]


def make_split(
    root,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    group_by: str = "near-duplicate",
    threshold: float = dedup.DEFAULT_THRESHOLD,
    show_progress: bool | None = None,
) -> dict:
    """Scan, group and split a data set; return the manifest (not yet written)."""
    _check_fractions(val, test)
    check_seed(seed)
    check_choice(group_by, GROUP_BY, "--group-by")
    _check_threshold(threshold)
    layout, records = scan_dataset(root, thumbs=group_by != "none", show_progress=show_progress)
    ok = [r for r in records if r.ok]
    present = {r.label for r in ok}
    if len(present) < 2:
        raise LungedgeError(f"fewer than 2 classes have readable images in {layout.root}")
    groups = group_images(ok, group_by, threshold, show_progress)
    labels = [r.label for r in ok]
    splits = assign_splits(labels, groups, layout.classes, val, test, seed)
    counts = {s: {c: 0 for c in layout.classes} for s in SPLITS}
    for label, s in zip(labels, splits):
        counts[s][label] += 1
    empty = [f"{c} has no {s} images" for s in ("val", "test") for c in layout.classes
             if (val if s == "val" else test) > 0 and counts[s][c] == 0]
    return {
        "format": FORMAT,
        "lungedge_version": __version__,
        "params": {"val": val, "test": test, "seed": seed, "group_by": group_by,
                   "threshold": threshold if group_by != "none" else None},
        "dataset": {"root": str(layout.root), "layout": layout.kind, "fingerprint": fingerprint(ok),
                    "images": len(ok)},
        "classes": layout.classes,
        "counts": counts,
        "groups": len(set(groups)),
        "warnings": layout.notes + empty,
        "skipped": _unreadable(records),
        "items": [
            {"path": r.path, "label": r.label, "split": s, "group": g, "sha256": r.sha256}
            for r, s, g in zip(ok, splits, groups)
        ],
    }


def write_manifest(manifest: dict, out) -> Path:
    return write_json(out, manifest)


def read_manifest(path) -> dict:
    """Parse and sanity-check a manifest file (does not touch the images)."""
    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"split manifest not found: {path}")
    manifest = read_json(path, "a split manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LungedgeError(f"{path} is not a lungedge split manifest (format {FORMAT!r} expected)")
    from ..validation import validate

    validate("SplitManifest", manifest, path)  # fields present and typed, labels known, paths inside the root
    return manifest


def verify_manifest(manifest: dict, records: list[ScannedImage], source: str = "manifest") -> None:
    """Refuse a manifest whose files changed, vanished or became unreadable since the split."""
    changed = [r.path for r, item in zip(records, manifest["items"]) if r.sha256 != item["sha256"] or not r.ok]
    if changed:
        raise LungedgeError(
            f"{source}: {len(changed)} of {len(records)} images changed since the split "
            f"(first: {changed[0]}); re-run 'lungedge data split'"
        )


def load_manifest(path, root=None, thumbs: bool = False, show_progress: bool | None = None):
    """Read a manifest and re-scan its images, checking that none changed: (manifest, records)."""
    manifest = read_manifest(path)
    root = Path(root) if root else Path(manifest["dataset"]["root"])
    from ..io import contained

    for it in manifest["items"]:  # also without pydantic's schema check
        contained(root, it["path"], f"{path}: manifest entry")
    missing = [it["path"] for it in manifest["items"] if not (root / it["path"]).is_file()]
    if missing:
        raise LungedgeError(
            f"{path}: {len(missing)} images listed in the manifest are missing under {root} (first: {missing[0]})"
        )
    files = [ImageFile(it["path"], it["label"]) for it in manifest["items"]]
    with progress(len(files), "checking images", show_progress) as advance:
        records = scan(root, files, thumbs=thumbs, progress=advance)
    verify_manifest(manifest, records, str(path))
    return manifest, records


def _cross_split(pairs, splits: list[str]) -> dict:
    by_pair = Counter("-".join(sorted((splits[a], splits[b]), key=SPLITS.index)) for a, b in pairs if splits[a] != splits[b])
    return {"total": sum(by_pair.values()), **{k: by_pair.get(k, 0) for k in ("train-val", "train-test", "val-test")}}


def audit(path, thresholds=None, root=None, show_progress: bool | None = None, shortcuts: bool = True) -> dict:
    """Count byte-identical and near-duplicate pairs that cross splits.

    Near-duplicates are counted at each of ``thresholds`` (default: the manifest's
    grouping threshold and the looser :data:`dedup.LOOSE_THRESHOLD`, because at the
    grouping threshold a grouped split is leak-free by construction).
    """
    manifest, records = load_manifest(path, root=root, thumbs=True, show_progress=show_progress)
    if not thresholds:
        grouping = manifest["params"].get("threshold") or dedup.DEFAULT_THRESHOLD
        thresholds = sorted({grouping, dedup.LOOSE_THRESHOLD}, reverse=True)
    for t in thresholds:
        _check_threshold(t)
    splits = [it["split"] for it in manifest["items"]]
    identical = dedup.identical_pairs([r.sha256 for r in records])
    found = near_pairs(records, min(thresholds), show_progress)
    test_idx = [i for i, s in enumerate(splits) if s == "test"]
    near = []
    for t in thresholds:
        pairs = dedup.duplicate_pairs(found, t)
        leaked = {a if splits[a] == "test" else b for a, b in pairs if {splits[a], splits[b]} == {"test", "train"}}
        near.append({"threshold": t, "pairs": len(pairs), "cross_split": _cross_split(pairs, splits),
                     "test_images_with_train_near_duplicate": len(leaked)})
    return {
        "manifest": str(path),
        "group_by": manifest["params"]["group_by"],
        "images": len(records),
        "counts": {s: sum(v.values()) for s, v in manifest["counts"].items()},
        "test_images": len(test_idx),
        "identical_pairs": len(identical),
        "identical_cross_split": _cross_split(identical, splits),
        "near_duplicates": near,
        "shortcut": _shortcut_of_manifest(manifest, root) if shortcuts else None,
    }


def _shortcut_of_manifest(manifest: dict, root=None) -> dict | None:
    """The shortcut check (:mod:`lungedge.data.shortcut`) over the manifest's images and groups."""
    from .shortcut import check

    items = manifest["items"]
    if len({it["label"] for it in items}) < 2:
        return None
    root = Path(root) if root else Path(manifest["dataset"]["root"])
    return check([root / it["path"] for it in items], [it["label"] for it in items], [it["group"] for it in items],
                 manifest["classes"])
