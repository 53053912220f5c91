"""Recognise a data set's folder layout and list its labelled images.

Three layouts are known:

* IQ-OTH/NCCD as published: ``Bengin cases`` / ``Malignant cases`` / ``Normal cases``
  (the publisher's spelling), under up to two wrapping folders;
* LC25000: ``lung_colon_image_set/lung_image_sets/{lung_aca,lung_n,lung_scc}``; the colon
  part is a separate task and is left out (with a note);
* generic: one folder per class, under up to two wrapping folders.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LungedgeError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}

IQ_OTH_FOLDERS = {
    "bengin cases": "Benign",  # the publisher's spelling
    "benign cases": "Benign",
    "malignant cases": "Malignant",
    "normal cases": "Normal",
}
LC25000_FOLDERS = {
    "lung_aca": "Adenocarcinoma",
    "lung_n": "Benign",
    "lung_scc": "Squamous cell carcinoma",
}
LC25000_COLON = ("colon_image_sets", "colon_aca", "colon_n")
MAX_WRAPPING = 2


@dataclass(frozen=True)
class ImageFile:
    path: str  # relative to the data set's root, POSIX separators
    label: str


@dataclass
class DatasetLayout:
    root: Path
    kind: str  # "iq-oth-nccd" | "lc25000-lung" | "generic"
    classes: list[str]
    class_dirs: dict[str, list[str]]
    files: list[ImageFile]
    other_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for f in self.files:
            out[f.label] += 1
        return out


def natural_key(text: str):
    """'case (2)' sorts before 'case (10)'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _subdirs(path: Path) -> list[Path]:
    try:
        entries = sorted(path.iterdir(), key=lambda p: natural_key(p.name))
    except OSError:
        return []
    return [p for p in entries if p.is_dir() and not p.name.startswith(".")]


def _candidates(root: Path):
    """root, then its sub-folders breadth-first, at most MAX_WRAPPING levels down."""
    level = [root]
    for _ in range(MAX_WRAPPING + 1):
        yield from level
        level = [sub for d in level for sub in _subdirs(d)]


def _unreadable_folder(exc: OSError) -> None:
    raise LungedgeError(f"cannot read folder {exc.filename}: {exc.strerror or type(exc).__name__}")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes in the name (surrogate escapes)
        return False


def printable(name: str) -> str:
    """A file name that can be printed and stored in JSON (undecodable bytes shown as U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _walk_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_unreadable_folder):
        dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")), key=natural_key)
        out += [Path(dirpath) / n for n in sorted(filenames, key=natural_key) if not n.startswith(".")]
    return out


def _dicom_files(root: Path, look_at: int = 1000) -> list[Path]:
    """DICOM files among the first ``look_at`` files under ``root``: named ``.dcm``/``.dicom``, or (scanners
    often write no suffix) with the 'DICM' marker at byte 128."""
    found = []
    for f in _walk_files(root)[:look_at]:
        if f.suffix.lower() in (".dcm", ".dicom"):
            found.append(f)
            continue
        try:
            with open(f, "rb") as fh:
                if fh.read(132)[128:] == b"DICM":
                    found.append(f)
        except OSError:
            pass
    return found


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _from_class_dirs(root: Path, kind: str, class_dirs: dict[str, list[Path]], notes: list[str]) -> DatasetLayout:
    classes = sorted(class_dirs, key=natural_key) if kind == "generic" else list(class_dirs)
    files, other, bad_names = [], [], []
    for label in classes:
        for folder in class_dirs[label]:
            for f in _walk_files(folder):
                rel = f.relative_to(root).as_posix()
                if not _is_utf8(rel):
                    bad_names.append(printable(rel))
                elif is_image_name(f):
                    files.append(ImageFile(rel, label))
                else:
                    other.append(rel)
    rel_dirs = {c: [d.relative_to(root).as_posix() or "." for d in ds] for c, ds in class_dirs.items()}
    if bad_names:
        notes = [*notes, f"{len(bad_names)} files skipped: their names are not valid UTF-8 (first: {bad_names[0]}); "
                         "rename them to include them"]
    return DatasetLayout(root, kind, classes, rel_dirs, files, other, notes)


def _match_named(folder: Path, names: dict[str, str]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for sub in _subdirs(folder):
        label = names.get(sub.name.lower())
        if label:
            found.setdefault(label, []).append(sub)
    # keep the canonical class order of the table
    order = list(dict.fromkeys(names.values()))
    return {c: found[c] for c in order if c in found}


def _has_images(folder: Path) -> bool:
    return any(is_image_name(f) for f in _walk_files(folder))


def detect_layout(root: str | os.PathLike, min_classes: int = 2) -> DatasetLayout:
    """Find the data set under ``root``; raise :class:`LungedgeError` if there is none. ``min_classes=1``
    (a test folder: ``eval --data``) also takes a single class folder, e.g. only ``Malignant cases``, which
    is named as the data set names it; a named folder beside unnamed image folders is not taken alone."""
    root = Path(root).expanduser()
    if not root.exists():
        raise LungedgeError(f"data folder not found: {root}")
    if not root.is_dir():
        raise LungedgeError(f"not a folder: {root}")
    root = root.resolve()

    def enough(folder: Path, found: dict) -> bool:
        if len(found) >= 2:
            return True
        named = {d for ds in found.values() for d in ds}
        return min_classes == 1 and len(found) == 1 and all(s in named for s in _subdirs(folder) if _has_images(s))

    for folder in _candidates(root):
        found = _match_named(folder, IQ_OTH_FOLDERS)
        if enough(folder, found):
            return _checked(_from_class_dirs(root, "iq-oth-nccd", found, []), min_classes)

    for folder in _candidates(root):
        found = _match_named(folder, LC25000_FOLDERS)
        if enough(folder, found):
            notes = []
            colon = [d for d in _candidates(root) if d.name.lower() in LC25000_COLON]
            if colon:
                rel = colon[0].relative_to(root).as_posix()
                notes.append(f"the colon part ({rel}) is a separate task and is not included")
            return _checked(_from_class_dirs(root, "lc25000-lung", found, notes), min_classes)

    folder = root
    for _ in range(MAX_WRAPPING + 1):
        subs = _subdirs(folder)
        with_images = [s for s in subs if _has_images(s)]
        direct_images = [f for f in folder.iterdir() if f.is_file() and is_image_name(f)]
        if len(with_images) >= 2 or (with_images and direct_images):
            break
        if len(subs) == 1 and not direct_images and not any(is_image_name(f) for f in subs[0].iterdir()):
            folder = subs[0]  # a wrapping folder, not a class folder
            continue
        break
    class_dirs = {s.name: [s] for s in _subdirs(folder) if _has_images(s)}
    return _checked(_from_class_dirs(root, "generic", class_dirs, []), min_classes)


def _checked(layout: DatasetLayout, min_classes: int = 2) -> DatasetLayout:
    if not layout.files:
        dicom = _dicom_files(layout.root)
        if dicom:
            from ..preprocess import DICOM_ADVICE

            raise LungedgeError(f"no images found in {layout.root}, but DICOM files ({dicom[0].relative_to(layout.root)}"
                                f"{' and more' if len(dicom) > 1 else ''}); {DICOM_ADVICE}")
        raise LungedgeError(f"no images found in {layout.root} (expected one folder per class)")
    if len(layout.classes) < min_classes:
        only = layout.classes[0] if layout.classes else "?"
        raise LungedgeError(
            f"only one class ({only}) found in {layout.root}; a classifier needs at least 2 class folders"
        )
    return layout
