"""Runners: one interface for every backend; every CPU runner agrees on top-1 for the same weights."""

from __future__ import annotations

import torch  # noqa: F401  torch and torchvision before anything imports tensorflow
import torchvision  # noqa: F401
import numpy as np
import pytest

from lungedge.errors import LungedgeError
from lungedge.runners import open_runner
from lungedge.runners.discover import resolve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """googlenet trained one epoch and exported to fp32/fp16/int8/int8-cpu ONNX."""
    from lungedge.cli import main

    run = trained_run("googlenet")
    tmp = tmp_path_factory.mktemp("runners")
    code = main(["export", "googlenet", "--runs", str(trained_run.runs), "--out", str(tmp / "engines"),
                 "--calibration", str(tmp / "c"), "--int8", "--fp16", "--calib-size", "9", "--calib-method", "minmax",
                 "--no-engine"])
    assert code == 0
    return {"run": run, "runs": trained_run.runs, "engines": tmp / "engines", "data": trained_run.data}


def _images(exported, n=6):
    return sorted(exported["data"].rglob("*.png"))[:n]


def test_every_cpu_runner_gives_the_same_top1(exported):
    folder = exported["engines"] / "googlenet"
    artifacts = [exported["run"] / "best.pth", folder / "googlenet.fp32.onnx", folder / "googlenet.fp16.onnx"]
    tops, logits = {}, {}
    for a in artifacts:
        with open_runner(a) as r:  # backend and preprocessing from the artifact alone
            assert r.classes == ["benign", "malignant", "normal"]
            x = r.preprocessing.load_batch(_images(exported))
            out = r.infer(x)
            assert out.shape == (6, 3) and out.dtype == np.float32
            logits[a.name], tops[a.name] = out, out.argmax(1)
    ref = tops["best.pth"]
    for name, t in tops.items():
        # near-ties of a one-epoch network may flip under FP16 rounding: only decisive images must agree
        top2 = np.sort(logits["best.pth"], 1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 1e-2 * np.abs(logits["best.pth"]).max()
        assert (t[decisive] == ref[decisive]).all(), name
    np.testing.assert_allclose(logits["googlenet.fp32.onnx"], logits["best.pth"], rtol=1e-3, atol=1e-4)


def test_int8_cpu_runner_runs_and_is_labelled(exported):
    path = exported["engines"] / "googlenet" / "googlenet.int8-cpu.onnx"
    with open_runner(path) as r:
        assert r.backend == "onnxruntime" and r.variant == "int8-cpu" and r.precision == "int8"
        assert r.infer(np.zeros((2, *r.preprocessing.input_shape), np.float32)).shape == (2, 3)


def test_runner_refuses_bad_use(exported):
    onnx = exported["engines"] / "googlenet" / "googlenet.fp32.onnx"
    with pytest.raises(LungedgeError, match="precision is fixed"):
        open_runner(onnx, precision="fp16")
    with pytest.raises(LungedgeError, match="does not run"):
        open_runner(onnx, backend="torch")
    with pytest.raises(LungedgeError, match="CUDA"):
        with open_runner(exported["run"] / "best.pth", device="cpu", precision="fp16"):
            pass
    r = open_runner(onnx)
    with pytest.raises(LungedgeError, match="outside"):
        r.infer(np.zeros((1, 3, 64, 64), np.float32))
    with r, pytest.raises(LungedgeError, match="shape"):
        r.infer(np.zeros((1, 3, 32, 32), np.float32))


def test_model_name_resolves_to_source_and_onnx_files(exported):
    targets = resolve(["googlenet"], runs=exported["runs"], engines=exported["engines"])
    got = [(t.backend, t.variant) for t in targets]
    assert got == [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8-cpu")]
    assert targets[0].artifact == exported["run"] / "best.pth"  # the checkpoint the ONNX came from
    only = resolve(["googlenet"], runs=exported["runs"], engines=exported["engines"], precisions=["int8"])
    assert [t.variant for t in only] == ["int8-cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runners_agree_with_cpu(exported):
    folder = exported["engines"] / "googlenet"
    x = None
    outs = {}
    for a, b in [(exported["run"] / "best.pth", "torch"), (folder / "googlenet.fp32.onnx", "onnxruntime")]:
        with open_runner(a, b, device="cuda") as r:
            x = r.preprocessing.load_batch(_images(exported)) if x is None else x
            outs[b] = r.infer(x).argmax(1)
    assert (outs["torch"] == outs["onnxruntime"]).all()


def test_tensorrt_runner_needs_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("TensorRT is not installed here (engines are built and run on the target GPU)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.slow
def test_keras_runner_agrees_with_onnxruntime(trained_run, tmp_path):
    """The one Keras test: the .h5 through Keras and its FP32 ONNX through ONNX Runtime, same top-1."""
    from lungedge.cli import main

    run = trained_run("resnet50")
    assert main(["export", "resnet50", "--runs", str(trained_run.runs), "--out", str(tmp_path / "e"),
                 "--calibration", str(tmp_path / "c"), "--no-engine"]) == 0
    out = {}
    for a in (run / "best.h5", tmp_path / "e" / "resnet50" / "resnet50.fp32.onnx"):
        with open_runner(a) as r:
            assert r.preprocessing.layout == "NHWC" and r.preprocessing.channel_order == "BGR"
            out[r.backend] = r.infer(r.preprocessing.load_batch(sorted(trained_run.data.rglob("*.png"))[:4]))
    assert set(out) == {"keras", "onnxruntime"}
    assert (out["keras"].argmax(1) == out["onnxruntime"].argmax(1)).all()
    np.testing.assert_allclose(out["onnxruntime"], out["keras"], rtol=1e-3, atol=1e-3)
