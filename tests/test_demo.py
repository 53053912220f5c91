"""`lungedge demo` at its smallest setting, end to end, then re-run to check it reuses its work."""

from __future__ import annotations

import json

import torch  # noqa: F401  (torch before anything that may import tensorflow)
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from lungedge.synthetic import CLASSES, generate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_synthetic_set_is_labelled_deterministic_and_class_dependent(tmp_path):
    a = generate(tmp_path / "a", per_class=4, size=64, seed=3)
    b = generate(tmp_path / "b", per_class=4, size=64, seed=3)
    assert "SYNTHETIC" in (a / "SYNTHETIC.txt").read_text()
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 12 and {f.parts[0] for f in files} == set(CLASSES)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    # the bright pixels inside the dark lungs (nodules) differ by class: none for Normal
    bright = {c: np.mean([(np.asarray(Image.open(p)) > 150).sum() for p in (a / c).glob("*.png")]) for c in CLASSES}
    assert bright["Normal"] < bright["Benign"] and bright["Normal"] < bright["Malignant"]


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_them(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(["demo", "--out", out, "--models", "smallcnn", "--per-class", 12], capsys)
    assert code == 0, err
    report = out / "reports" / "report.html"
    assert f"report: {report.resolve()}" in stdout
    assert "SYNTHETIC" in stdout
    stages = ["inspect", "split", "train-smallcnn", "export-smallcnn", "eval-smallcnn", "bench", "report"]
    assert sorted(p.name for p in (out / ".done").iterdir()) == sorted(stages)
    md = (out / "reports" / "report.md").read_text()
    for backend, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"),
                               ("onnxruntime", "int8-cpu")):
        assert f"| smallcnn | {backend} | cpu | {precision} |" in md  # eval and bench figures for each
    assert "smallcnn (" in md  # the regenerated comparison table
    html = report.read_text()
    assert "data:image/png;base64," in html
    from lungedge.quantize import nncf_available  # NNCF's int8-ov file where NNCF is installed (#14)

    assert {f.name for f in (out / "engines" / "smallcnn").glob("*.onnx")} == {
        "smallcnn.fp32.onnx", "smallcnn.fp16.onnx", "smallcnn.int8.onnx", "smallcnn.int8-cpu.onnx"} | (
        {"smallcnn.int8-ov.onnx"} if nncf_available() else set())
    assert json.loads((out / "demo.json").read_text())["models"] == ["smallcnn"]

    code, stdout, err = run_cli(["demo", "--out", out, "--models", "smallcnn", "--per-class", 12], capsys)
    assert code == 0, err
    assert stdout.count("already done, reused") == len(stages)


def test_demo_refuses_an_unknown_model(tmp_path, capsys):
    code, _, err = run_cli(["demo", "--out", tmp_path, "--models", "alexnet"], capsys)
    assert code == 2 and "alexnet" in err and "smallcnn" in err


def test_a_stage_runs_real_commands_prints_them_and_resumes_from_its_marker(tmp_path):
    from lungedge.cli.common import main
    from lungedge.demo import Stages
    from lungedge.errors import LungedgeError

    data = generate(tmp_path / "data", per_class=3, size=64, seed=1)
    lines = []
    stages = Stages(tmp_path, lines.append, main)
    stages.run("split", [["data", "split", data, "--out", tmp_path / "split.json"]])
    assert f"[demo] $ lungedge data split {data} --out {tmp_path / 'split.json'}" in lines
    assert (tmp_path / "split.json").is_file() and (tmp_path / ".done" / "split").is_file()
    lines.clear()
    Stages(tmp_path, lines.append, main).run("split", [["data", "split", "/nowhere", "--out", tmp_path / "x.json"]])
    assert lines == ["[demo] split: already done, reused"] and not (tmp_path / "x.json").exists()
    with pytest.raises(LungedgeError, match="'lungedge data inspect ...' failed"):
        stages.run("inspect", [["data", "inspect", tmp_path / "nowhere"]])
    assert not (tmp_path / ".done" / "inspect").exists()


def test_a_demo_folder_is_continued_only_with_the_options_it_was_started_with(tmp_path):
    """Stages are reused by name: a rerun with another --models reused the bench and report stages (a report
    without the new model), one with another --data or --per-class reused the split of the other images. Such
    a rerun is refused in one line before any stage runs; the same options continue the demo."""
    from lungedge.cli.common import main
    from lungedge.demo import demo
    from lungedge.errors import LungedgeError

    ran = []

    def run(argv):  # the real commands, but training fails (as a killed or failed demo would stop there)
        ran.append(argv[0])
        return 2 if argv[0] == "train" else main(argv)

    out = tmp_path / "demo"
    with pytest.raises(LungedgeError, match="demo stopped"):
        demo(run, out=out, models=["smallcnn"], per_class=3, log=lambda s: None)
    assert ran == ["data", "data", "train"] and (out / ".done" / "split").is_file()
    for options, expect in (({"models": ["smallcnn", "googlenet"]}, "--models smallcnn,googlenet (started with smallcnn)"),
                            ({"per_class": 5}, "--per-class 5 (started with 3)"),
                            ({"data": tmp_path / "other"}, "--data")):
        ran.clear()
        kw = {"models": ["smallcnn"], "per_class": 3, **options}
        with pytest.raises(LungedgeError, match="holds a demo started with other options") as exc:
            demo(run, out=out, log=lambda s: None, **kw)
        assert expect in str(exc.value) and "\n" not in str(exc.value) and ran == []
    with pytest.raises(LungedgeError, match="demo stopped"):  # the same options: continued where it stopped
        demo(run, out=out, models=["smallcnn"], per_class=3, log=lambda s: None)
    assert ran == ["train"]


def test_a_second_demo_into_the_same_folder_is_refused_before_it_writes(tmp_path):
    from lungedge.demo import demo
    from lungedge.errors import LungedgeError
    from lungedge.io import FolderLock

    ran = []
    out = tmp_path / "demo"
    with FolderLock(out, "lungedge demo"):
        with pytest.raises(LungedgeError, match="is being written by pid"):
            demo(lambda argv: ran.append(argv) or 2, out=out, models=["smallcnn"], per_class=3, log=lambda s: None)
    assert ran == [] and not out.exists()
