"""Grouped cross-validation: fold assignment, the fold manifests, and a tiny end-to-end run that resumes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import run_cli, write_dataset


def _labels_groups(seed=0):
    """Groups of 1-6 images, each group of one class; class 'rare' has only 3 groups."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    g = 0
    for cls, n_groups in (("a", 40), ("b", 25), ("rare", 3)):
        for _ in range(n_groups):
            size = int(rng.integers(1, 7))
            labels += [cls] * size
            groups += [g] * size
            g += 1
    return np.array(labels), np.array(groups)


def test_no_group_in_two_folds_and_every_class_in_every_fold_where_possible():
    from lungedge.cv import fold_assignment

    labels, groups = _labels_groups()
    folds = fold_assignment(labels, groups, 5, seed=0)
    assert set(folds) == set(range(5))
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1  # a group never straddles folds
    for cls in ("a", "b"):  # >= 5 groups each: present in every fold
        assert set(folds[labels == cls]) == set(range(5))
    # 'rare' has 3 groups: it can be in at most 3 folds, and it is in 3
    assert len(set(folds[labels == "rare"])) == 3
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 8  # roughly even folds
    # deterministic per seed, different across seeds (repeats)
    assert (fold_assignment(labels, groups, 5, seed=0) == folds).all()
    assert (fold_assignment(labels, groups, 5, seed=1) != folds).any()


def test_too_few_groups_is_one_error():
    from lungedge.cv import fold_assignment
    from lungedge.errors import LungedgeError

    with pytest.raises(LungedgeError, match="only 3 groups for 5 folds"):
        fold_assignment(["a", "b", "a"], [0, 1, 2], 5)
    with pytest.raises(LungedgeError, match="at least 2"):
        fold_assignment(["a", "b"], [0, 1], 1)


def test_fold_manifest_holds_out_the_fold_and_keeps_val_groups_apart():
    from lungedge.cv import fold_assignment, fold_manifest
    from lungedge.data.split import FORMAT

    labels, groups = _labels_groups(1)
    recs = [SimpleNamespace(path=f"img{i}.png", label=str(lbl), sha256=f"{i:064x}") for i, lbl in enumerate(labels)]
    folds = fold_assignment(labels, groups, 4)
    m = fold_manifest(__import__("pathlib").Path("/data"), recs, list(groups), folds, 2, ["a", "b", "rare"], "fp",
                      "near-duplicate", 0.88, 0)
    assert m["format"] == FORMAT
    split = np.array([it["split"] for it in m["items"]])
    assert ((split == "test") == (folds == 2)).all()
    for s1, s2 in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(groups[split == s1]) & set(groups[split == s2])
    assert 0.08 < (split == "val").sum() / (split != "test").sum() < 0.25


@pytest.mark.slow
def test_cv_end_to_end_then_resume(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", ["a", "b", "c"], per_class=6, copies=2, size=32)
    args = ["cv", "smallcnn", "--data", data, "--folds", "3", "--image-size", "32", "--epochs", "1",
            "--threads", "1", "--out", tmp_path / "cv"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "pooled out-of-fold" in out and "balanced accuracy" in out
    report = json.loads((tmp_path / "cv" / "smallcnn" / "cv-near-duplicate.json").read_text())
    assert report["groups"] == 18 and report["images"] == 36
    assert sum(f["n"] for f in report["per_fold"]) == 36  # every image held out exactly once
    assert np.sum(report["pooled_confusion_matrix"]) == 36
    ba = report["across_folds"]["balanced_accuracy"]
    assert ba["n"] == 3 and ba["ci"][0] <= ba["mean"] <= ba["ci"][1]
    pooled = report["pooled"]["r0"]
    assert pooled["ci"]["balanced_accuracy"][0] <= pooled["metrics"]["balanced_accuracy"] <= pooled["ci"]["balanced_accuracy"][1]
    first = (tmp_path / "cv" / "smallcnn" / "near-duplicate" / "r0-f1" / "result.json").stat().st_mtime_ns
    # a rerun reuses every finished fold
    code, out, err = run_cli(args, capsys)
    assert code == 0 and err.count("reusing") == 3
    assert (tmp_path / "cv" / "smallcnn" / "near-duplicate" / "r0-f1" / "result.json").stat().st_mtime_ns == first
    # bad input: one line
    code, out, err = run_cli(["cv", "smallcnn", "--data", tmp_path / "nope"], capsys)
    assert code != 0 and err.startswith("error:") and "Traceback" not in err


def test_cv_never_reuses_a_fold_trained_with_other_settings(tmp_path, capsys):
    """A rerun with another --epochs (or --seed, ...) into the same --out used to evaluate the folds trained
    before and report them under the new settings; it is refused in one line, and the folds stay as they were."""
    data = write_dataset(tmp_path / "data", ["a", "b", "c"], per_class=6, copies=2, size=32)
    args = ["cv", "smallcnn", "--data", data, "--folds", "3", "--image-size", "32", "--threads", "1",
            "--out", tmp_path / "cv"]
    code, _, err = run_cli([*args, "--epochs", "1"], capsys)
    assert code == 0, err
    fold = tmp_path / "cv" / "smallcnn" / "near-duplicate" / "r0-f0"
    before = (fold / "runs" / "smallcnn" / "run" / "best.pth").read_bytes()
    code, _, err = run_cli([*args, "--epochs", "2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--epochs 2 (trained with 1)" in err, err
    assert (fold / "runs" / "smallcnn" / "run" / "best.pth").read_bytes() == before
    report = json.loads((tmp_path / "cv" / "smallcnn" / "cv-near-duplicate.json").read_text())
    assert report["settings"]["epochs"] == 1


def test_a_second_cv_into_the_same_folder_is_refused_in_one_line(tmp_path, capsys):
    """It used to start on the same folds and fail with train's 'use --resume or another --run-name' (options
    cv does not have) after rewriting the first one's fold files."""
    from lungedge.io import FolderLock

    data = write_dataset(tmp_path / "data", ["a", "b", "c"], per_class=6, copies=2, size=32)
    with FolderLock(tmp_path / "cv" / "smallcnn" / "near-duplicate", "lungedge cv"):
        code, _, err = run_cli(["cv", "smallcnn", "--data", data, "--folds", "3", "--image-size", "32", "--epochs",
                                "1", "--threads", "1", "--out", tmp_path / "cv"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is being written by pid" in err, err
    assert not list((tmp_path / "cv" / "smallcnn").glob("near-duplicate/*"))
