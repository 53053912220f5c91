"""Group bootstrap, paired comparison, McNemar and the release gate on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

CLASSES = ["Benign", "Malignant", "Normal"]


def _random_preds(n=300, k=3, right=0.75, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < right, y, rng.integers(0, k, n))
    return y, pred


def test_confusion_formulas_match_scikit_learn():
    """The vectorised metrics used inside the bootstrap equal lungedge.metrics (scikit-learn) exactly."""
    from sklearn.metrics import confusion_matrix

    from lungedge.metrics import classification_metrics
    from lungedge.stats import metrics_from_confusion

    for seed in range(3):
        y, pred = _random_preds(seed=seed)
        pred[pred == 2] = 1  # a class never predicted: precision 0, F1 0
        ref = classification_metrics(y, pred, CLASSES)
        got = metrics_from_confusion(confusion_matrix(y, pred, labels=[0, 1, 2]))
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert got[key] == pytest.approx(ref[key], abs=1e-12)
        for key in ("sensitivity", "specificity", "precision", "f1"):
            assert got[key] == pytest.approx([ref[key][c] for c in CLASSES], abs=1e-12)


def test_bootstrap_of_a_proportion_matches_the_binomial_interval():
    """One image per group: accuracy's bootstrap interval is the normal-approximation binomial one."""
    from lungedge.stats import bootstrap_metrics

    n, p = 2000, 0.8
    y = np.zeros(n, int)
    pred = np.where(np.arange(n) < p * n, 0, 1)
    ci = bootstrap_metrics(y, pred, np.arange(n), ["a", "b"], n_boot=4000, seed=1)["accuracy"]
    half = 1.96 * np.sqrt(p * (1 - p) / n)  # 0.0175
    assert ci[0] == pytest.approx(p - half, abs=0.004)
    assert ci[1] == pytest.approx(p + half, abs=0.004)


def test_resampling_groups_widens_the_interval_by_the_group_size():
    """10 identical-outcome images per group = 200 independent units: the interval is ~sqrt(10) wider
    than an image-level bootstrap that pretends there are 2000."""
    from lungedge.stats import bootstrap_metrics

    rng = np.random.default_rng(0)
    outcome = rng.random(200) < 0.7
    y = np.zeros(2000, int)
    pred = np.where(np.repeat(outcome, 10), 0, 1)
    groups = np.repeat(np.arange(200), 10)
    grouped = bootstrap_metrics(y, pred, groups, ["a", "b"], n_boot=3000)["accuracy"]
    images = bootstrap_metrics(y, pred, None, ["a", "b"], n_boot=3000)["accuracy"]
    ratio = (grouped[1] - grouped[0]) / (images[1] - images[0])
    assert 2.6 < ratio < 3.7  # sqrt(10) = 3.16


def test_identical_groups_give_a_zero_width_interval():
    from lungedge.stats import bootstrap_metrics

    # every group holds the same confusion: any resample has exactly the same metrics
    y = np.tile([0, 0, 1, 1, 2, 2], 30)
    pred = np.tile([0, 1, 1, 1, 2, 0], 30)
    groups = np.repeat(np.arange(30), 6)
    b = bootstrap_metrics(y, pred, groups, CLASSES, n_boot=200)
    assert b["balanced_accuracy"] == pytest.approx([2 / 3, 2 / 3])
    assert b["sensitivity"]["Benign"] == pytest.approx([0.5, 0.5])
    assert b["groups"] == 30


