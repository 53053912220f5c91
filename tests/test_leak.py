"""eval's leakage check: test images byte-identical to, or near-duplicates of, the training/validation images
of the model's split (lungedge.data.leak), its warning line and its report label. Tiny generated images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import augmented_rotation, ct_like_image, smooth_image, write_dataset
from lungedge.data import dedup
from lungedge.data.leak import cache_path, trained_on
from lungedge.data.split import make_split, write_manifest


@pytest.fixture
def split(tmp_path):
    """(manifest, its path, data root): 3 classes x 8 images, each with a flipped copy (grouped together)."""
    root = write_dataset(tmp_path / "data", ["benign", "malignant", "normal"], per_class=8, copies=2)
    manifest = make_split(root, show_progress=False)
    return manifest, write_manifest(manifest, tmp_path / "split.json"), Path(manifest["dataset"]["root"])


def _of(manifest, part):
    return [it for it in manifest["items"] if it["split"] == part]


def _test_folder(tmp_path, manifest, root) -> Path:
    """Re-encoded, resized, rotated/flipped copies of training and validation images, one byte-identical copy,
    the split's own test images and strangers."""
    out = tmp_path / "test" / "benign"
    out.mkdir(parents=True)
    train, val = _of(manifest, "train"), _of(manifest, "val")
    img = lambda it: Image.open(root / it["path"]).convert("L")  # noqa: E731
    img(train[0]).save(out / "reencoded.jpg", quality=92)  # the same picture, other bytes
    img(train[2]).resize((62, 62), Image.BILINEAR).save(out / "resized.png")  # 2 px smaller
    augmented_rotation(img(train[4]).transpose(Image.FLIP_LEFT_RIGHT), 10).save(out / "augmented.png")
    img(val[0]).save(out / "val-reencoded.jpg", quality=92)
    shutil.copy(root / train[6]["path"], out / "identical.png")
    for k, it in enumerate(_of(manifest, "test")):
        shutil.copy(root / it["path"], out / f"test{k}.png")
    rng = np.random.default_rng(99)
    for k in range(3):
        smooth_image(rng, 64).save(out / f"stranger{k}.png")
    return out


def test_copies_of_training_images_are_counted_apart_from_byte_identical_ones(split, tmp_path):
    manifest, path, root = split
    folder = _test_folder(tmp_path, manifest, root)
    paths = sorted(folder.iterdir())
    leak = trained_on(manifest, paths, show_progress=False)
    near = leak["near_duplicates"]
    assert (leak["in_training"], leak["in_validation"]) == (1, 0)  # byte-identical, as before
    assert (near["in_training"], near["in_validation"]) == (3, 1)  # re-encoded, resized, augmented; validation
    assert near["threshold"] == manifest["params"]["threshold"] and near["not_checked"] == 0
    assert near["compared_with"] == len(_of(manifest, "train")) + len(_of(manifest, "val"))
    named = {Path(e["test_image"]).name: e for e in near["examples"]}
    source = _of(manifest, "train")[4]  # the augmented copy's best match: its source or the source's flipped copy
    assert named["augmented.png"]["near"] in {it["path"] for it in manifest["items"] if it["group"] == source["group"]}
    assert all(e["similarity"] >= near["threshold"] for e in near["examples"])


def test_the_splits_own_test_part_has_no_near_duplicate_in_training(split):
    """Grouped at the same threshold and centred by the same mean (the manifest's whole data set), the split's
    test part is leak-free, as `data audit` counts it."""
    manifest, _, root = split
    leak = trained_on(manifest, [root / it["path"] for it in _of(manifest, "test")], show_progress=False)
    assert (leak["in_training"], leak["in_validation"]) == (0, 0)
    assert (leak["near_duplicates"]["in_training"], leak["near_duplicates"]["in_validation"]) == (0, 0)


TURNS = {"turned90": Image.ROTATE_90, "turned180": Image.ROTATE_180, "turned270": Image.ROTATE_270,
         "upside-down": Image.FLIP_TOP_BOTTOM}


