"""Runners: one interface for every backend; every CPU runner agrees on top-1 for the same weights."""

from __future__ import annotations

import dataclasses
import json

import torch  # noqa: F401  torch and torchvision before anything imports tensorflow
import torchvision  # noqa: F401
import numpy as np
import pytest

from lungedge import quantize  # noqa: E402

from conftest import run_cli, write_dataset
from lungedge.errors import LungedgeError
from lungedge.io import sha256_file
from lungedge.runners import BACKENDS, Runner, artifact_info, open_runner, register
from lungedge.runners.discover import cpu_computes_bf16, resolve
from lungedge.runners.registry import unregister

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


TINY_CLASSES = ["a", "b", "c"]


def make_tiny_onnx(path, size: int = 8):
    """A 3-class ONNX with lungedge metadata: logits = global average pool of the 3 channels @ W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lungedge import onnx_meta
    from lungedge.preprocess import Preprocessing

    w = numpy_helper.from_array(np.array([[1, 0, -1], [0, 1, 0], [-1, 0, 1]], np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", [onnx_meta.INPUT_NAME], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], [onnx_meta.OUTPUT_NAME])],
        "tiny", [helper.make_tensor_value_info(onnx_meta.INPUT_NAME, TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(onnx_meta.OUTPUT_NAME, TensorProto.FLOAT, ["batch", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_meta.attach(model, onnx_meta.make_metadata("tiny", "torch", TINY_CLASSES, Preprocessing(size=size), "fp32",
                                                    "0" * 64))
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return make_tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.fp32.onnx")


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
    with pytest.raises(LungedgeError, match="runs fp16 on cuda only, not on cpu"):
        with open_runner(exported["run"] / "best.pth", device="cpu", precision="fp16"):
            pass
    with pytest.raises(LungedgeError, match="unknown backend 'nosuch'"):
        open_runner(onnx, backend="nosuch")
    r = open_runner(onnx)
    with pytest.raises(LungedgeError, match="outside"):
        r.infer(np.zeros((1, 3, 64, 64), np.float32))
    with r, pytest.raises(LungedgeError, match="shape"):
        r.infer(np.zeros((1, 3, 32, 32), np.float32))


def test_model_name_resolves_to_source_and_onnx_files(exported):
    targets = resolve(["googlenet"], runs=exported["runs"], engines=exported["engines"])
    got = [(t.backend, t.variant) for t in targets]
    onnx_files = ["fp32", "fp16", "int8-cpu"]
    expected = [("torch", "fp32")] + [("onnxruntime", v) for v in onnx_files]
    # OpenVINO runs every INT8 file (which is fastest depends on the model): NNCF's int8-ov, int8-cpu, int8
    ov_int8 = ["int8-ov"] * quantize.nncf_available() + ["int8-cpu", "int8"]
    if BACKENDS["openvino"].available():  # every installed backend on the device joins the default plan
        expected += [("openvino", v) for v in ["fp32", "fp16"] + ov_int8] + [("openvino", "bf16")] * cpu_computes_bf16()
    assert got == expected
    assert targets[0].artifact == exported["run"] / "best.pth"  # the checkpoint the ONNX came from
    only = resolve(["googlenet"], runs=exported["runs"], engines=exported["engines"], precisions=["int8"])
    assert [t.variant for t in only] == ["int8-cpu"] + ov_int8 * BACKENDS["openvino"].available()


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


def test_engine_runs_on_cuda_only_and_a_failed_open_closes(tiny_onnx):
    """An engine's runner is on cuda before it loads; loading a foreign (here: fake) engine fails with one
    line, on any machine (no TensorRT, no GPU, or another GPU), and the runner is closed."""
    from lungedge import trt

    engine = tiny_onnx.parent / "tiny.fp32.b1.fake.engine"
    engine.write_bytes(b"not an engine")
    trt.sidecar_path(engine).write_text(json.dumps({
        "format": trt.SIDECAR_FORMAT, "model": "tiny", "precision": "fp32", "max_batch": 1, "onnx": tiny_onnx.name,
        "onnx_sha256": sha256_file(tiny_onnx), "gpu": "no such GPU", "compute_capability": "0.0", "trt_version": "10.0.0"}))
    with pytest.raises(LungedgeError, match="runs on cuda only, not cpu"):
        open_runner(engine, device="cpu")
    r = open_runner(engine)
    assert (r.backend, r.device, r.precision, r.classes) == ("tensorrt", "cuda", "fp32", ["a", "b", "c"])
    closed = []
    real_close = r.close
    r.close = lambda: (closed.append(True), real_close())  # observe the runner's own close being reached
    with pytest.raises(LungedgeError):
        with r:
            pass
    assert closed == [True] and not r.active and r.device == "cuda"


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


# --- the contract every registered backend keeps ---------------------------------------------------------

def _artifact_for(name, request):
    """A small artifact of a kind the backend runs, or a skip that says why none can run here."""
    entry = BACKENDS[name]
    if not entry.available():
        pytest.skip(f"{name}: {', '.join(entry.requires)} not installed here")
    if "cpu" not in entry.devices and not torch.cuda.is_available():
        pytest.skip(f"{name} runs on {', '.join(entry.devices)} only; needs a CUDA GPU")
    if "onnx" in entry.kinds:
        return request.getfixturevalue("tiny_onnx")
    if "checkpoint" in entry.kinds:
        trained_run = request.getfixturevalue("trained_run")
        if "keras" in entry.frameworks:
            return trained_run("resnet50") / "best.h5"
        return trained_run("googlenet") / "best.pth"
    pytest.skip(f"{name}: no small {'/'.join(entry.kinds)} can be made here (TensorRT engines are built on their GPU)")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if "keras" in BACKENDS[n].frameworks else [])
                                  for n in BACKENDS])
def test_every_backend_keeps_the_runner_contract(name, request, tmp_path):
    artifact = _artifact_for(name, request)
    runner = open_runner(artifact, backend=name)
    entry = BACKENDS[name]
    assert runner.backend == name and runner.device in entry.devices and runner.classes == artifact_info(artifact).classes
    with pytest.raises(LungedgeError, match="outside"):
        runner.infer(np.zeros((1, *runner.preprocessing.input_shape), np.float32))
    device = runner.device
    with runner as r:
        assert r is runner and r.active and r.device == device  # loading never changes the device
        (spec,) = r.get_input_metadata().values()
        assert spec.shape[0] is None and tuple(spec.shape[1:]) == tuple(r.preprocessing.input_shape)
        assert np.dtype(spec.dtype).kind == "f"
        x = np.random.default_rng(0).normal(size=(3, *r.preprocessing.input_shape)).astype(np.float32)
        out = r.infer(x)
        assert out.shape == (3, len(r.classes)) and out.dtype == np.float32 and np.isfinite(out).all()
        np.testing.assert_allclose(r.infer(x[:1]), out[:1], rtol=1e-3, atol=1e-4)  # batch-independent
        with pytest.raises(LungedgeError, match="shape"):
            r.infer(x[:, :, :-1])
        with pytest.raises(LungedgeError, match="floating"):
            r.infer(x.astype(np.int64))
    assert not runner.active
    with pytest.raises(LungedgeError, match="outside"):
        runner.infer(x)
    # a failed open: the same backend on a file that is not a model; load raises, close still runs
    broken = tmp_path / f"broken{artifact.suffix}"
    broken.write_bytes(b"\0" * 64)
    info = dataclasses.replace(artifact_info(artifact), path=broken)
    bad = open_runner(info, backend=name)
    closed = []
    real_close = bad.close
    bad.close = lambda: (closed.append(True), real_close())
    with pytest.raises(LungedgeError):
        with bad:
            pass
    assert closed == [True] and not bad.active


# --- a new backend in a few lines, through bench and eval --------------------------------------------------

class MeanRunner(Runner):
    """Toy backend: the logit of class k is k x the mean input value (no library, no file read)."""

    includes = "numpy mean"

    def _infer(self, x):
        return x.mean(axis=(1, 2, 3))[:, None] * np.arange(len(self.classes), dtype=np.float32)


@pytest.fixture
def toy_backend():
    register("toy-mean", MeanRunner, kinds=("onnx",), default=False)  # the one line a backend needs
    yield BACKENDS["toy-mean"]
    unregister("toy-mean")


def test_a_toy_backend_runs_through_bench_and_eval(toy_backend, tiny_onnx, tmp_path, capsys):
    from lungedge.bench import run_bench

    data = write_dataset(tmp_path / "data", TINY_CLASSES, per_class=4, size=16, colour=True)
    with open_runner(tiny_onnx) as r:
        assert r.backend == "onnxruntime"  # default=False: never picked unasked
    jobs = resolve([tiny_onnx], backends=["toy-mean"])
    assert [(j.backend, j.device, j.precision, j.model) for j in jobs] == [("toy-mean", "cpu", "fp32", "tiny")]
    rows, path = run_bench(jobs, batch_sizes=(1, 2), warmup=1, iters=3, data=data, out=tmp_path / "results")
    assert len(rows) == 4 and path.is_file() and len(path.read_text().splitlines()) == 4
    assert all(r["backend"] == "toy-mean" and r["iters"] == 3 and r["latency_ms"]["p50"] > 0 for r in rows)
    assert {r["includes"].split(", then ")[-1] for r in rows} == {"numpy mean"}

    code, out, err = run_cli(["eval", tiny_onnx, "--backend", "toy-mean", "--data", data, "--out",
                              tmp_path / "results", "--json"], capsys)
    assert code == 0, err
    (row,) = json.loads(out)
    # what the toy predicts, computed here from the images: the last class if the mean input is positive
    paths = sorted(data.rglob("*.png"))
    x = artifact_info(tiny_onnx).preprocessing.load_batch(paths)
    expected = {p: (len(TINY_CLASSES) - 1 if m > 0 else 0) for p, m in zip(paths, x.mean(axis=(1, 2, 3)))}
    labels = {p: TINY_CLASSES.index(p.parent.name) for p in paths}
    assert row["backend"] == "toy-mean" and row["metrics"]["n"] == len(paths)
    assert sorted(row["predictions"]) == sorted(expected.values())
    assert row["metrics"]["accuracy"] == pytest.approx(np.mean([expected[k] == labels[k] for k in expected]))
    assert len(list((tmp_path / "results").glob("eval-*.jsonl"))) == 1
