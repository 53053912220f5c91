"""Metrics against hand-computed confusion matrices, and `lungedge eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import torch  # noqa: F401
import torchvision  # noqa: F401
import numpy as np
import pytest

from lungedge import quantize  # noqa: E402

from conftest import run_cli
from lungedge.metrics import classification_metrics, disagreement
from lungedge.runners import BACKENDS
from lungedge.runners.discover import cpu_computes_bf16

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_metrics_match_a_hand_computed_confusion_matrix():
    # classes a, b, c; 10 images
    y_true = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
    # confusion (rows true): a: 2 1 1 / b: 1 2 0 / c: 0 1 2
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["sensitivity"] == pytest.approx({"a": 2 / 4, "b": 2 / 3, "c": 2 / 3})
    # specificity = TN / (TN + FP): a: 5/(5+1); b: 5/(5+2); c: 6/(6+1)
    assert m["specificity"] == pytest.approx({"a": 5 / 6, "b": 5 / 7, "c": 6 / 7})
    assert m["precision"] == pytest.approx({"a": 2 / 3, "b": 2 / 4, "c": 2 / 3})
    f1 = {"a": 2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2), "b": 2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3),
          "c": 2 / 3}
    assert m["f1"] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert m["support"] == {"a": 4, "b": 3, "c": 3}


def test_absent_class_and_auroc():
    # class c never occurs in y_true and is never predicted
    y_true, y_pred = [0, 0, 1, 1], [0, 1, 1, 1]
    scores = np.array([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0]])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"], scores=scores)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert m["sensitivity"]["c"] is None and m["specificity"]["c"] == 1.0
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # over the classes present
    # a vs rest: positives score 0.9, 0.4; negatives 0.2, 0.1 -> perfectly ranked
    assert m["auroc"]["a"] == pytest.approx(1.0) and m["auroc"]["b"] == pytest.approx(1.0)
    assert m["auroc"]["c"] is None and m["macro_auroc"] == pytest.approx(1.0)
    assert disagreement([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.25)


def test_calibration_by_hand():
    from sklearn.metrics import brier_score_loss

    from lungedge.metrics import calibration

    # top probabilities 0.95, 0.95 (one right: bin 9 accuracy 0.5), 0.6 (right), 0.45 (wrong); classes a, b, c
    probs = np.array([[0.95, 0.03, 0.02], [0.95, 0.02, 0.03], [0.2, 0.6, 0.2], [0.3, 0.25, 0.45]])
    y = np.array([0, 1, 1, 0])
    c = calibration(y, probs)
    # bins: 9 -> |1 - 1.9| = 0.9; 6 -> |1 - 0.6| = 0.4; 4 -> |0 - 0.45| = 0.45; over 4 images
    assert c["ece"] == pytest.approx((0.9 + 0.4 + 0.45) / 4)
    assert c["brier"] == pytest.approx(brier_score_loss(y, probs, labels=[0, 1, 2], scale_by_half=False))
    assert c["brier"] == pytest.approx(np.mean([0.05 ** 2 + 0.03 ** 2 + 0.02 ** 2, 0.95 ** 2 + 0.98 ** 2 + 0.03 ** 2,
                                                0.2 ** 2 + 0.4 ** 2 + 0.2 ** 2, 0.7 ** 2 + 0.25 ** 2 + 0.45 ** 2]))
    assert c["mean_confidence"] == pytest.approx((0.95 + 0.95 + 0.6 + 0.45) / 4) and c["top1_accuracy"] == 0.5
    assert [(b["range"][0], b["n"], b["accuracy"]) for b in c["reliability"]] == \
        [(pytest.approx(0.4), 1, 0.0), (pytest.approx(0.6), 1, 1.0), (pytest.approx(0.9), 2, 0.5)]
    # probabilities that say what happens: 80 % confidence, 4 of 5 right -> ECE 0; a top probability of 1.0
    # falls in the last bin; an FP16 head summing to 1.002 is renormalised
    exact = calibration([0, 0, 0, 0, 1, 2], [[0.8, 0.1, 0.1]] * 5 + [[0.0, 0.0, 1.002]])
    assert exact["ece"] == pytest.approx(0.0, abs=1e-12) and exact["reliability"][-1]["n"] == 1
    assert calibration([], np.zeros((0, 3)))["ece"] is None


def test_undefined_figures_are_none_and_say_over_which_classes():
    """A class the model never predicts has no precision (0/0), not 0; a class without test images has no
    sensitivity and the averages name the classes they are over (checked against scikit-learn)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score

    y_true = [0, 0, 0, 1, 1, 1, 1]  # no c in the truth
    y_pred = [0, 1, 0, 1, 1, 0, 1]  # c never predicted, d never predicted either
    m = classification_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    ppv = precision_score(y_true, y_pred, labels=[0, 1, 2, 3], average=None, zero_division=np.nan)
    assert [m["precision"][c] for c in "ab"] == pytest.approx(list(ppv[:2]))
    assert np.isnan(ppv[2:]).all() and m["precision"]["c"] is None and m["precision"]["d"] is None
    assert m["f1"]["c"] is None and m["sensitivity"]["c"] is None  # neither in the truth nor predicted
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1], average="macro"))
    assert m["averaged_over"] == ["a", "b"] and m["absent"] == ["c", "d"] and m["never_predicted"] == ["c", "d"]


