"""Temperature scaling: the fit recovers a known temperature, changes no prediction, and export stamps
it on every file so that eval and predict report calibrated probabilities."""

from __future__ import annotations

import json

import torch  # noqa: F401  (torch before anything that might pull in tensorflow)
import numpy as np
import pytest

from conftest import run_cli, write_dataset
from lungedge import onnx_meta
from lungedge import temperature as temp
from lungedge.metrics import calibration, softmax
from lungedge.runners.base import to_probabilities


def _overconfident(n=20000, k=3, true_t=2.5, seed=0):
    """Logits whose labels are drawn from softmax(logits / true_t): the model is over-confident by true_t."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(n, k))
    p = softmax(z / true_t)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, y


def test_fit_recovers_the_temperature_and_keeps_every_prediction():
    z, y = _overconfident()
    fit = temp.fit(z, y)
    assert fit["value"] == pytest.approx(2.5, rel=0.05) and not fit["at_bound"]
    assert fit["nll_after"] < fit["nll_before"] and fit["images"] == len(y)
    before, after = to_probabilities(z, "logits"), to_probabilities(z, "logits", fit["value"])
    assert (before.argmax(1) == after.argmax(1)).all()
    assert calibration(y, after)["ece"] < 0.02 < calibration(y, before)["ece"]
    # a model that outputs probabilities gets the same scaling through their logarithm
    np.testing.assert_allclose(to_probabilities(softmax(z), "probabilities", 2.5), softmax(z / 2.5), atol=1e-9)


def test_fit_stops_at_its_bounds_and_file_values_are_checked():
    z = np.array([[5.0, 0.0], [0.0, 5.0]] * 20)
    assert temp.fit(z, [0, 1] * 20)["at_bound"]  # all right: sharper and sharper until the bound
    assert temp.fit(z, [0, 1] * 20)["value"] == pytest.approx(temp.BOUNDS[0], rel=1e-3)
    for bad in (0, -1.0, float("nan"), float("inf"), "2", True, None):
        with pytest.raises(Exception, match="is not a finite number above 0"):
            temp.check(bad, "m.onnx")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("calibrated")
    data = write_dataset(base / "data", ["a", "b", "c"], per_class=12, size=32, colour=True)
    from lungedge.cli import main

    assert main(["data", "split", str(data), "--out", str(base / "split.json"), "--group-by", "none"]) == 0
    assert main(["train", "smallcnn", "--split", str(base / "split.json"), "--epochs", "2", "--batch-size", "8",
                 "--image-size", "32", "--weights", "none", "--out", str(base / "runs"), "--run-name", "r"]) == 0
    return base


def test_export_stamps_the_fitted_temperature_and_eval_and_predict_use_it(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(temp, "MIN_IMAGES", 3)  # the tiny split has a handful of validation images
    code, out, err = run_cli(["export", "smallcnn", "--runs", run / "runs", "--out", tmp_path / "e", "--fp16",
                              "--no-engine"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "e" / "smallcnn" / "smallcnn.export.json").read_text())
    fit = summary["temperature"]
    assert f"temperature {fit['value']:.3f} fitted on {fit['images']} validation images of" in out
    for f in ("smallcnn.fp32.onnx", "smallcnn.fp16.onnx"):
        assert onnx_meta.read(tmp_path / "e" / "smallcnn" / f)["extra"]["temperature"] == fit
    img = next((run / "data" / "b").glob("*.png"))
    onnx_file = tmp_path / "e" / "smallcnn" / "smallcnn.fp32.onnx"
    code, out, err = run_cli(["predict", onnx_file, img, "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    from lungedge.runners import open_runner

    with open_runner(onnx_file) as r:
        logits = r.infer(r.preprocessing.load_batch([img]))
    expected = softmax(logits / fit["value"])[0]
    assert got["temperature"] == fit["value"]
    np.testing.assert_allclose([got["predictions"][0]["probabilities"][c] for c in "abc"], expected, atol=1e-5)
    code, out, err = run_cli(["eval", onnx_file, "--split", run / "split.json", "--out", tmp_path / "r", "--json"],
                             capsys)
    assert code == 0, err
    assert json.loads(out)[0]["temperature"] == fit["value"]


def test_export_says_why_it_fits_no_temperature(run, tmp_path, capsys):
    code, out, err = run_cli(["export", "smallcnn", "--runs", run / "runs", "--out", tmp_path / "e", "--no-engine"],
                             capsys)
    assert code == 0, err
    assert f"are fewer than {temp.MIN_IMAGES}" in out and "not temperature-scaled" in out
    assert "temperature" not in onnx_meta.read(tmp_path / "e" / "smallcnn" / "smallcnn.fp32.onnx")["extra"]
    code, out, err = run_cli(["export", "smallcnn", "--runs", run / "runs", "--out", tmp_path / "e2", "--no-engine",
                              "--no-temperature"], capsys)
    assert code == 0 and "temperature-scaled" not in out, err
    assert not [line for line in out.splitlines() if line.startswith("temperature ")]  # "temperature T fitted on"
