"""Which test images a model has already seen: byte-identical to, or near-duplicates of, the training and
validation images of the split manifest it was trained with (``lungedge eval``'s leakage check).

* **Byte-identical**: the test file's SHA-256 against the ``sha256`` the manifest records for every image, so
  it needs no training file on disk.
* **Near-duplicates** (the same CT slice re-encoded, resized or re-saved, turned by 90/180/270 degrees or
  flipped, the neighbouring slice of a scan, a rotated/flipped LC25000 copy): the machinery ``data split``
  groups with and ``data audit`` counts with (:mod:`lungedge.data.dedup`: 64x64 grayscale thumbnails, 88
  rotated/flipped variants, an image that looks turned also centred by the mean turned the same way, best
  correlation at the manifest's grouping threshold), between the test images and those training/validation
  images whose file is still on disk, readable and unchanged since the split (SHA-256 as recorded). The others
  cannot be compared by their pixels: they are counted in ``not_checked`` and only their SHA-256 was checked.

Each test image is counted once, in the first of: byte-identical to a training image, to a validation image,
near-duplicate of a training image, of a validation image.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..ui import progress
from . import dedup
from .layout import ImageFile
from .scan import scan

PARTS = ("train", "val")
EXAMPLES = 3  # near-duplicate pairs kept in the result, to look at
CACHE_FORMAT = "lungedge-near-duplicate-cache/1"


def cache_path(manifest_path: str | Path) -> Path:
    """Where the training images' rotated thumbnails are kept: beside the manifest (``split.json.near-dup.npz``)."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.name + ".near-dup.npz")


def _cache_key() -> str:
    """What the cached rotations depend on: a change of any of these makes the cache stale."""
    import json

    import PIL

    from .scan import THUMB

    return json.dumps({"format": CACHE_FORMAT, "thumb": THUMB, "angles": list(dedup.ANGLES), "side": dedup.SIDE,
                       "pillow": PIL.__version__}, sort_keys=True)


def _read_cache(path: Path | None) -> dict[str, np.ndarray]:
    """SHA-256 -> rotations (:func:`dedup.rotations`) of the images cached at ``path``; {} when there is none
    or it is stale or unreadable (it is only a cache: it is rebuilt)."""
    if path is None or not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != _cache_key():
                return {}
            rots, shas = z["rotations"], z["sha256"]
            if rots.dtype != np.uint8 or rots.shape[1:] != (len(dedup.ANGLES), dedup.SIDE, dedup.SIDE) \
                    or len(rots) != len(shas):
                return {}
            return {str(h): r for h, r in zip(shas, rots)}
    except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, zipfile.BadZipFile):
        return {}


def _write_cache(path: Path, rots: dict[str, np.ndarray]) -> None:
    """Keep ``rots`` at ``path`` (atomically: a reader never sees half a file); a folder that cannot be written
    is no error, the next eval computes them again."""
    import io

    from ..errors import LungedgeError
    from ..io import atomic_write_bytes

    buf = io.BytesIO()
    shas = sorted(rots)
    np.savez(buf, key=np.array(_cache_key()), sha256=np.array(shas, dtype="U64"),
             rotations=np.stack([rots[h] for h in shas]) if shas else
             np.zeros((0, len(dedup.ANGLES), dedup.SIDE, dedup.SIDE), np.uint8))
    try:
        atomic_write_bytes(path, buf.getvalue())
    except (LungedgeError, OSError):
        pass


def _sha256(path) -> str | None:
    from ..io import sha256_file

    try:
        return sha256_file(path)
    except OSError:  # gone since eval read it: compared by nothing
        return None


def _trained_rotations(items: list[dict], root: Path, cache: Path | None, show_progress
                       ) -> tuple[list[int], np.ndarray, list[dict], int]:
    """The training/validation items whose pixels are known: (their indices in ``items``, their rotations,
    the others as {"path", "reason"}, how many came from the cache). An item's pixels are those of the bytes
    the manifest recorded (its SHA-256): from the cache, else from its file when that is still there,
    readable and unchanged since the split."""
    cached = _read_cache(cache)
    todo = [k for k, it in enumerate(items) if it["sha256"] not in cached]
    with progress(len(todo), "reading training images", show_progress) as advance:
        records = scan(root, [ImageFile(items[k]["path"], "") for k in todo], thumbs=True, progress=advance)
    known = {h: r for h, r in cached.items()}
    bad: list[dict] = []
    for k, rec in zip(todo, records):
        it = items[k]
        if not rec.ok:
            bad.append({"path": it["path"], "reason": "missing" if not (root / it["path"]).exists() else rec.error})
        elif rec.sha256 != it["sha256"]:
            bad.append({"path": it["path"], "reason": "changed since the split"})
        elif it["sha256"] not in known:
            known[it["sha256"]] = dedup.rotations(rec.thumb)
    if cache is not None and len(known) > len(cached):  # new ones: keep those of this manifest
        mine = {it["sha256"] for it in items}
        _write_cache(cache, {h: r for h, r in known.items() if h in mine})
    ok = [k for k, it in enumerate(items) if it["sha256"] in known]
    rots = np.stack([known[items[k]["sha256"]] for k in ok]) if ok else np.zeros((0, len(dedup.ANGLES), dedup.SIDE,
                                                                                     dedup.SIDE), np.uint8)
    return ok, rots, bad, sum(1 for it in items if it["sha256"] in cached)