def test_training_summary_keeps_its_shape():
    from lungedge.train.metrics import summarize

    s = summarize([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], ["a", "b", "c", "d"])
    assert s["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert s["sensitivity"]["d"] is None and s["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert set(s) == {"n", "accuracy", "balanced_accuracy", "macro_f1", "sensitivity", "specificity", "support",
                      "confusion_matrix"}
    assert summarize([], [], ["a", "b"])["n"] == 0


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    from lungedge.cli import main

    trained_run("googlenet")
    tmp = tmp_path_factory.mktemp("eval")
    assert main(["export", "googlenet", "--runs", str(trained_run.runs), "--out", str(tmp / "engines"),
                 "--calibration", str(tmp / "c"), "--int8", "--fp16", "--calib-size", "9", "--calib-method",
                 "minmax", "--no-engine"]) == 0
    return {"runs": trained_run.runs, "engines": tmp / "engines", "tmp": tmp}


def test_eval_model_every_backend_and_precision(exported, capsys):
    out = exported["tmp"] / "results"
    out.mkdir()
    (out / ".eval-vm-20260101T000000Z.jsonl.k3j_x9a2.tmp").write_text("{")  # what an eval killed (-9) left
    code, stdout, err = run_cli(["eval", "googlenet", "--runs", exported["runs"], "--engines", exported["engines"],
                                 "--out", out, "--json"], capsys)
    assert code == 0, err
    assert [p.name for p in out.iterdir()] == [p.name for p in out.glob("eval-*.jsonl")]  # the temporary went
    rows = json.loads(stdout)
    got = [(r["backend"], r["variant"]) for r in rows]
    assert [g for g in got if g[0] != "openvino"] == [("torch", "fp32"), ("onnxruntime", "fp32"),
                                                      ("onnxruntime", "fp16"), ("onnxruntime", "int8-cpu")]
    ov_variants = ("fp32", "fp16", "int8-cpu", "int8") + ("int8-ov",) * quantize.nncf_available()  # every INT8 file
    openvino = {("openvino", v) for v in ov_variants} | ({("openvino", "bf16")} if cpu_computes_bf16() else set())
    # every installed backend on the device joins the default plan
    assert {g for g in got if g[0] == "openvino"} == (openvino if BACKENDS["openvino"].available() else set())
    n = rows[0]["metrics"]["n"]
    assert n > 0 and all(r["metrics"]["n"] == n for r in rows)
    ort = rows[got.index(("onnxruntime", "fp32"))]
    assert rows[0]["predictions"] == ort["predictions"]  # the same weights through torch and ONNX Runtime
    for r in rows:
        m = r["metrics"]
        assert set(m["sensitivity"]) == {"benign", "malignant", "normal"} and "macro_auroc" in m
        assert np.asarray(m["confusion_matrix"]).sum() == n
        assert (r["differs_from_fp32"] is None) == (r["precision"] == "fp32")
        assert r["provenance"]["libraries"]["onnxruntime"] and r["provenance"]["date"]
        cal, ci = m["calibration"], r["intervals"]
        assert cal["top1_accuracy"] == pytest.approx(m["accuracy"]) and sum(b["n"] for b in cal["reliability"]) == n
        assert 0 <= cal["ece"] <= 1 and 0 <= cal["brier"] <= 2
        assert ci["ece"][0] <= ci["ece"][1] and ci["brier"][0] <= cal["brier"] <= ci["brier"][1]
    assert rows[0]["model_info"]["total_params"] > 0 and rows[0]["model_info"]["epochs"] == 1
    files = list(out.glob("eval-*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == len(rows)


def test_eval_errors_are_one_line(exported, capsys):
    if not torch.cuda.is_available():
        code, _, err = run_cli(["eval", "googlenet", "--runs", exported["runs"], "--engines", exported["engines"],
                                "--device", "cuda"], capsys)
        assert code == 2 and err.startswith("error:") and "cuda" in err.lower() and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["eval", "googlenet", "--runs", exported["runs"], "--engines", exported["engines"],
                            "--device", "tpu"], capsys)
    assert code == 2 and err.startswith("error: unknown device 'tpu'") and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["eval", "nosuchmodel"], capsys)
    assert code == 2 and "neither a file nor a model" in err


def test_eval_artifact_with_explicit_split(exported, trained_run, capsys):
    """An ONNX file alone, a split manifest and a data root: as `lungedge demo` and the Jetson use it."""
    onnx = exported["engines"] / "googlenet" / "googlenet.int8-cpu.onnx"
    split = trained_run("googlenet") / "split.json"
    code, stdout, err = run_cli(["eval", onnx, "--split", split, "--data", trained_run.data, "--runs",
                                 exported["runs"], "--out", exported["tmp"] / "r2", "--json"], capsys)
    assert code == 0, err
    (row,) = json.loads(stdout)
    assert row["variant"] == "int8-cpu" and str(split) in row["test_set"]
    assert row["fp32_reference"].endswith("googlenet.fp32.onnx") and 0.0 <= row["differs_from_fp32"] <= 1.0


def test_eval_on_images_the_model_trained_on_warns_and_keeps_what_it_scored(exported, trained_run, capsys,
                                                                           monkeypatch):
    """--data with the training folder: every image the model learnt from is counted and said; the row keeps
    each image's probabilities, from which scikit-learn gives the same AUROC, Brier score and precision."""
    from collections import Counter

    from sklearn.metrics import brier_score_loss, precision_score, roc_auc_score

    import lungedge.data.scan as scan_module

    scan_file, read = scan_module.scan_file, Counter()

    def counted(root, path, label, thumb=True):  # the real scan, counted: what eval decodes for thumbnails
        read[Path(root, path).resolve()] += 1
        return scan_file(root, path, label, thumb)

    monkeypatch.setattr(scan_module, "scan_file", counted)
    code, stdout, err = run_cli(["eval", "googlenet", "--backend", "onnxruntime", "--precision", "fp32", "--data",
                                 trained_run.data, "--runs", exported["runs"], "--engines", exported["engines"],
                                 "--out", exported["tmp"] / "r3", "--json"], capsys)
    assert code == 0, err
    (row,) = json.loads(stdout)
    split = json.loads((trained_run("googlenet") / "split.json").read_text())["items"]
    seen = {p: sum(it["split"] == p for it in split) for p in ("train", "val")}
    assert row["leakage"]["in_training"] == seen["train"] > 0 and row["leakage"]["in_validation"] == seen["val"]
    near = row["leakage"]["near_duplicates"]  # the split's test part, grouped, has none in training
    assert (near["in_training"], near["in_validation"], near["compared_with"]) == (0, 0, seen["train"] + seen["val"])
    assert (f"WARNING googlenet: {seen['train'] + seen['val']} of the {row['metrics']['n']} test images are training "
            f"or validation images of {trained_run('googlenet') / 'split.json'} or near-copies of them: "
            f"{seen['train']} byte-identical to training images and {seen['val']} to validation images, 0 "
            "near-duplicates") in err
    # a folder has no split's groups: eval finds them in the pixels, as data split did for this folder
    assert row["intervals"]["method"].startswith("percentile bootstrap over groups")
    ours = {Path(p).resolve().relative_to(Path(trained_run.data).resolve()).as_posix(): g
            for p, g in zip(row["images"], row["groups"])}
    theirs = {it["path"]: it["group"] for it in split}
    assert set(ours) == set(theirs)
    partition = lambda m: sorted(sorted(p for p in m if m[p] == g) for g in set(m.values()))  # noqa: E731
    assert partition(ours) == partition(theirs)
    assert f"{len(set(ours.values()))} near-duplicate groups by their pixels" in err
    # the grouping and the leak check read the thumbnail of each test image the check decodes (those not
    # byte-identical to a training image, whose thumbnails the check reads as the training images') once
    unseen = [Path(trained_run.data, it["path"]).resolve() for it in split if it["split"] == "test"]
    assert unseen and [read[p] for p in unseen] == [1] * len(unseen)
    y, probs, k = np.array(row["labels"]), np.array(row["probabilities"]), len(row["classes"])
    assert (probs.argmax(1) == row["predictions"]).all()
    m = row["metrics"]
    assert m["calibration"]["brier"] == pytest.approx(brier_score_loss(y, probs, labels=list(range(k))))
    for i, c in enumerate(row["classes"]):
        if 0 < (y == i).sum() < len(y):
            assert m["auroc"][c] == pytest.approx(roc_auc_score(y == i, probs[:, i]))
    ppv = precision_score(y, row["predictions"], labels=list(range(k)), average=None, zero_division=np.nan)
    assert [m["precision"][c] for c in row["classes"]] == [None if np.isnan(v) else pytest.approx(v) for v in ppv]


def test_eval_on_resaved_copies_of_training_images_warns_of_near_duplicates(trained_run, tmp_path, capsys):
    """Training images re-saved as JPEG, resized by 2 px, flipped: no file is byte-identical to one the model
    trained on, yet eval counts each as a near-duplicate of a training image, on stderr, in the row and in
    the report's test-set column."""
    from PIL import Image

    run = trained_run("googlenet")
    train = [it for it in json.loads((run / "split.json").read_text())["items"] if it["split"] == "train"][:3]
    changes = [lambda im: im, lambda im: im.resize((62, 62), Image.BILINEAR),
               lambda im: im.transpose(Image.FLIP_LEFT_RIGHT)]
    for k, (it, change) in enumerate(zip(train, changes)):
        (tmp_path / "t" / it["label"]).mkdir(parents=True, exist_ok=True)
        change(Image.open(trained_run.data / it["path"]).convert("RGB")).save(tmp_path / "t" / it["label"] / f"{k}.jpg",
                                                                               quality=92)
    code, stdout, err = run_cli(["eval", run / "best.pth", "--data", tmp_path / "t", "--runs", trained_run.runs,
                                 "--out", tmp_path / "r", "--json"], capsys)
    assert code == 0, err
    (row,) = json.loads(stdout)
    leak = row["leakage"]
    assert (leak["in_training"], leak["in_validation"]) == (0, 0)
    assert (leak["near_duplicates"]["in_training"], leak["near_duplicates"]["in_validation"]) == (3, 0)
    assert "WARNING googlenet: 3 of the 3 test images are training or validation images" in err
    assert "0 byte-identical to training images and 0 to validation images, 3 near-duplicates of training" in err
    assert (run / "split.json.near-dup.npz").is_file()  # the training thumbnails, for the next eval
    code, _, err = run_cli(["report", "--results", tmp_path / "r", "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    assert "3 in training, 0 in validation (near-duplicates" in (tmp_path / "rep" / "report.md").read_text()


def test_eval_of_one_image_of_one_class(exported, trained_run, tmp_path, capsys):
    """A folder holding one class (here one image of it) is a test set: the other classes are said to be
    absent, the averages are over that class, and the interval of one image is as wide as SciPy's exact one."""
    import shutil

    from scipy.stats import binomtest

    (tmp_path / "one" / "malignant").mkdir(parents=True)
    image = sorted((trained_run.data / "malignant").iterdir())[0]
    shutil.copy(image, tmp_path / "one" / "malignant" / image.name)
    code, stdout, err = run_cli(["eval", "googlenet", "--backend", "onnxruntime", "--precision", "fp32", "--data",
                                 tmp_path / "one", "--runs", exported["runs"], "--engines", exported["engines"],
                                 "--out", tmp_path / "r", "--json"], capsys)
    assert code == 0, err
    (row,) = json.loads(stdout)
    m = row["metrics"]
    assert m["n"] == 1 and m["averaged_over"] == ["malignant"] and m["absent"] == ["benign", "normal"]
    assert "(one class: malignant)" in row["test_set"] and "no test images of benign, normal" in err
    right = int(m["accuracy"])
    ci = binomtest(right, 1).proportion_ci(method="exact")
    assert row["intervals"]["accuracy"] == pytest.approx([ci.low, ci.high])


def test_eval_counts_the_test_images_an_exif_orientation_turns(exported, trained_run, tmp_path, capsys):
    """A test JPEG tagged "turned 90°" is counted in the row (exif_orientation_count) and said in one note: the
    figures are for the pixels as stored, which a viewer shows turned. A set without such tags counts 0, no note.
    Before, eval did not look."""
    from PIL import Image

    def test_set(name, orientation):
        for i, image in enumerate(sorted((trained_run.data / "malignant").iterdir())[:2]):
            (tmp_path / name / "malignant").mkdir(parents=True, exist_ok=True)
            exif = Image.Exif()
            if i == 0 and orientation:
                exif[0x0112] = orientation
            Image.open(image).convert("RGB").save(tmp_path / name / "malignant" / f"{i}.jpg", exif=exif.tobytes())
        code, stdout, err = run_cli(["eval", "googlenet", "--backend", "onnxruntime", "--precision", "fp32,int8",
                                     "--data", tmp_path / name, "--runs", exported["runs"], "--engines",
                                     exported["engines"], "--out", tmp_path / "r", "--json", "--bootstrap", "100"],
                                    capsys)
        assert code == 0, err
        return json.loads(stdout), [ln for ln in err.splitlines() if "EXIF" in ln]

    rows, notes = test_set("turned", 6)
    assert [r["exif_orientation_count"] for r in rows] == [1, 1]
    assert notes == [f"note googlenet: 1 of the 2 test images carry an EXIF orientation (first: "
                     f"{tmp_path / 'turned' / 'malignant' / '0.jpg'}, turned 90° in photo viewers); the model saw "
                     "them unturned, as stored, as lungedge reads every image in training too"]
    rows, notes = test_set("upright", None)
    assert [r["exif_orientation_count"] for r in rows] == [0, 0] and notes == []


def test_a_folders_test_images_are_grouped_by_their_pixels(tmp_path):
    """eval --data: no split gives groups, so near-copies (a re-saved, resized slice) are found from the pixels
    and share a group; different images and an unreadable file each have their own; known groups stay."""
    from PIL import Image

    from lungedge.testset import TestImages

    rng = np.random.default_rng(0)
    paths = []
    for k in range(4):
        img = Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).resize((128, 128), Image.BILINEAR)
        img.save(tmp_path / f"s{k}.png")
        paths.append(tmp_path / f"s{k}.png")
    Image.open(paths[0]).resize((100, 100)).save(tmp_path / "copy.jpg", quality=90)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    ts = TestImages([*paths, tmp_path / "copy.jpg", tmp_path / "bad.png"], ["a"] * 6, "six")
    assert ts.group_by_pixels() == 4
    g = ts.groups
    assert g[4] == g[0] and len({g[0], g[1], g[2], g[3], g[5]}) == 5
    assert ts.group_by_pixels() is None and ts.groups == g  # groups known: nothing done
