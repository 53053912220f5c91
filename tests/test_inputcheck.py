"""The input check: descriptors of known images, the envelope, and export -> metadata -> predict/eval.

Tiny generated images only: grey smooth "CT-like" pictures against coloured ones of the same kind."""

from __future__ import annotations

import json
import shutil

import torch  # noqa: F401  (torch before anything that might pull in tensorflow)
import numpy as np
import pytest

from conftest import run_cli, smooth_image, write_dataset
from lungedge import inputcheck as ic
from lungedge import onnx_meta
from lungedge.preprocess import Preprocessing

COLUMN = {name: k for k, name in enumerate(ic.DESCRIPTORS)}
QUANTS = [COLUMN[f"grey_p{q:02d}"] for q in ic.QUANTILES]
PREPS = [Preprocessing(size=32), Preprocessing(size=32, channel_order="BGR", layout="NHWC", scale=1.0,
                                                mean=(103.9, 116.8, 123.7), std=(1.0, 1.0, 1.0)),
         Preprocessing(size=32, input_dtype="uint8"), Preprocessing(size=32, channel_order="GRAY")]


def _grey(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(smooth_image(rng, size)) for _ in range(n)])  # N x H x W uint8


def _colour(n=4, size=32, seed=1):
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(smooth_image(rng, size, colour=True)) for _ in range(n)])  # N x H x W x 3


def _narrower(images: np.ndarray, contrast: float = 0.93) -> np.ndarray:
    """A narrower window: grey levels pulled towards mid-grey, too little for any single image to be flagged."""
    return np.round((images.astype(np.float64) - 128) * contrast + 128).astype(np.uint8)


