"""The one test-set loader: the test part of a split manifest, or the images of a data folder.

Export (parity and per-precision accuracy) and eval both read their images here:

* :func:`split_of_run` — the split manifest a training run used, found beside its checkpoint;
* :func:`load_training_set` / :func:`load_validation_set` — a manifest's other parts (the input
  check's reference images, the temperature's fit);
* :func:`load_test_set` — a manifest's test part (``data`` overrides the manifest's root), else
  a data folder's images (all, or ``limit`` evenly spaced ones). Strict: a manifest without test
  images, or with test images missing on disk, is refused with one line; callers that have a
  fallback catch that :class:`LungedgeError` and say why they fell back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LungedgeError


MAX_PIXEL_GROUPING = 5000  # a folder of more test images is not grouped by its pixels (TestImages.group_by_pixels)


@dataclass
class TestImages:
    """Test image paths and their label names; inputs are loaded once per preprocessing."""

    __test__ = False  # not a pytest test class

    paths: list[Path]
    labels: list[str]
    where: str  # e.g. "120 test images of runs/googlenet/x/split.json"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    groups: list | None = None  # near-duplicate group id per image (from a split manifest), for group bootstraps
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} of the images that could not be read
    turns: list | None = None  # per image, its EXIF orientation turn or None (preprocess.exif_turn), once loaded
    scanned: dict = field(default_factory=dict, repr=False, compare=False)  # str(path) -> ScannedImage with thumb

    def inputs(self, prep) -> np.ndarray:
        """The images as ``prep``'s model input. An image that cannot be read (not an image, truncated, ...)
        leaves the set (paths, labels, groups) and is listed in ``skipped``; none readable is an error.
        The first load also fills ``turns`` from the same decode."""
        key = json.dumps(prep.to_dict(), sort_keys=True)
        if key not in self._cache:
            turns: list = []
            keep, x, skipped = prep.load_readable(self.paths, turns)
            if skipped:
                self._leave_out(keep, skipped)
            if self.turns is None:  # the first load: from then on _leave_out keeps it in step with paths
                self.turns = turns
            self._cache[key] = x
        return self._cache[key]

    def _leave_out(self, keep: list[int], skipped: list[tuple]) -> None:
        if not keep:
            raise LungedgeError(f"none of the test images could be read ({self.where}; "
                                f"first: {skipped[0][0]}: {skipped[0][1]})")
        self.skipped += [{"path": str(path), "reason": reason} for path, reason in skipped]
        self.paths, self.labels = [self.paths[i] for i in keep], [self.labels[i] for i in keep]
        self.groups = [self.groups[i] for i in keep] if self.groups is not None else None
        self.turns = [self.turns[i] for i in keep] if self.turns is not None else None
        self._cache = {k: v[keep] for k, v in self._cache.items()}
        self.where = f"{self.where}, {len(self.skipped)} unreadable skipped"

    def head(self, n: int) -> "TestImages":
        """The first ``n`` images (sharing already loaded inputs)."""
        if len(self.paths) <= n:
            return self
        head = TestImages(self.paths[:n], self.labels[:n], f"first {n} of {self.where}",
                          groups=self.groups[:n] if self.groups is not None else None,
                          turns=self.turns[:n] if self.turns is not None else None)
        head._cache = {k: v[:n] for k, v in self._cache.items()}
        return head

    def group_by_pixels(self, threshold: float | None = None, show_progress: bool | None = None) -> int | None:
        """Where no split gave groups (a folder's images): their near-duplicate groups found from the pixels,
        as ``data split`` groups (:func:`lungedge.data.split.group_images`, byte-identical files joined too),
        so that intervals resample groups and the set check counts them, not slices of one scan as
        independent images. The number of groups; None (nothing done) with groups already known or over
        :data:`MAX_PIXEL_GROUPING` images (the search is O(N^2)). An unreadable file is a group of its own
        (it leaves the set when the images are loaded)."""
        if self.groups is not None or len(self.paths) > MAX_PIXEL_GROUPING:
            return None
        from .data.defaults import DEFAULT_THRESHOLD
        from .data.layout import ImageFile
        from .data.scan import scan
        from .data.split import group_images

        records = scan(Path("."), [ImageFile(str(p), "") for p in self.paths], thumbs=True)
        self.scanned = {str(p): r for p, r in zip(self.paths, records)}  # the leak check reads them, not the files
        ok = [k for k, r in enumerate(records) if r.ok]
        found = group_images([records[k] for k in ok], "near-duplicate", threshold or DEFAULT_THRESHOLD,
                             show_progress) if ok else []
        groups = [-1 - k for k in range(len(self.paths))]  # unreadable: one each, apart from the others
        for k, g in zip(ok, found):
            groups[k] = g
        self.groups = groups
        return len(set(found))

    def turned(self) -> list[tuple[Path, str]]:
        """(path, how viewers turn it) of each loaded image that carries a turning EXIF orientation."""
        return [(p, t) for p, t in zip(self.paths, self.turns or []) if t]

    def label_indices(self, classes: list[str]) -> np.ndarray | None:
        """Labels as indices into ``classes``; ``None`` when some label is not one of them."""
        if any(label not in classes for label in self.labels):
            return None
        return np.array([classes.index(label) for label in self.labels], dtype=np.int64)


def split_of_run(checkpoint: str | Path) -> Path | None:
    """The split manifest a training run used: its run folder's split.json, or config.json's split."""
    folder = Path(checkpoint).parent
    if (folder / "split.json").is_file():
        return folder / "split.json"
    try:
        split = json.loads((folder / "config.json").read_text()).get("split")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(split) if split and Path(split).is_file() else None


def _from_manifest(manifest_path: str | Path, data: str | Path | None, limit: int | None,
                   part: str = "test", spaced: bool = False) -> TestImages:
    from .data.split import read_manifest

    manifest = read_manifest(manifest_path)
    root = Path(data) if data else Path(manifest["dataset"]["root"])
    items = [it for it in manifest["items"] if it["split"] == part]
    name = {"val": "validation", "train": "training"}.get(part, part)
    if not items:
        raise LungedgeError(f"{manifest_path} has no {name} images")
    missing = [it["path"] for it in items if not (root / it["path"]).is_file()]
    if missing:
        raise LungedgeError(f"{len(missing)} {name} images of {manifest_path} are missing under {root} "
                            f"(first: {missing[0]}); pass --data DIR with the data set's folder")
    spaced = spaced and bool(limit) and len(items) > limit
    if spaced:  # evenly spaced over the manifest (class by class), not its first classes only
        items = [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]
    else:
        items = items[:limit] if limit else items
    from .io import sha256_file

    changed = [it["path"] for it in items if sha256_file(root / it["path"]) != it["sha256"]]
    if changed:  # as train and audit do: an image changed since the split is not evaluated silently
        raise LungedgeError(f"{manifest_path}: {len(changed)} of {len(items)} {name} images changed since the split "
                            f"(first: {changed[0]}); re-run 'lungedge data split'")
    return TestImages([root / it["path"] for it in items], [it["label"] for it in items],
                      f"{len(items)} {'evenly spaced ' if spaced else ''}{name} images of {manifest_path}",
                      groups=[it.get("group", k) for k, it in enumerate(items)])


def _from_folder(data: str | Path, limit: int | None) -> TestImages:
    from .data.layout import detect_layout

    layout = detect_layout(data, min_classes=1)  # a test folder may hold one class (sensitivity alone)
    files = layout.files
    if limit:
        files = files[:: max(1, len(files) // limit)][:limit]
        where = f"{len(files)} images of {layout.root}"
    else:
        where = f"all {len(files)} images of {layout.root}"
    if len(layout.classes) == 1:
        where += f" (one class: {layout.classes[0]})"
    return TestImages([layout.root / f.path for f in files], [f.label for f in files], where)


def load_training_set(split: str | Path, data: str | Path | None = None, limit: int | None = None) -> TestImages:
    """The training part of ``split`` (what the model learnt from: the input check's reference images);
    ``limit`` keeps that many, evenly spaced (the manifest lists them class by class)."""
    return _from_manifest(split, data, limit, part="train", spaced=True)


def load_validation_set(split: str | Path, data: str | Path | None = None) -> TestImages:
    """The validation part of ``split`` (what training chose its best epoch on, never the test part)."""
    return _from_manifest(split, data, None, part="val")


def load_test_set(split: str | Path | None = None, data: str | Path | None = None,
                  limit: int | None = None) -> TestImages:
    """``split``'s test part (``data`` overrides its root), else ``data``'s images.

    ``limit`` keeps the first ``limit`` test images of a split, or ``limit`` evenly spaced
    images of a folder.
    """
    if split:
        return _from_manifest(split, data, limit)
    if data:
        return _from_folder(data, limit)
    raise LungedgeError("no test set given: pass --split MANIFEST (and --data DIR) or --data DIR")
