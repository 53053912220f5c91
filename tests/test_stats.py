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
        pred[pred == 2] = 1  # a class never predicted: precision undefined (NaN here, None there), F1 0
        ref = classification_metrics(y, pred, CLASSES)
        got = metrics_from_confusion(confusion_matrix(y, pred, labels=[0, 1, 2]))
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert got[key] == pytest.approx(ref[key], abs=1e-12)
        for key in ("sensitivity", "specificity", "precision", "f1"):
            want = [np.nan if ref[key][c] is None else ref[key][c] for c in CLASSES]
            assert got[key] == pytest.approx(want, abs=1e-12, nan_ok=True)
        assert np.isnan(got["precision"][2]) and ref["precision"][CLASSES[2]] is None


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
    with pytest.raises(LungedgeError, match="--max-bacc-drop must be at least 0 and under 100 points, got 150"):
        release_gate(y, ref, ref, None, CLASSES, max_bacc_drop=1.5)
    with pytest.raises(LungedgeError, match="--max-sens-drop"):
        release_gate(y, ref, ref, None, CLASSES, max_sens_drop=-0.01)


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
    # no eval yet: the gate export judged counts; eval's verdict, once there, wins
    other = tmp_path / "m.fp16.onnx"
    other.write_bytes(b"another exported file")
    assert _gate("m", "fp16", other, results, False, release_gate(y, ref, ref, None, CLASSES)) == "pass"
    with pytest.raises(LungedgeError, match="failed the release gate.*the export summary"):
        _gate("m", "fp16", other, results, False, row["gate"])
    assert _gate("m", "int8-cpu", onnx, results, True, release_gate(y, ref, ref, None, CLASSES)).startswith("FAIL")