@pytest.mark.parametrize("prep", PREPS, ids=["rgb-nchw-imagenet", "bgr-nhwc-caffe", "uint8", "gray"])
def test_descriptors_of_known_images_whatever_the_preprocessing(prep):
    grey, colour = _grey(), _colour()
    d = ic.describe(prep.normalize(grey), prep)
    reference = ic.describe(PREPS[0].normalize(grey), PREPS[0])
    np.testing.assert_allclose(d[:, 1:], reference[:, 1:], atol=1e-3)  # the same pixels, however normalised
    if prep.channel_order == "GRAY":
        assert np.isnan(d[:, COLUMN["colourfulness"]]).all()  # a one-channel model sees no colour
    else:
        assert np.abs(d[:, COLUMN["colourfulness"]]).max() < 1e-3  # a grey image has none
        dc = ic.describe(prep.normalize(colour), prep)
        assert (dc[:, COLUMN["colourfulness"]] > 20).all()
        # colour images too: the same descriptors whatever the channel order, layout or input dtype
        np.testing.assert_allclose(dc, ic.describe(PREPS[0].normalize(colour), PREPS[0]), atol=1e-3)
        r, g, b = (colour[..., k].astype(float) for k in range(3))  # Hasler-Suesstrunk, written out
        rg, yb = r - g, (r + g) / 2 - b
        expected = (np.sqrt(rg.var(axis=(1, 2)) + yb.var(axis=(1, 2)))
                    + 0.3 * np.sqrt(rg.mean(axis=(1, 2)) ** 2 + yb.mean(axis=(1, 2)) ** 2))
        if ic.stride(prep.size) == 1:
            np.testing.assert_allclose(dc[:, COLUMN["colourfulness"]], expected, rtol=1e-4)
    # the grey levels are the image's own: its quantiles, std and mean gradient on the stride grid
    s = ic.stride(prep.size)
    g = grey[:, ::s, ::s].astype(float)
    np.testing.assert_allclose(d[:, QUANTS], np.percentile(g.reshape(len(g), -1), ic.QUANTILES, axis=1).T, atol=1.01)
    np.testing.assert_allclose(d[:, COLUMN["grey_std"]], g.std(axis=(1, 2)), rtol=1e-4)
    grad = (np.abs(np.diff(g, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(g, axis=2)).mean(axis=(1, 2))) / 2
    np.testing.assert_allclose(d[:, COLUMN["gradient"]], grad, rtol=1e-4)


def test_an_inverted_image_mirrors_the_quantiles_and_a_blank_one_has_none():
    prep = PREPS[0]
    grey = _grey()
    d, inv = ic.describe(prep.normalize(grey), prep), ic.describe(prep.normalize(255 - grey), prep)
    np.testing.assert_allclose(inv[:, QUANTS], 255 - d[:, QUANTS][:, ::-1], atol=1.01)
    np.testing.assert_allclose(inv[:, COLUMN["grey_std"]], d[:, COLUMN["grey_std"]], rtol=1e-4)
    blank = ic.describe(prep.normalize(np.zeros((2, 32, 32), np.uint8)), prep)
    np.testing.assert_allclose(blank, 0, atol=1e-3)


def test_the_envelope_flags_a_colour_image_for_a_grey_trained_check_and_not_its_training_images():
    prep = PREPS[0]
    train = ic.describe(prep.normalize(_grey(40)), prep)
    fitted = ic.fit(train, "40 grey images")
    assert fitted["images"] == 40 and fitted["descriptors"] == list(ic.DESCRIPTORS)
    lo, hi = fitted["training_range"]["colourfulness"]
    assert abs(lo) < 1e-3 and abs(hi) < 1e-3
    assert fitted["envelope"]["colourfulness"][1] == pytest.approx(ic.FLOOR, abs=1e-3)
    check = ic.InputCheck.from_meta(fitted, "test")
    assert not any(f["unlike_training"] for f in check.flag(prep.normalize(_grey(40)), prep))
    flags = check.flag(prep.normalize(_colour()), prep)
    assert all(f["unlike_training"] for f in flags)
    assert flags[0]["reasons"][0].startswith("colourfulness ") and "training images 0.0–0.0" in flags[0]["reasons"][0]
    # a blank image is outside on its grey levels and texture
    blank = check.flag(prep.normalize(np.zeros((1, 32, 32), np.uint8)), prep)[0]
    assert blank["unlike_training"] and any(r.startswith("texture (mean gradient) 0.0") for r in blank["reasons"])
    # a one-channel model's check has no colourfulness, and says so
    gray = ic.fit(ic.describe(PREPS[3].normalize(_grey(40)), PREPS[3]), "gray")
    assert "colourfulness" not in gray["descriptors"] and "one-channel" in gray["not_available"]["colourfulness"]
    with pytest.raises(Exception, match="fewer than"):
        ic.fit(train[:5], "five")


def test_the_validation_rate_counts_flagged_images():
    prep = PREPS[0]
    fitted = ic.fit(ic.describe(prep.normalize(_grey(40)), prep), "grey")
    held_out = np.concatenate([ic.describe(prep.normalize(_grey(3, seed=9)), prep),
                               ic.describe(prep.normalize(_colour(1)), prep)])
    rated = ic.validation_rate(fitted, held_out, "4 images")
    assert rated["validation_flag_rate"] == 0.25 and rated["validation_images"] == 4
    assert "validation_distance" not in rated["set_reference"]  # 4 images: too few to judge as a set
    rated = ic.validation_rate(fitted, ic.describe(prep.normalize(_grey(25, seed=9)), prep), "25 images")
    ref = rated["set_reference"]
    assert 0 < ref["validation_distance"] < ref["validation_threshold"] == round(ic.SET_NOISE / 5, 3)


def test_the_set_check_finds_a_darker_narrower_set_and_not_one_like_the_training_images():
    prep = PREPS[0]
    fitted = ic.fit(ic.describe(prep.normalize(_grey(60)), prep), "60 grey images")
    ref = fitted["set_reference"]
    assert len(ref["levels"]) == ic.SET_LEVELS and set(ref["quantiles"]) == set(fitted["descriptors"])
    check = ic.InputCheck.from_meta(fitted, "test")
    same = check.compare_set(ic.describe(prep.normalize(_grey(30, seed=7)), prep))
    assert same["judged"] and not same["differs"] and same["statistic"] <= same["threshold"]
    # another "site": a slightly narrower window (contrast x0.93), every image still inside the envelope
    shifted_images = _narrower(_grey(30, seed=7))
    values = ic.describe(prep.normalize(shifted_images), prep)
    assert not any(f["unlike_training"] for f in check.flag_values(values))
    shifted = check.compare_set(values)
    assert shifted["differs"] and shifted["shifted"][0] == "grey_p99" and "grey_p01" in shifted["shifted"]
    assert shifted["distance"]["grey_p99"] > 4 * same["distance"]["grey_p99"]
    line = ic.set_line(shifted, "m fp32")
    assert line.startswith("WARNING m fp32: these 30 images differ as a set") and "grey level at 99 % by 0." in line
    assert ic.set_line(same, "m fp32") is None
    # too few images are not judged, even shifted ones
    few = check.compare_set(values[: ic.MIN_SET - 1])
    assert not few["judged"] and "too few" in few["why"]
    assert ic.set_line(few, "m") == f"note m: no set check: {ic.MIN_SET - 1} images are too few to judge as a set " \
        f"(at least {ic.MIN_SET})"
    # n counts near-duplicate groups where they are known: the same 30 shifted images as one scan's slices are
    # not judged, as 6 groups they need a larger distance, as 30 groups the same as without groups
    scan = check.compare_set(values, [7] * len(values))
    assert not scan["judged"] and scan["groups"] == 1 and "1 near-duplicate group(s)" in scan["why"]
    six = check.compare_set(values, [k % 6 for k in range(len(values))])
    assert six["judged"] and six["groups"] == 6 and six["threshold"] == round(ic.SET_NOISE / 6 ** 0.5, 3)
    assert check.compare_set(values, list(range(len(values))))["threshold"] == shifted["threshold"]


def test_a_check_without_a_set_reference_still_flags_images_and_says_the_set_check_is_missing():
    prep = PREPS[0]
    fitted = ic.fit(ic.describe(prep.normalize(_grey(40)), prep), "grey")
    old = {k: v for k, v in fitted.items() if k != "set_reference"}
    check = ic.InputCheck.from_meta(old, "old.onnx")
    values = ic.describe(prep.normalize(np.concatenate([_grey(25, seed=3), _colour(1)[..., 0]])), prep)
    assert [f["unlike_training"] for f in check.flag_values(values)] == \
        [f["unlike_training"] for f in ic.InputCheck.from_meta(fitted, "new").flag_values(values)]
    got = check.compare_set(values)
    assert not got["judged"] and "predates the set check" in got["why"]


@pytest.mark.parametrize("field,value,says", [("levels", [0.0, 50.0, 40.0], "set_reference.levels"),
                                              ("quantiles", {"gradient": [1.0, 2.0]}, "set_reference.quantiles"),
                                              ("spread", {"gradient": 0.0}, "set_reference.spread")])
def test_a_damaged_set_reference_is_refused_without_pydantic_too(field, value, says):
    prep = PREPS[0]
    fitted = ic.fit(ic.describe(prep.normalize(_grey(40)), prep), "grey")
    fitted["set_reference"][field] = value if field == "levels" else {**fitted["set_reference"][field], **value}
    with pytest.raises(ic.LungedgeError, match=says):
        ic.InputCheck.from_meta(fitted, "bad.onnx")


# -- export -> ONNX metadata -> predict / eval -------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputcheck")
    data = write_dataset(base / "data", ["a", "b", "c"], per_class=14, size=32)  # grey images
    from lungedge.cli import main

    assert main(["data", "split", str(data), "--out", str(base / "split.json"), "--group-by", "none"]) == 0
    assert main(["train", "smallcnn", "--split", str(base / "split.json"), "--epochs", "1", "--batch-size", "8",
                 "--image-size", "32", "--weights", "none", "--out", str(base / "runs"), "--run-name", "r"]) == 0
    write_dataset(base / "colour", ["a", "b", "c"], per_class=2, size=32, colour=True, seed=5)
    return base


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    from lungedge.export import export

    out = tmp_path_factory.mktemp("engines")
    lines = []
    summary = export("smallcnn", runs=run / "runs", out=out, fp16=True, engine=False, temperature=False,
                     log=lines.append)
    return summary, out / "smallcnn", "\n".join(lines)


def test_export_fits_on_the_training_part_and_stamps_every_file(run, exported):
    summary, folder, log = exported
    check = summary["input_check"]
    split = json.loads((run / "split.json").read_text())
    n_train = sum(it["split"] == "train" for it in split["items"])
    n_val = sum(it["split"] == "val" for it in split["items"])
    assert check["images"] == n_train and check["fitted_on"].startswith(f"{n_train} training images of")
    assert check["validation_images"] == n_val and check["validation_flag_rate"] is not None
    assert f"input check fitted on {n_train} training images" in log
    assert f"of the {n_val} validation images" in log
    for f in ("smallcnn.fp32.onnx", "smallcnn.fp16.onnx"):
        assert onnx_meta.read(folder / f)["extra"]["input_check"] == check
    ref = check["set_reference"]  # the set check's reference travels with it
    assert len(ref["levels"]) == ic.SET_LEVELS and set(ref["quantiles"]) == set(check["descriptors"])
    assert "validation_distance" not in ref  # 6 validation images: too few to judge as a set


def _eval_json(onnx_file, args, tmp_path, capsys):
    code, out, err = run_cli(["eval", onnx_file, *args, "--out", tmp_path, "--json", "--bootstrap", "100"], capsys)
    assert code == 0, err
    return json.loads(out)[0], err


def _same_and_narrow(tmp_path):
    """36 images like the training images, and the same through a slightly narrower window (another "site")."""
    from PIL import Image

    same = write_dataset(tmp_path / "same", ["a", "b", "c"], per_class=12, size=32, seed=11)
    narrow = tmp_path / "narrow"
    for f in same.rglob("*.png"):
        (narrow / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_narrower(np.asarray(Image.open(f)))).save(narrow / f.parent.name / f.name)
    return same, narrow


def test_eval_says_when_a_set_differs_from_the_training_images(run, exported, tmp_path, capsys):
    _, folder, _ = exported
    onnx_file = folder / "smallcnn.fp32.onnx"
    same, narrow = _same_and_narrow(tmp_path)
    row, err = _eval_json(onnx_file, ["--data", same], tmp_path, capsys)
    shift = row["set_shift"]
    assert shift["judged"] and not shift["differs"] and shift["images"] == 36 and "as a set" not in err
    # two backends: two rows, each with the set check, and its line once (they see the same pixels)
    code, out, err = run_cli(["eval", onnx_file, "--data", narrow, "--backend", "onnxruntime,openvino", "--out",
                              tmp_path, "--json", "--bootstrap", "100"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 and all(r["set_shift"]["differs"] for r in rows), err
    row = rows[0]
    assert row["unlike_training"] < 0.1, err  # (almost) no single image is flagged ...
    shift = row["set_shift"]  # ... but the set is
    assert shift["differs"] and shift["statistic"] > shift["threshold"] and "grey_p99" in shift["shifted"]
    (line,) = [ln for ln in err.splitlines() if "differ as a set" in ln]
    assert line.startswith("WARNING smallcnn: these 36 images differ as a set from the training images: ")
    assert "grey level at 99 % by" in line and "unlike the training images as a set" in err
    # the split's own test part is a handful of images: not judged, and said
    row, err = _eval_json(onnx_file, ["--split", run / "split.json"], tmp_path, capsys)
    assert not row["set_shift"]["judged"] and f"no set check: {row['set_shift']['images']} images are too few" in err


def test_a_file_from_before_the_set_check_still_evaluates(run, exported, tmp_path, capsys):
    import onnx

    _, folder, _ = exported
    model = onnx.load(str(folder / "smallcnn.fp32.onnx"))
    meta = onnx_meta.from_model(model)
    del meta["extra"]["input_check"]["set_reference"]
    onnx_meta.attach(model, meta)
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    same = write_dataset(tmp_path / "same", ["a", "b", "c"], per_class=8, size=32, seed=11)
    row, err = _eval_json(old, ["--data", same], tmp_path, capsys)
    assert row["unlike_training"] == 0.0 and row["metrics"]["n"] == 24
    assert not row["set_shift"]["judged"] and "predates the set check" in row["set_shift"]["why"]
    assert "no set check: the model file predates the set check" in err


def test_predict_warns_on_a_colour_image_and_not_on_a_grey_one(run, exported, capsys):
    _, folder, _ = exported
    onnx_file = folder / "smallcnn.fp32.onnx"
    grey = next((run / "data" / "a").glob("*.png"))
    colour = next((run / "colour" / "b").glob("*.png"))
    code, out, err = run_cli(["predict", onnx_file, grey, colour], capsys)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(colour) in warnings[0] and "colourfulness" in warnings[0]
    assert warnings[0].endswith("the class shown may be meaningless")
    code, out, err = run_cli(["predict", onnx_file, grey, colour, "--json"], capsys)
    assert code == 0, err
    got = {p["image"]: p for p in json.loads(out)["predictions"]}
    assert got[str(grey)]["input_check"] == {"unlike_training": False, "reasons": []}
    assert got[str(colour)]["input_check"]["unlike_training"] is True
    assert got[str(colour)]["input_check"]["reasons"][0].startswith("colourfulness")
    assert err.count("warning:") == 1 and str(colour) in err  # beside the JSON, on stderr
    # the class and probabilities are the model's, check or none
    code, plain, _ = run_cli(["predict", run / "runs" / "smallcnn" / "r" / "best.pth", colour, "--json"], capsys)
    pred = json.loads(plain)["predictions"][0]
    assert "input_check" not in pred  # a checkpoint carries no check
    np.testing.assert_allclose(list(pred["probabilities"].values()),
                               list(got[str(colour)]["probabilities"].values()), atol=1e-4)


def test_eval_reports_the_share_of_test_images_flagged(run, exported, tmp_path, capsys):
    _, folder, _ = exported
    onnx_file = folder / "smallcnn.fp32.onnx"
    code, out, err = run_cli(["eval", onnx_file, "--split", run / "split.json", "--out", tmp_path, "--json",
                              "--bootstrap", "100"], capsys)
    assert code == 0, err
    assert json.loads(out)[0]["unlike_training"] == 0.0 and "unlike the training images" not in err
    code, out, err = run_cli(["eval", onnx_file, "--data", run / "colour", "--backend", "onnxruntime,openvino",
                              "--out", tmp_path, "--json", "--bootstrap", "100"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 and all(r["unlike_training_count"] == 6 for r in rows)
    row = rows[0]
    assert row["unlike_training"] == 1.0 and row["unlike_training_count"] == 6
    # named once: both backends see the same pixels
    assert err.count("6 of 6 images (100.0%) unlike the training images: img") == 1 and "and 3 more" in err
    assert "100.0% unlike the training images" in err


def test_a_damaged_input_check_is_one_line_naming_the_field(exported, tmp_path, capsys):
    import onnx

    _, folder, _ = exported
    for path, value, field in ((["envelope", "gradient"], [5.0, "x"], "envelope.gradient"),
                               (["descriptors"], ["colourfulness", "hue"], "descriptors"),
                               (["images"], 0, "images"),
                               (["set_reference", "levels"], [0, 50, 40], "set_reference.levels"),
                               (["set_reference", "quantiles", "gradient"], [1.0, 2.0], "set_reference.quantiles"),
                               (["set_reference", "spread", "grey_std"], -1.0, "set_reference.spread")):
        model = onnx.load(str(folder / "smallcnn.fp32.onnx"))
        meta = onnx_meta.from_model(model)
        target = meta["extra"]["input_check"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        onnx_meta.attach(model, meta)
        bad = tmp_path / "bad.onnx"
        onnx.save(model, str(bad))
        code, out, err = run_cli(["predict", bad, tmp_path / "x.png"], capsys)
        assert code != 0 and "Traceback" not in err
        (line,) = err.strip().splitlines()
        assert "extra.input_check" in line and field in line


def test_no_input_check_without_training_images_or_when_asked(run, tmp_path, capsys):
    code, out, err = run_cli(["export", "smallcnn", "--runs", run / "runs", "--out", tmp_path / "e", "--no-engine",
                              "--no-input-check", "--no-temperature"], capsys)
    assert code == 0, err
    assert "input check" not in out
    assert "input_check" not in onnx_meta.read(tmp_path / "e" / "smallcnn" / "smallcnn.fp32.onnx")["extra"]
    # a checkpoint lungedge did not train here (no run split beside it): a note, or --calib-data's images
    outside = tmp_path / "outside" / "model.pth"
    outside.parent.mkdir()
    shutil.copy(run / "runs" / "smallcnn" / "r" / "best.pth", outside)
    code, out, err = run_cli(["export", "smallcnn", "--checkpoint", outside, "--out", tmp_path / "f", "--no-engine",
                              "--data", run / "data"], capsys)
    assert code == 0, err
    assert "note: no input check: no training images known" in out
    assert "input_check" not in onnx_meta.read(tmp_path / "f" / "smallcnn" / "smallcnn.fp32.onnx")["extra"]
    code, out, err = run_cli(["export", "smallcnn", "--checkpoint", outside, "--out", tmp_path / "g", "--no-engine",
                              "--data", run / "data", "--calib-data", run / "data"], capsys)
    assert code == 0, err
    check = onnx_meta.read(tmp_path / "g" / "smallcnn" / "smallcnn.fp32.onnx")["extra"]["input_check"]
    assert check["images"] == 42 and check["validation_flag_rate"] is None
    assert "no validation images to measure its false-flag rate on" in out