def test_a_turned_ct_slice_is_a_near_duplicate_of_its_training_slice_and_turned_strangers_are_not(tmp_path):
    """CT slices share most of their picture (the body, the lungs, the spine, the table): the mean slice removed
    first must be turned with the slice, or a training slice turned by 90 degrees is missed (similarity ~0.7)."""
    rng = np.random.default_rng(1)
    for folder in ("benign", "malignant", "normal"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i in range(8):
            ct_like_image(rng).save(tmp_path / "data" / folder / f"slice{i}.png")
    manifest = make_split(tmp_path / "data", show_progress=False)
    root = Path(manifest["dataset"]["root"])
    assert manifest["groups"] == 24  # no two slices are near-duplicates
    source = _of(manifest, "train")[0]
    out = tmp_path / "test"
    out.mkdir()
    with Image.open(root / source["path"]) as im:
        for name, how in TURNS.items():
            im.transpose(how).save(out / f"{name}.png")
    for name, how in TURNS.items():  # unrelated slices, turned the same ways, and two upright ones
        ct_like_image(rng).transpose(how).save(out / f"stranger-{name}.png")
    for k in range(2):
        ct_like_image(rng).save(out / f"stranger{k}.png")
    for k, it in enumerate(_of(manifest, "test")):
        shutil.copy(root / it["path"], out / f"test{k}.png")
    leak = trained_on(manifest, sorted(out.iterdir()), show_progress=False)
    near = leak["near_duplicates"]
    assert (leak["in_training"], leak["in_validation"]) == (0, 0)
    assert (near["in_training"], near["in_validation"]) == (len(TURNS), 0)  # the turned copies, nothing else
    assert {Path(e["test_image"]).stem for e in near["examples"]} <= set(TURNS)
    assert all(e["near"] == source["path"] and e["similarity"] > 0.99 for e in near["examples"])


def test_missing_training_files_are_counted_and_checked_by_sha256_only(split, tmp_path):
    from lungedge.evaluate import leakage_line

    manifest, path, root = split
    folder = _test_folder(tmp_path, manifest, root)
    train = _of(manifest, "train")
    gone = [it for it in train if it["group"] == train[0]["group"]] + [train[6]]  # the re-encoded one's source
    for it in gone:  # (and its flipped copy), the byte-identical one's source
        (root / it["path"]).unlink()
    leak = trained_on(manifest, sorted(folder.iterdir()), show_progress=False)
    near = leak["near_duplicates"]
    assert leak["in_training"] == 1  # the manifest's SHA-256 still knows the deleted file
    assert near["not_checked"] == len(gone) == 3 and near["first_not_checked"]["reason"] == "missing"
    assert near["in_training"] == 2  # the re-encoded copy of a deleted image cannot be compared
    line = leakage_line("m", {"checked_against": str(path), **leak})
    assert line.startswith("WARNING m: 4 of the") and "1 byte-identical to training images" in line
    assert "2 near-duplicates of training images and 1 of validation images" in line
    assert "3 of the" in line and "could not be read" in line and "only their SHA-256 was checked" in line
    clean = trained_on(manifest, [root / it["path"] for it in _of(manifest, "test")], show_progress=False)
    note = leakage_line("m", {"checked_against": str(path), **clean})  # nothing found, but not "no leak"
    assert note.startswith("note m: no test image") and "3 of the" in note and "only their SHA-256" in note
    assert f"nor a near-duplicate of the {len(_of(manifest, 'train')) + len(_of(manifest, 'val')) - 3} of them" in note


def test_the_training_thumbnails_are_cached_beside_the_manifest(split, tmp_path):
    manifest, path, root = split
    folder = _test_folder(tmp_path, manifest, root)
    paths = sorted(folder.iterdir())
    cache = cache_path(path)
    first = trained_on(manifest, paths, cache=cache, show_progress=False)
    assert cache.is_file() and first["near_duplicates"]["from_cache"] == 0
    for it in _of(manifest, "train") + _of(manifest, "val"):  # the training images are gone now
        (root / it["path"]).unlink()
    again = trained_on(manifest, paths, cache=cache, show_progress=False)
    assert again["near_duplicates"]["from_cache"] == first["near_duplicates"]["compared_with"]
    assert {k: again["near_duplicates"][k] for k in ("in_training", "in_validation", "not_checked")} == \
        {k: first["near_duplicates"][k] for k in ("in_training", "in_validation", "not_checked")}
    cache.write_bytes(b"not a cache")  # unreadable: ignored, never an error
    broken = trained_on(manifest, paths, cache=cache, show_progress=False)
    assert broken["near_duplicates"]["not_checked"] == first["near_duplicates"]["compared_with"]
    assert broken["in_training"] == 1


def test_similar_across_is_the_cross_part_of_the_dense_matrix_at_every_block_size(monkeypatch):
    rng = np.random.default_rng(7)
    images = [ct_like_image(rng, 96) for _ in range(10)] + [smooth_image(rng, 96) for _ in range(2)]
    images[7] = images[7].rotate(90)  # a turned slice on each side: both sides' turned-back rows are compared
    images += [im.rotate(90) for im in images[:3]] + [augmented_rotation(im, -10) for im in images[10:12]]
    thumbs = np.stack([np.asarray(im.resize((64, 64), Image.BILINEAR)) for im in images])
    feats = dedup.features(thumbs)
    n, k, d = feats.shape
    assert {7, 12, 13, 14} <= set(dedup._turned_probes(feats)[0].tolist())
    probes = feats[:, [0, *range(dedup.VARIANTS, k)]]  # plain and turned-back rows, against every row
    sim = (probes.reshape(-1, d) @ feats.reshape(n * k, d).T).reshape(n, -1, n, k).max(axis=(1, 3))
    sim = np.maximum(sim, sim.T)
    a, b = [12, 13, 14, 15, 16, 8, 9], [*range(8), 10, 11]  # the copies (of 0, 1, 2, 10, 11) and two strangers
    for threshold in (0.3, dedup.DEFAULT_THRESHOLD):
        expect = [(i, j) for i in range(len(a)) for j in range(len(b)) if sim[a[i], b[j]] >= threshold]
        assert {(0, 0), (1, 1), (2, 2), (3, 8), (4, 9)} <= set(expect)
        for block_bytes in (1, 3 * len(b) * k * 4, dedup.BLOCK_BYTES):  # 1 row, 3 rows, all
            monkeypatch.setattr(dedup, "BLOCK_BYTES", block_bytes)
            i, j, v = dedup.similar_across(feats[a], feats[b], threshold)
            assert list(zip(i.tolist(), j.tolist())) == expect
            np.testing.assert_allclose(v, sim[np.array(a)[i], np.array(b)[j]], atol=1e-5)
    assert [len(x) for x in dedup.similar_across(feats[:0], feats, 0.5)] == [0, 0, 0]


def test_variants_are_the_cached_rotations_turned_and_flipped():
    """variants() as it was written before rotations() was split out: Pillow's rotation per angle, then
    each as it is and flipped, turned by 0/90/180/270 degrees; rotations() is exact in uint8."""
    import math

    thumb = np.random.default_rng(8).integers(0, 256, size=(64, 64), dtype=np.uint8)
    img, ref = Image.fromarray(thumb), []
    for ang in sorted(dedup.ANGLES, key=abs):
        zoom = math.cos(math.radians(abs(ang))) + math.sin(math.radians(abs(ang)))
        off = (64 - 64 / zoom) / 2
        rot = np.asarray(img.rotate(ang, Image.BILINEAR).crop((off, off, 64 - off, 64 - off))
                         .resize((dedup.SIDE, dedup.SIDE), Image.BILINEAR), dtype=np.float32)
        ref += [np.rot90(u, t) for u in (rot, rot[:, ::-1]) for t in range(4)]
    rots = dedup.rotations(thumb)
    assert rots.dtype == np.uint8 and rots.shape == (len(dedup.ANGLES), dedup.SIDE, dedup.SIDE)
    np.testing.assert_array_equal(dedup.variants(thumb), np.stack(ref))
    np.testing.assert_array_equal(dedup.features_of_rotations(rots[None].repeat(2, 0)),
                                  dedup.features(np.stack([thumb, thumb])))


def test_the_warning_and_the_report_name_both_kinds():
    from lungedge.evaluate import leakage_line
    from lungedge.report import test_set_label

    leak = {"checked_against": "split.json", "images": 20, "in_training": 2, "in_validation": 1,
            "how": "byte-identical files (SHA-256)",
            "near_duplicates": {"in_training": 5, "in_validation": 3, "threshold": 0.88, "compared_with": 90,
                                "not_checked": 0, "first_not_checked": None, "root": "/d"}}
    line = leakage_line("m", leak)
    assert "\n" not in line and line.startswith("WARNING m: 11 of the 20 test images are training or validation "
                                                "images of split.json or near-copies of them")
    assert "2 byte-identical to training images and 1 to validation images, 5 near-duplicates of training " \
           "images and 3 of validation images" in line
    row = {"test_set": "all 20 images of t", "metrics": {"n": 20}, "leakage": leak}
    label = test_set_label(row)
    assert "2 in training, 1 in validation (byte-identical)" in label
    assert "5 in training, 3 in validation (near-duplicates, similarity ≥ 0.88)" in label
    leak["near_duplicates"].update(in_training=0, in_validation=0, not_checked=4,
                                   first_not_checked={"path": "a.png", "reason": "missing"})
    leak.update(in_training=0, in_validation=0)
    assert leakage_line("m", leak).startswith("note m:")
    assert "not checked against 4 of 94 training/validation images" in test_set_label(row)
    leak["near_duplicates"]["not_checked"] = 0
    assert leakage_line("m", leak) is None and test_set_label(row) == "all 20 images of t (20 images)"
    del leak["near_duplicates"]  # a row written before near-duplicates were looked for
    assert "near-duplicates of training images not checked" in test_set_label(row)
    assert json.dumps(leak)  # plain JSON