def _matmul_onnx(path, w):
    """A constructed ONNX model: logits = input @ w (input N x 3)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"])], "m",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.asarray(w, np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_export_gates_each_reduced_precision_against_fp32(tmp_path):
    """export's comparison step (the same code the pipeline runs) attaches a release gate per variant:
    a copy of FP32 passes, a file that calls every Benign image Malignant fails; both are printed."""
    from types import SimpleNamespace

    from lungedge.export import EvalSet, _compare_variants, failed_gates

    y = np.repeat([0, 1, 2], 20)
    x = (np.eye(3)[y] * 5 + np.random.default_rng(0).normal(0, 0.1, (60, 3))).astype(np.float32)
    test = EvalSet(x, y, "60 constructed images", groups=list(np.arange(60) // 2))
    fp32 = _matmul_onnx(tmp_path / "m.fp32.onnx", np.eye(3))
    same = _matmul_onnx(tmp_path / "m.fp16.onnx", np.eye(3))
    lost = _matmul_onnx(tmp_path / "m.int8-cpu.onnx", [[0, 1, 0], [0, 1, 0], [0, 0, 1]])
    summary, lines = {"files": {}, "parity": {}, "accuracy": {}}, []
    _compare_variants([("fp16", same), ("int8-cpu", lost)], fp32, test,
                      SimpleNamespace(output="logits", classes=CLASSES), summary, lines.append)
    gates = summary["gate"]
    assert gates["fp16"]["pass"] and gates["fp16"]["paired"]["balanced_accuracy"]["delta"] == 0
    assert not gates["int8-cpu"]["pass"] and gates["int8-cpu"]["paired"]["groups"] == 30  # pairs resampled
    assert gates["int8-cpu"]["paired"]["sensitivity"]["Benign"]["delta"] == pytest.approx(-1.0)
    assert gates["int8-cpu"]["mcnemar"]["ref_right_new_wrong"] == 20
    assert failed_gates(summary) == ["int8-cpu"]
    assert any(s.startswith("release gate fp16 vs fp32: PASS") for s in lines)
    assert any(s.startswith("release gate int8-cpu vs fp32: FAIL: sensitivity Benign") for s in lines)
    unlabelled = {"files": {}, "parity": {}, "accuracy": {}}
    _compare_variants([("fp16", same)], fp32, EvalSet(x, None, "random"), SimpleNamespace(output="logits",
                      classes=CLASSES), unlabelled, lines.append)
    assert "gate" not in unlabelled and failed_gates(unlabelled) == []  # no labels: nothing to judge


def test_eval_gates_bf16_rows_like_any_reduced_precision():
    """A BF16 row (OpenVINO computing the FP32 file in BF16) is gated, listed and tabled like FP16/INT8
    (constructed rows: this CPU may have no BF16)."""
    from lungedge.evaluate import gate_lines, table
    from lungedge.report import gate_table
    from lungedge.stats import release_gate

    y, ref = _random_preds(n=90, seed=3)
    bad = ref.copy()
    bad[y == 2] = 0
    rows = []
    for variant, pred in (("bf16", bad), ("fp16", ref)):
        rows.append({"kind": "eval", "machine": "m1", "model": "smallcnn", "backend": "openvino", "device": "cpu",
                     "variant": variant, "fp32_reference": "openvino fp32 smallcnn.fp32.onnx",
                     "gate": release_gate(y, ref, pred, None, CLASSES), "differs_from_fp32": 0.1,
                     "metrics": {"n": 90, "accuracy": 0.7, "balanced_accuracy": 0.7, "macro_f1": 0.7,
                                 "sensitivity": {c: 0.7 for c in CLASSES}, "specificity": {c: 0.8 for c in CLASSES}},
                     "intervals": {}})
    lines = gate_lines(rows)
    assert lines[0].startswith("release gate smallcnn openvino bf16 vs openvino fp32") and "FAIL" in lines[0]
    assert "PASS" in lines[1]
    assert [r[3] for r in gate_table(rows)] == ["bf16", "fp16"] and gate_table(rows)[0][-1] == "FAIL"
    from rich.console import Console

    con = Console(width=300, record=True)
    con.print(table(rows))
    assert "FAIL" in con.export_text()


def test_calibration_replicate_equals_the_resampled_data_set():
    """A replicate's Brier score and ECE (weights on per-group sums) equal :func:`calibration` on the images
    of the drawn groups, repeated as often as drawn."""
    from lungedge.metrics import calibration
    from lungedge.stats import bootstrap_metrics, calibration_replicates, group_draws

    rng = np.random.default_rng(3)
    probs = rng.dirichlet([0.5, 0.5, 0.5], size=120)
    y = np.array([rng.choice(3, p=p) for p in probs])
    groups = rng.integers(0, 30, size=120)  # 30 groups of unequal size
    ids, g = np.unique(groups, return_inverse=True)
    draws = group_draws(len(ids), n_boot=5, seed=1)
    reps = calibration_replicates(y, probs, g, draws)
    for b in range(5):
        take = np.repeat(np.arange(120), draws[b][g])
        ref = calibration(y[take], probs[take])
        assert reps["brier"][b] == pytest.approx(ref["brier"], abs=1e-12)
        assert reps["ece"][b] == pytest.approx(ref["ece"], abs=1e-12)
    ci = bootstrap_metrics(y, probs.argmax(1), groups, CLASSES, n_boot=200, probs=probs)
    point = calibration(y, probs)
    assert ci["brier"][0] < point["brier"] < ci["brier"][1] and ci["ece"][0] < ci["ece"][1]


def test_an_estimate_of_0_or_1_gets_the_exact_interval_not_a_point():
    """84 of 84 found is not certainty: where every bootstrap replicate agrees (estimate 0 or 1), the interval
    is Clopper-Pearson's (SciPy's exact binomial interval) on the number of groups, never [1, 1]."""
    from scipy.stats import binomtest

    from lungedge.stats import bootstrap_metrics

    def exact(x, n):
        ci = binomtest(x, n).proportion_ci(confidence_level=0.95, method="exact")
        return [ci.low, ci.high]

    # Benign: 40 images in 20 groups, all found; Normal: 24 images in 12 groups, none found (called Malignant);
    # Malignant: 30 images, one group in three missed (a proportion strictly inside (0, 1): bootstrap kept)
    y = np.array([0] * 40 + [2] * 24 + [1] * 30)
    pred = np.array([0] * 40 + [1] * 24 + [1, 1, 0] * 10)
    groups = np.concatenate([np.repeat(np.arange(20), 2), 100 + np.repeat(np.arange(12), 2), 200 + np.arange(30)])
    b = bootstrap_metrics(y, pred, groups, CLASSES, n_boot=300)
    assert b["sensitivity"]["Benign"] == pytest.approx(exact(20, 20))
    assert b["sensitivity"]["Normal"] == pytest.approx(exact(0, 12))
    assert b["sensitivity"]["Malignant"][0] < 2 / 3 < b["sensitivity"]["Malignant"][1] < 1
    assert b["precision"]["Normal"] is None  # never predicted: PPV undefined, no interval
    assert b["specificity"]["Normal"] == pytest.approx(exact(50, 50))  # 20 + 30 groups without Normal images
    assert "Clopper-Pearson" in b["method"] and "sensitivity Benign" in b["exact_fallback"]
    # one image, right: accuracy 1 with the interval of 1 success in 1 trial, not [1, 1]
    one = bootstrap_metrics([1], [1], None, CLASSES, n_boot=100)
    assert one["accuracy"] == pytest.approx(exact(1, 1)) and one["accuracy"][0] < 0.05
    assert one["sensitivity"]["Benign"] is None and one["balanced_accuracy"] == pytest.approx(exact(1, 1))


def test_the_gate_says_how_much_it_rests_on():
    """No change on 2 images passes the bootstrap gate ([0, 0] is all a bootstrap of no change can say); the gate
    states the exact bound that shows how little that means (SciPy's Clopper-Pearson), in its line as well."""
    from scipy.stats import binomtest

    from lungedge.stats import gate_line, release_gate

    gate = release_gate([0, 1], [0, 1], [0, 1], None, CLASSES[:2], n_boot=100)
    ev = gate["evidence"]
    assert (ev["images"], ev["groups"], ev["groups_worse"]) == (2, 2, 0)
    assert ev["worse_share_upper"] == pytest.approx(binomtest(0, 2).proportion_ci(method="exact").high)
    assert "on 2 images in 2 groups, up to 84.2% of groups could lose a right answer" in gate_line(gate)


def test_the_gate_line_names_the_check_closest_to_failing():
    """Balanced accuracy's lower bound -0.005 against -0.01 is closer to failing than a class's 0.000 against
    -0.02: the line must name balanced accuracy (a lower bound of exactly 0 once counted as -1)."""
    from lungedge.stats import gate_line, release_gate

    # 200 Benign images right in both; Malignant: the new model loses 1 of 200 images (own groups)
    y = np.array([0] * 200 + [1] * 200)
    ref = y.copy()
    new = y.copy()
    new[200] = 0
    gate = release_gate(y, ref, new, None, CLASSES[:2], max_bacc_drop=0.01, max_sens_drop=0.02, n_boot=400)
    margins = {ch["metric"]: ch["lower"] - ch["limit"] for ch in gate["checks"]}
    closest = min(margins, key=margins.get)
    assert gate_line(gate).split(": ")[1].startswith(f"{closest} change")
    assert closest == "balanced_accuracy" and gate["checks"][1]["lower"] == 0.0  # Benign: no change at all