def trained_on(manifest: dict, paths: list[Path], root: Path | None = None, threshold: float | None = None,
               cache: Path | None = None, show_progress: bool | None = None, scanned: dict | None = None) -> dict:
    """Count the images ``paths`` that are byte-identical to, or near-duplicates of, the training ("train")
    and validation ("val") images of ``manifest`` (read from ``root``, default the manifest's own root).

    The near-duplicate threshold is the manifest's grouping threshold (``params.threshold``; the default
    0.88 for an image-level split), so that the split's own test part, grouped at that threshold, has none.

    Which mean is removed: :func:`dedup.features` centres every variant by the mean variant of the images
    it is given, so that the anatomy all of them share (every CT slice's body outline) does not count as
    similarity. Here that is the union of the training/validation images whose pixels are known and the
    test images that are not byte-identical to one of them (those are already counted and add nothing): for
    the split's own test part, or the data set's folder, that union is the manifest's whole data set, the
    very mean ``data split`` and ``data audit`` used, so the three agree. A mean of the training images
    alone would not centre a test set from elsewhere (another scanner, the other data set), and would read
    what its images share as similarity to every training image. A test image that looks turned (the mean
    turned by 90/180/270 degrees fits it better, where the images share an anatomy: :func:`dedup.turned_back`)
    is also compared centred by that turned mean, exactly as a training image's variant turned the same way
    is centred.

    ``cache`` (:func:`cache_path`): the training images' rotated thumbnails (:func:`dedup.rotations`,
    4.4 KB per image, keyed by SHA-256) are kept there, so a second eval against the same split reads no
    training file; a cached image is compared even if its file is gone since (its pixels are those of the
    bytes the manifest recorded). ``scanned`` (path -> :class:`lungedge.data.scan.ScannedImage` with its
    thumbnail): test images already read, e.g. by :meth:`lungedge.testset.TestImages.group_by_pixels`, are not
    decoded again.

    Time: reading the test images and their 88 variants (a few ms each), the training images' the same
    unless cached, and len(test) x len(training) comparisons a block at a time, twice more for an image that
    looks turned (:func:`dedup.similar_across`); memory: 144 KB of features per image of the union plus one
    block. The cache need not change with the turned-back rows: they are computed from the cached rotations
    (angle 0 is the plain thumbnail) at each eval, as the mean they depend on is the union's.
    """
    threshold = threshold or (manifest.get("params") or {}).get("threshold") or dedup.DEFAULT_THRESHOLD
    root = Path(root) if root else Path(manifest["dataset"]["root"])
    items = [it for it in manifest["items"] if it.get("split") in PARTS]
    part_of_hash: dict[str, str] = {}
    for it in items:  # a hash in both parts counts as training
        if it.get("sha256") and part_of_hash.get(it["sha256"]) != "train":
            part_of_hash[it["sha256"]] = it["split"]

    identical = [part_of_hash.get(_sha256(p)) for p in paths]
    others = [k for k, part in enumerate(identical) if part is None]  # only these are decoded
    tests = {k: scanned[str(paths[k])] for k in others if str(paths[k]) in (scanned or {})}
    todo = [k for k in others if k not in tests]
    with progress(len(todo), "reading test images", show_progress) as advance:
        tests.update(zip(todo, scan(Path(), [ImageFile(str(paths[k]), "") for k in todo], thumbs=True,
                                    progress=advance)))
    query = [k for k in others if tests[k].ok]

    known, trained_rots, not_checked, from_cache = _trained_rotations(items, root, cache, show_progress)
    near: list[str | None] = [None] * len(paths)
    examples: list[dict] = []
    if query and known:
        with progress(2 * len(query), "looking for near-duplicates", show_progress) as advance:
            query_rots = np.empty((len(query), *trained_rots.shape[1:]), np.uint8)
            for n, k in enumerate(query):
                query_rots[n] = dedup.rotations(tests[k].thumb)
                advance(1)
            feats = dedup.features_of_rotations(np.concatenate([trained_rots, query_rots]))
            del query_rots
            qi, ti, sim = dedup.similar_across(feats[len(known):], feats[: len(known)], threshold, advance)
            del feats
        best: dict[int, tuple[int, float, str]] = {}  # query index -> (trained item, similarity, part)
        for q, t, v in zip(qi.tolist(), ti.tolist(), sim.tolist()):
            part, old = items[known[t]]["split"], best.get(q)
            if old is None or (part, -v) < (old[2], -old[1]):  # "train" before "val", then the most similar
                best[q] = (known[t], v, part)
        for q, (t, v, part) in sorted(best.items()):
            near[query[q]] = part
            if len(examples) < EXAMPLES:
                examples.append({"test_image": str(paths[query[q]]), "near": items[t]["path"], "part": part,
                                 "similarity": round(float(v), 4)})
    return {
        "images": len(paths),
        "in_training": identical.count("train"),
        "in_validation": identical.count("val"),
        "how": "byte-identical files (SHA-256)",
        "near_duplicates": {
            "in_training": near.count("train"),
            "in_validation": near.count("val"),
            "threshold": threshold,
            "compared_with": len(known),
            "from_cache": from_cache,
            "not_checked": len(not_checked),
            "first_not_checked": not_checked[0] if not_checked else None,
            "root": str(root),
            "test_images_not_compared": len(others) - len(query),
            "examples": examples,
            "how": (f"pixel similarity >= {threshold:g} as data split groups them (lungedge.data.dedup: 64x64 "
                    "grayscale thumbnails, best correlation over 88 rotations/flips, centred by the mean of "
                    "the test and training/validation images, or by that mean turned for an image that looks "
                    "turned); training/validation images not readable on disk were checked by SHA-256 only"),
        },
    }