def test_mcnemar_exact_known_p_value():
    from lungedge.stats import mcnemar_exact

    y = np.zeros(40, int)
    ref = np.zeros(40, int)
    new = ref.copy()
    new[:10] = 1  # 10 images FP32 got right, the new model wrong; none the other way
    m = mcnemar_exact(y, ref, new)
    assert (m["ref_right_new_wrong"], m["ref_wrong_new_right"], m["flips"]) == (10, 0, 10)
    assert m["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar_exact(y, ref, ref)["p_value"] == 1.0


def test_gate_passes_identical_predictions_and_fails_a_lost_class():
    from lungedge.stats import release_gate

    y, ref = _random_preds(n=600, right=0.85, seed=3)
    groups = np.arange(600) // 3
    same = release_gate(y, ref, ref.copy(), groups, CLASSES)
    assert same["pass"] and same["mcnemar"]["flips"] == 0
    assert same["paired"]["balanced_accuracy"]["ci"] == [0.0, 0.0]

    worse = ref.copy()
    benign_right = np.flatnonzero((y == 0) & (ref == 0))
    worse[benign_right[: len(benign_right) // 5]] = 1  # a fifth of the correct Benign calls become Malignant
    g = release_gate(y, ref, worse, groups, CLASSES)
    assert not g["pass"]
    failed = {c["metric"] for c in g["checks"] if not c["pass"]}
    assert "sensitivity Benign" in failed and "sensitivity Normal" not in failed
    assert g["paired"]["sensitivity"]["Benign"]["delta"] < -0.1
    assert g["mcnemar"]["p_value"] < 1e-6


def test_gate_judges_on_the_interval_bound_not_the_point():
    """One flipped image in 3000: the point drop is tiny and the interval's lower bound stays within 1/2
    points (pass); the same flip with 30 images makes the bound fall beyond the limit (fail)."""
    from lungedge.stats import release_gate

    def case(n):
        y = np.arange(n) % 3
        ref = y.copy()
        new = ref.copy()
        new[0] = 1
        return release_gate(y, ref, new, np.arange(n), CLASSES, n_boot=2000)

    big, small = case(3000), case(30)
    assert big["pass"]
    assert not small["pass"]
    assert abs(big["paired"]["balanced_accuracy"]["delta"]) < 0.001


def test_gate_limits_are_checked():
    from lungedge.errors import LungedgeError
    from lungedge.stats import release_gate

    y, ref = _random_preds(n=30)
    with pytest.raises(LungedgeError, match="fraction"):
        release_gate(y, ref, ref, None, CLASSES, max_bacc_drop=1.5)


def test_mean_interval_t_based_and_clipped():
    from scipy import stats as st

    from lungedge.stats import mean_interval

    v = [0.8, 0.7, 0.75, 0.9, 0.85]
    m = mean_interval(v)
    half = st.t.ppf(0.975, 4) * np.std(v, ddof=1) / np.sqrt(5)
    assert m["mean"] == pytest.approx(0.8) and m["ci"] == pytest.approx([0.8 - half, 0.8 + half])
    assert mean_interval([0.99, 0.5, 1.0], bounds=(0, 1))["ci"][1] == 1.0
    assert mean_interval([None, 0.5])["n"] == 1


def test_gate_results_reads_the_newest_eval_row(tmp_path):
    import json

    from lungedge.stats import gate_results, release_gate

    y, ref = _random_preds(n=60, seed=5)
    bad = ref.copy()
    bad[y == 0] = 1
    rows = [{"kind": "eval", "artifact_sha256": "abc", "gate": release_gate(y, ref, ref, None, CLASSES),
             "provenance": {"date": "2026-01-01T00:00:00"}},
            {"kind": "eval", "artifact_sha256": "abc", "gate": release_gate(y, ref, bad, None, CLASSES),
             "provenance": {"date": "2026-02-01T00:00:00"}}]
    (tmp_path / "eval-x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    found = gate_results(tmp_path, "abc")
    assert found is not None and found["pass"] is False and found["line"].startswith("FAIL")
    assert gate_results(tmp_path, "other") is None


def test_bundle_refuses_a_precision_that_failed_its_gate(tmp_path):
    """bundle reads the gate that eval wrote for the very file it packs (by SHA-256)."""
    import json

    from lungedge.bundle import _gate
    from lungedge.errors import LungedgeError
    from lungedge.io import sha256_file
    from lungedge.stats import release_gate

    onnx = tmp_path / "m.int8-cpu.onnx"
    onnx.write_bytes(b"stand-in for an exported file")
    results = tmp_path / "results"
    results.mkdir()
    assert _gate("m", "int8-cpu", onnx, results, False) == "not evaluated"
    assert _gate("m", "fp32", onnx, results, False) is None  # FP32 is the reference, never gated
    y, ref = _random_preds(n=90, seed=2)
    bad = ref.copy()
    bad[y == 0] = 1
    row = {"kind": "eval", "artifact_sha256": sha256_file(onnx), "gate": release_gate(y, ref, bad, None, CLASSES),
           "provenance": {"date": "2026-03-01T00:00:00"}}
    (results / "eval-a.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(LungedgeError, match="failed the release gate.*--allow-failed-gate"):
        _gate("m", "int8-cpu", onnx, results, False)
    assert _gate("m", "int8-cpu", onnx, results, True).startswith("FAIL")
