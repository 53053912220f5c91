"""Data layer: layouts, inspect, grouped split, audit, and every bad input the issue names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import augmented_rotation, ct_like_image, one_error, require_real, run_cli, smooth_image, write_dataset
from lungedge.data import dedup
from lungedge.data.layout import detect_layout

IQ_FOLDERS = ["Bengin cases", "Malignant cases", "Normal cases"]


# -- layouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("wrapping", [[], ["The IQ-OTHNCCD lung cancer dataset"], ["outer", "inner dataset"]])
def test_iq_oth_layout_under_wrapping_folders(tmp_path, wrapping):
    base = tmp_path.joinpath("iq", *wrapping)
    write_dataset(base, IQ_FOLDERS, per_class=2)
    (base / "IQ-OTH_NCCD lung cancer dataset.txt").write_text("readme")
    layout = detect_layout(tmp_path / "iq")
    assert layout.kind == "iq-oth-nccd"
    assert layout.classes == ["Benign", "Malignant", "Normal"]
    assert layout.counts() == {"Benign": 2, "Malignant": 2, "Normal": 2}
    assert all(f.path.startswith("/".join(wrapping)) for f in layout.files)


def test_lc25000_layout_leaves_out_the_colon_part(tmp_path):
    root = tmp_path / "lc"
    sets = root / "lung_colon_image_set"
    write_dataset(sets / "lung_image_sets", ["lung_aca", "lung_n", "lung_scc"], per_class=2, colour=True)
    write_dataset(sets / "colon_image_sets", ["colon_aca", "colon_n"], per_class=2, colour=True)
    layout = detect_layout(root)
    assert layout.kind == "lc25000-lung"
    assert layout.classes == ["Adenocarcinoma", "Benign", "Squamous cell carcinoma"]
    assert len(layout.files) == 6
    assert not any("colon_image_sets" in f.path for f in layout.files)
    assert any("colon" in n for n in layout.notes)


def test_generic_layout_under_one_wrapping_folder(tmp_path):
    write_dataset(tmp_path / "wrap" / "inner", ["b_class", "a_class"], per_class=3)
    (tmp_path / "wrap" / "inner" / "a_class" / "notes.txt").write_text("not an image")
    layout = detect_layout(tmp_path / "wrap")
    assert layout.kind == "generic"
    assert layout.classes == ["a_class", "b_class"]
    assert layout.counts() == {"a_class": 3, "b_class": 3}
    assert layout.other_files == ["inner/a_class/notes.txt"]


# -- bad input ---------------------------------------------------------------------------

def test_missing_folder(tmp_path, capsys):
    code, out, err = run_cli(["data", "inspect", tmp_path / "nope"], capsys)
    assert code == 2
    assert err.strip() == f"error: data folder not found: {tmp_path / 'nope'}"


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["data", "split", tmp_path / "empty", "--out", tmp_path / "m.json"], capsys)
    assert code == 2
    assert err.startswith("error: no images found") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.json").exists()


def test_only_one_class(tmp_path, capsys):
    write_dataset(tmp_path / "one", ["only"], per_class=3)
    code, _, err = run_cli(["data", "inspect", tmp_path / "one"], capsys)
    assert code == 2
    assert "only one class (only)" in err and len(err.strip().splitlines()) == 1


def _corrupt_files(root: Path):
    """A truncated JPEG and a non-image with an image extension, inside a class folder."""
    img = smooth_image(np.random.default_rng(7), 64).convert("RGB")
    good = root / "cat_a" / "good.jpg"
    img.save(good, quality=90)
    data = good.read_bytes()
    (root / "cat_a" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "cat_b" / "fake.png").write_text("this is not a picture")


DICOM = bytes(128) + b"DICM" + b"\x02\x00\x00\x00" * 16  # the preamble and marker every DICOM file starts with


def _not_images(root: Path):
    """What sits under an image's name in real folders: a Git LFS pointer, a DICOM slice, a saved login page,
    an empty file."""
    (root / "cat_b" / "lfs.png").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    (root / "cat_b" / "slice.png").write_bytes(DICOM)
    (root / "cat_a" / "page.jpg").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    (root / "cat_a" / "empty.png").write_bytes(b"")


def test_inspect_lists_unreadable_files_and_identical_files(generic_dataset, capsys):
    _corrupt_files(generic_dataset)
    _not_images(generic_dataset)
    (generic_dataset / "cat_c" / "copy.png").write_bytes((generic_dataset / "cat_c" / "img000_0.png").read_bytes())
    code, out, err = run_cli(["data", "inspect", generic_dataset, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["counts"] == {"cat_a": 28, "cat_b": 27, "cat_c": 25}
    reasons = {u["path"]: u["reason"] for u in info["unreadable"]}
    assert set(reasons) == {"cat_a/truncated.jpg", "cat_b/fake.png", "cat_b/lfs.png", "cat_b/slice.png",
                            "cat_a/page.jpg", "cat_a/empty.png"}
    assert reasons["cat_b/fake.png"] == "not an image file"
    assert reasons["cat_b/lfs.png"] == "a Git LFS pointer, not the image: run `git lfs pull`"
    assert reasons["cat_b/slice.png"].startswith("a DICOM file; lungedge reads image files (PNG, JPEG, TIFF, BMP)")
    assert reasons["cat_a/page.jpg"].startswith("an HTML page, not an image")
    assert reasons["cat_a/empty.png"] == "empty file (0 bytes): an interrupted download or copy?"
    assert "truncated" in reasons["cat_a/truncated.jpg"]
    assert info["readable_counts"] == {"cat_a": 25, "cat_b": 24, "cat_c": 25}
    assert sorted(map(sorted, info["identical"])) == [["cat_c/copy.png", "cat_c/img000_0.png"]]


def test_a_folder_of_dicom_files_says_so(tmp_path, capsys):
    for name in ("benign/IM0001", "malignant/s1.dcm"):  # scanners often write no suffix
        (tmp_path / "ct" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ct" / name).write_bytes(DICOM)
    code, _, err = run_cli(["data", "inspect", tmp_path / "ct"], capsys)
    one_error(code, err, match=r"no images found in .*ct, but DICOM files \(benign/IM0001 and more\); lungedge reads "
                               r"image files \(PNG, JPEG, TIFF, BMP\); export the slices as PNG with the window")


def test_split_skips_unreadable_files_and_says_so(generic_dataset, tmp_path, capsys):
    _corrupt_files(generic_dataset)
    out_file = tmp_path / "m.json"
    code, out, err = run_cli(["data", "split", generic_dataset, "--out", out_file], capsys)
    assert code == 0, err
    manifest = json.loads(out_file.read_text())
    assert {s["path"] for s in manifest["skipped"]} == {"cat_a/truncated.jpg", "cat_b/fake.png"}
    assert "cat_a/truncated.jpg" not in {it["path"] for it in manifest["items"]}
    assert "skipped cat_a/truncated.jpg" in out


def test_manifest_whose_files_changed_is_refused(generic_dataset, tmp_path, capsys):
    out_file = tmp_path / "m.json"
    assert run_cli(["data", "split", generic_dataset, "--out", out_file], capsys)[0] == 0
    smooth_image(np.random.default_rng(99)).save(generic_dataset / "cat_b" / "img001_0.png")
    code, _, err = run_cli(["data", "audit", out_file], capsys)
    assert code == 2
    assert "changed since the split" in err and "cat_b/img001_0.png" in err
    assert len(err.strip().splitlines()) == 1


def test_manifest_that_is_not_a_manifest(tmp_path, capsys):
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    code, _, err = run_cli(["data", "audit", bad], capsys)
    assert code == 2 and "not a split manifest" in err


@pytest.mark.parametrize("args,message", [(["--val", "0.6", "--test", "0.5"], "must leave images"),
                                          (["--test", "1.5"], "--test must be a fraction"),
                                          (["--val", "0"], "--val must be more than 0: training picks"),
                                          (["--group-by", "patient"], "unknown --group-by")])
def test_bad_split_parameters(generic_dataset, tmp_path, capsys, args, message):
    code, _, err = run_cli(["data", "split", generic_dataset, "--out", tmp_path / "m.json", *args], capsys)
    assert code == 2 and message in err and not (tmp_path / "m.json").exists()


def test_existing_manifest_survives_a_failed_split(generic_dataset, tmp_path, capsys):
    out_file = tmp_path / "m.json"
    out_file.write_text("precious")
    code, _, _ = run_cli(["data", "split", generic_dataset, "--out", out_file, "--test", "2"], capsys)
    assert code == 2
    assert out_file.read_text() == "precious"


# -- near-duplicates and the split -------------------------------------------------------------

def test_rotated_and_flipped_copies_are_near_duplicates_and_strangers_are_not():
    rng = np.random.default_rng(3)
    a = smooth_image(rng, 96)
    strangers = [smooth_image(rng, 96) for _ in range(30)]
    copies = [a, a.transpose(Image.FLIP_TOP_BOTTOM), a.rotate(270), augmented_rotation(a, -15)]
    thumbs = np.stack([np.asarray(im.resize((64, 64), Image.BILINEAR)) for im in copies + strangers])
    pairs = dedup.duplicate_pairs(dedup.similar_pairs(dedup.features(thumbs), dedup.DEFAULT_THRESHOLD),
                                  dedup.DEFAULT_THRESHOLD)
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # the copies, and no stranger


def test_turned_ct_slices_join_their_source_and_strangers_join_nothing():
    """The mean CT slice is removed before correlating; a slice turned by 90/180/270 degrees or upside down is
    compared centred by the mean turned the same way, so it joins its source's group (it did not: ~0.7), while
    unrelated slices stay apart."""
    rng = np.random.default_rng(4)
    a = ct_like_image(rng)
    turned = [a.transpose(t) for t in (Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270, Image.FLIP_TOP_BOTTOM)]
    strangers = [ct_like_image(rng) for _ in range(20)]
    thumbs = np.stack([np.asarray(im.resize((64, 64), Image.BILINEAR)) for im in [a, *turned, *strangers]])
    pairs = dedup.duplicate_pairs(dedup.similar_pairs(dedup.features(thumbs), dedup.DEFAULT_THRESHOLD),
                                  dedup.DEFAULT_THRESHOLD)
    assert {(0, k) for k in range(1, 5)} <= set(pairs)  # each turned copy with its source
    assert all(i < 5 and j < 5 for i, j in pairs)  # no stranger in any pair
    assert dedup.components(len(thumbs), pairs)[:6] == [0, 0, 0, 0, 0, 1]


def test_images_that_share_no_anatomy_are_compared_by_their_plain_rows_alone():
    """Tissue tiles (LC25000) share no anatomy: their mean is flat, so no turn of it explains a tile better, and
    turned-back rows would only add noise and time; the features are those of plain rows alone."""
    rng = np.random.default_rng(5)
    images = [smooth_image(rng, 96) for _ in range(12)]
    images += [im.rotate(90) for im in images[:4]]
    feats = dedup.features(np.stack([np.asarray(im.resize((64, 64), Image.BILINEAR)) for im in images]))
    np.testing.assert_array_equal(feats[:, dedup.VARIANTS :], feats[:, [0, 0]])
    assert [len(x) for x in dedup._turned_probes(feats)] == [0, 0]


def _dense_similarity(feats):
    """The N x N matrix of the definition, all at once: best correlation of an image's plain or turned-back rows
    (copies of the plain one for an image that does not look turned) over every row of the other, symmetric."""
    n, k, d = feats.shape
    probes = feats[:, [0, *range(dedup.VARIANTS, k)]]
    sim = (probes.reshape(-1, d) @ feats.reshape(n * k, d).T).reshape(n, -1, n, k).max(axis=(1, 3))
    sim = np.maximum(sim, sim.T)
    np.fill_diagonal(sim, -1.0)
    return sim


def test_streamed_pairs_are_the_dense_matrix_pairs_at_every_block_size(monkeypatch):
    rng = np.random.default_rng(5)
    images = [ct_like_image(rng, 96) for _ in range(8)] + [smooth_image(rng, 96) for _ in range(4)]
    images += [im.rotate(90) for im in images[:4]] + [augmented_rotation(im, 10) for im in images[8:11]]
    thumbs = np.stack([np.asarray(im.resize((64, 64), Image.BILINEAR)) for im in images])
    feats = dedup.features(thumbs)
    sim = _dense_similarity(feats)
    assert {12, 13, 14, 15} <= set(dedup._turned_probes(feats)[0].tolist())  # their turned-back rows are searched
    for threshold in (0.5, dedup.LOOSE_THRESHOLD, dedup.DEFAULT_THRESHOLD):
        i, j = np.nonzero(np.triu(sim >= threshold, 1))
        dense = list(zip(i.tolist(), j.tolist()))
        assert {(0, 12), (1, 13), (2, 14), (3, 15), (8, 16), (9, 17), (10, 18)} <= set(dense)  # the copies
        for block_bytes in (1, 5 * feats.shape[0] * feats.shape[1] * 4, dedup.BLOCK_BYTES):  # 1 row, 5 rows, all
            monkeypatch.setattr(dedup, "BLOCK_BYTES", block_bytes)
            found = dedup.similar_pairs(feats, threshold)
            assert dedup.duplicate_pairs(found, threshold) == dense
            np.testing.assert_allclose(found[2], sim[found[0], found[1]], atol=1e-5)  # each pair's larger direction
        found = dedup.similar_pairs(feats, 0.5)  # found once at the loosest, filtered at each (as audit does)
        assert dedup.duplicate_pairs(found, threshold) == dense


def test_features_are_the_plain_formula_computed_in_place(monkeypatch):
    rng = np.random.default_rng(6)
    thumbs = rng.integers(0, 256, size=(7, 64, 64), dtype=np.uint8)
    for i in (0, 1, 2, 4, 5):  # CT-like slices, the last turned by 90 degrees; a blank image and noise
        thumbs[i] = np.rot90(np.asarray(ct_like_image(rng)), 1 if i == 5 else 0)
    thumbs[3] = 0
    v = np.stack([dedup.variants(t) for t in thumbs])
    x = (v - v.mean(axis=0, keepdims=True)).reshape(7, v.shape[1], -1)
    x = x - x.mean(-1, keepdims=True)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    norm[norm == 0] = 1.0
    monkeypatch.setattr(dedup, "CHUNK", 3)  # chunks of 3, 3, 1
    steps = []
    feats = dedup.features(thumbs, steps.append)
    np.testing.assert_array_equal(feats[:, : dedup.VARIANTS], (x / norm).astype(np.float32))
    # the turned-back rows: the plain thumbnail less the mean one turned/flipped (variants 0..7), where one
    # turn, flipped or not, leaves TURNED_GAIN less of it unexplained than the mean as it is; else row 0
    centred = lambda y: y - y.mean(-1, keepdims=True)  # noqa: E731
    less = np.stack([centred(v[:, 0].reshape(7, -1) - v[:, e].mean(0).reshape(-1)) for e in range(8)], 1)
    energy = (less.astype(np.float64) ** 2).sum(-1)
    gain = 1 - energy / np.maximum(energy[:, :1], 1e-30)
    anatomy = centred(v[:, 0].mean(0).reshape(-1)).astype(np.float64)
    assert anatomy @ anatomy >= dedup.ANATOMY * energy[:, 0].mean()  # the CT-like slices share one
    for i in range(7):
        turn = 1 + int(np.argmax(np.maximum(gain[i, 1:4], gain[i, 5:8])))
        if max(gain[i, turn], gain[i, turn + 4]) < dedup.TURNED_GAIN:
            np.testing.assert_array_equal(feats[i, dedup.VARIANTS :], feats[i, [0, 0]])
            continue
        for row, e in zip(feats[i, dedup.VARIANTS :], (turn, turn + 4)):
            np.testing.assert_allclose(row, less[i, e] / np.linalg.norm(less[i, e]), atol=1e-6)
    looks_turned = {i for i in range(7) if (feats[i, dedup.VARIANTS :] != feats[i, 0]).any()}
    assert 5 in looks_turned and 3 not in looks_turned  # the turned slice does (noise may), a blank image never
    monkeypatch.setattr(dedup, "BLOCK_BYTES", 2 * feats.shape[1] * 7 * 4)  # blocks of 2 rows: 2, 2, 2, 1
    dedup.similar_pairs(feats, 0.9, steps.append)
    assert steps == [1] * 7 + [2, 2, 2, 1]  # the progress bar: one step per image, in each stage
    assert dedup.features(thumbs[:0]).shape == (0, v.shape[1] + dedup.TURNED, dedup.SIDE * dedup.SIDE)


def test_components_chain_pairs():
    assert dedup.components(6, [(0, 1), (1, 2), (4, 5)]) == [0, 0, 0, 1, 2, 2]
    assert dedup.components(5, [(4, 3), (3, 1)]) == [0, 1, 2, 1, 1]  # numbered by first appearance
    assert dedup.components(3, []) == [0, 1, 2]
    assert dedup.components(0, []) == []
    assert dedup.identical_pairs(["x", "y", "x", "x"]) == [(0, 2), (0, 3), (2, 3)]
    assert dedup.identical_sets(["x", "y", "z", "y", "x", "x"]) == [[0, 4, 5], [1, 3]]


def _groups_by_base(manifest):
    by_base = {}
    for it in manifest["items"]:
        base = it["path"].rsplit("_", 1)[0]
        by_base.setdefault(base, set()).add(it["split"])
    return by_base


def test_grouped_split_keeps_copies_together_and_is_stratified(tmp_path, capsys):
    root = write_dataset(tmp_path / "d", ["a", "b", "c"], per_class=10, copies=4)
    out_file = tmp_path / "m.json"
    code, out, err = run_cli(["data", "split", root, "--out", out_file, "--json"], capsys)
    assert code == 0, err
    manifest = json.loads(out_file.read_text())
    assert manifest["classes"] == ["a", "b", "c"]
    assert {"path", "label", "split", "group", "sha256"} <= set(manifest["items"][0])
    assert manifest["groups"] == 30
    assert all(len(splits) == 1 for splits in _groups_by_base(manifest).values())
    for cls in "abc":
        counts = {s: manifest["counts"][s][cls] for s in ("train", "val", "test")}
        assert counts["test"] > 0 and counts["val"] > 0 and counts["train"] >= counts["test"]
    summary = json.loads(out)
    assert summary["counts"] == manifest["counts"]


def test_16_bit_images_are_seen_stretched_as_the_model_sees_them(tmp_path, capsys):
    from lungedge.data.shortcut import FEATURES, image_features

    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    for cls in "ab":
        (root / cls).mkdir(parents=True)
        for i in range(4):  # 12-bit CT-like values, all above 255: clipped to 8 bits they would all be white
            pixels = np.asarray(smooth_image(rng, 32), dtype=np.uint16) * 16 + 1000
            Image.fromarray(pixels).save(root / cls / f"img{i}.png")
            Image.fromarray(np.ascontiguousarray(pixels[:, ::-1])).save(root / cls / f"img{i}_flipped.png")
    assert Image.open(root / "a" / "img0.png").mode.startswith("I")
    code, _, err = run_cli(["data", "split", root, "--out", tmp_path / "m.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["groups"] == 8  # each image with its flipped copy
    features = dict(zip(FEATURES, image_features(root / "a" / "img0.png")))
    assert features["bright_fraction"] < 0.5 and 0 < features["mean_intensity"] < 250


def test_split_is_byte_identical_when_repeated_and_seed_matters(generic_dataset, tmp_path, capsys):
    files = []
    for name, seed in (("a.json", 0), ("b.json", 0), ("c.json", 5)):
        assert run_cli(["data", "split", generic_dataset, "--out", tmp_path / name, "--seed", seed], capsys)[0] == 0
        files.append((tmp_path / name).read_bytes())
    assert files[0] == files[1]
    assert files[0] != files[2]


def test_audit_shows_the_leak_of_an_image_level_split(tmp_path, capsys):
    root = write_dataset(tmp_path / "d", ["a", "b", "c"], per_class=10, copies=4)
    for i in range(3):  # byte-identical copies too
        (root / "a" / f"dup{i}.png").write_bytes((root / "a" / f"img00{i}_0.png").read_bytes())
    results = {}
    for mode in ("near-duplicate", "none"):
        m = tmp_path / f"{mode}.json"
        assert run_cli(["data", "split", root, "--out", m, "--group-by", mode], capsys)[0] == 0
        code, out, err = run_cli(["data", "audit", m, "--json"], capsys)
        assert code == 0, err
        results[mode] = json.loads(out)
    grouped, naive = results["near-duplicate"], results["none"]
    assert grouped["identical_cross_split"]["total"] == 0
    assert [n["threshold"] for n in grouped["near_duplicates"]] == [dedup.DEFAULT_THRESHOLD, dedup.LOOSE_THRESHOLD]
    assert grouped["near_duplicates"][0]["cross_split"]["total"] == 0
    assert naive["near_duplicates"][0]["cross_split"]["total"] > 10
    assert naive["near_duplicates"][0]["test_images_with_train_near_duplicate"] > 0
    code, out, _ = run_cli(["data", "audit", tmp_path / "none.json"], capsys)
    assert code == 0 and "identical" in out and "near>=0.88" in out


def test_cli_help_shows_the_library_thresholds(capsys):
    code, out, _ = run_cli(["data", "split", "--help"], capsys)
    assert code == 0 and f"[default: {dedup.DEFAULT_THRESHOLD}]" in out
    code, out, _ = run_cli(["data", "audit", "--help"], capsys)
    assert code == 0 and f"{dedup.LOOSE_THRESHOLD:.2f}" in out


def test_split_with_defaults_groups_at_the_library_threshold(generic_dataset):
    from lungedge.data.split import make_split

    assert make_split(generic_dataset, show_progress=False)["params"]["threshold"] == dedup.DEFAULT_THRESHOLD


# -- the real data sets (skipped where ../shared/data is absent) ---------------------------------

@pytest.mark.realdata
@pytest.mark.parametrize("name, layout, total", [("iq-oth-nccd", "iq-oth-nccd", 1097),
                                                 ("lc25000-lung-subset", "lc25000-lung", 3719)])
def test_real_inspect(name, layout, total, capsys):
    code, out, _ = run_cli(["data", "inspect", require_real(name), "--json"], capsys)
    info = json.loads(out)
    assert code == 0
    assert info["layout"] == layout and len(info["classes"]) == 3 and info["total"] == total
    assert info["unreadable"] == []
    if name == "iq-oth-nccd":
        assert info["counts"] == {"Benign": 120, "Malignant": 561, "Normal": 416}
        assert info["non_square"]["Malignant"] >= 50


@pytest.mark.realdata
def test_real_iq_oth_grouped_split_removes_the_leak(tmp_path, capsys):
    root = require_real("iq-oth-nccd")
    audits = {}
    for mode in ("near-duplicate", "none"):
        m = tmp_path / f"{mode}.json"
        assert run_cli(["data", "split", root, "--out", m, "--group-by", mode], capsys)[0] == 0
        code, out, _ = run_cli(["data", "audit", m, "--json"], capsys)
        audits[mode] = json.loads(out)
    assert json.loads((tmp_path / "near-duplicate.json").read_text())["groups"] == 329  # as the README reports
    assert audits["near-duplicate"]["identical_cross_split"]["total"] == 0
    assert audits["none"]["identical_cross_split"]["total"] > 0
    for level in range(2):  # at the grouping threshold and at the looser one
        grouped = audits["near-duplicate"]["near_duplicates"][level]["cross_split"]["total"]
        naive = audits["none"]["near_duplicates"][level]["cross_split"]["total"]
        assert grouped * 4 < naive


def test_inspect_counts_the_images_an_exif_orientation_turns(generic_dataset, capsys):
    """A JPEG tagged "turned 90°" (a phone photo of a screen): inspect counts it, says the model sees it as
    stored; tags that turn nothing (none, 1) count 0. Before, inspect did not look."""
    code, out, err = run_cli(["data", "inspect", generic_dataset, "--json", "--no-shortcuts"], capsys)
    assert code == 0, err
    assert json.loads(out)["exif_orientation"] == {"count": 0, "per_class": {"cat_a": 0, "cat_b": 0, "cat_c": 0},
                                                   "first": None}
    exif = Image.Exif()
    exif[0x0112] = 1  # upright: nothing to say
    Image.open(generic_dataset / "cat_a" / "img000_0.png").convert("RGB").save(generic_dataset / "cat_a" / "up.jpg",
                                                                               exif=exif.tobytes())
    code, out, err = run_cli(["data", "inspect", generic_dataset, "--no-shortcuts"], capsys)
    assert code == 0 and "images with an EXIF orientation: 0\n" in out, out
    exif[0x0112] = 6
    Image.open(generic_dataset / "cat_b" / "img001_0.png").convert("RGB").save(generic_dataset / "cat_b" / "turned.jpg",
                                                                               exif=exif.tobytes())
    code, out, err = run_cli(["data", "inspect", generic_dataset, "--json", "--no-shortcuts"], capsys)
    assert code == 0, err
    assert json.loads(out)["exif_orientation"] == {"count": 1, "per_class": {"cat_a": 0, "cat_b": 1, "cat_c": 0},
                                                   "first": {"path": "cat_b/turned.jpg", "turn": "turned 90°"}}
    code, out, err = run_cli(["data", "inspect", generic_dataset, "--no-shortcuts"], capsys)
    assert code == 0, err
    assert ("images with an EXIF orientation: 1 (first: cat_b/turned.jpg, turned 90° in photo viewers); lungedge "
            "trains and predicts on the pixels as stored, unturned") in out.splitlines()
