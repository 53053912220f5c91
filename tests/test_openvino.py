"""The OpenVINO backend on real OpenVINO (CPU): FP32 forced, BF16 as its own precision, INT8 Q/DQ files."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: F401  (torch before anything that might pull in tensorflow)

pytest.importorskip("openvino")

from lungedge import onnx_meta, quantize  # noqa: E402
from lungedge.errors import LungedgeError  # noqa: E402
from lungedge.preprocess import Preprocessing  # noqa: E402
from lungedge.runners import registry  # noqa: E402
from lungedge.runners.artifact import artifact_info  # noqa: E402
from lungedge.runners import discover  # noqa: E402
from lungedge.runners.openvino import cpu_has_bf16  # noqa: E402

CLASSES = ["Benign", "Malignant", "Normal"]


def _stamp(path, precision, **extra):
    import onnx

    model = onnx.load(str(path))
    onnx_meta.attach(model, onnx_meta.make_metadata("smallcnn", "torch", CLASSES, Preprocessing(size=16), precision,
                                                    "0" * 64, **extra))
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, monkeypatch_module=None):
    import torch

    d = tmp_path_factory.mktemp("ov")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 3),
    ).eval()
    fp32 = d / "smallcnn.fp32.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), str(fp32), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    _stamp(fp32, "fp32")
    x = np.random.default_rng(0).normal(size=(32, 3, 16, 16)).astype(np.float32)
    out = {"fp32": fp32, "x": x}
    for target, name in (("trt", "int8"), ("cpu", "int8-cpu")):
        q = quantize.to_int8(fp32, d / f"smallcnn.{name}.onnx", target, "minmax", d / "ranges.json", batches=[x])
        out[name] = _stamp(q, "int8", int8_target=target)
    if quantize.nncf_available():  # NNCF's placement from the same images: the int8-ov file (#14)
        q = quantize.to_int8_nncf(fp32, d / "smallcnn.int8-ov.onnx", lambda: iter([x]), len(x))
        out["int8-ov"] = _stamp(q, "int8", int8_target="ov")
    return out


def _ort(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGEDGE_OPENVINO_CACHE", str(tmp_path / "cache"))


def test_fp32_runs_in_fp32_and_matches_onnxruntime(files, tmp_path):
    x = files["x"]
    with registry.open_runner(files["fp32"], backend="openvino", threads=1) as r:
        got = r.infer(x)
        facts = r.describe()
        assert r.precision == "fp32" and r.variant == "fp32" and r.threads_used() == 1
    np.testing.assert_allclose(got, _ort(files["fp32"], x), rtol=1e-4, atol=1e-4)
    assert facts["inference_precision"] == "f32" and facts["performance_hint"] == "LATENCY"
    assert facts["cache_dir"] == str(tmp_path / "cache") and any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("how", ["under-a-file", "read-only"])
def test_a_cache_folder_it_cannot_write_is_not_claimed(files, tmp_path, monkeypatch, how):
    import os

    if how == "under-a-file":
        (tmp_path / "afile").write_text("x")
        folder = tmp_path / "afile" / "cache"
    else:
        if os.geteuid() == 0:
            pytest.skip("running as root: permissions do not stop writing")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    monkeypatch.setenv("LUNGEDGE_OPENVINO_CACHE", str(folder))
    with registry.open_runner(files["fp32"], backend="openvino", threads=1) as r:
        got = r.infer(files["x"])
        assert r.describe()["cache_dir"] is None  # provenance does not name a cache that holds nothing
    np.testing.assert_allclose(got, _ort(files["fp32"], files["x"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["int8", "int8-cpu", "int8-ov"])
def test_int8_files_run_quantized_and_agree(files, variant):
    if variant not in files:
        pytest.skip("NNCF is not installed: no int8-ov file")
    x = files["x"]
    with registry.open_runner(files[variant], backend="openvino", threads=1) as r:
        got = r.infer(x)
        assert r.precision == "int8" and r.variant == variant
    ref, ort_q = _ort(files["fp32"], x), _ort(files[variant], x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75
    # the same Q/DQ arithmetic as ONNX Runtime's, up to a quantization step or two on the logits
    assert np.abs(got - ort_q).max() <= 0.1 * np.abs(ref).max()
    assert not np.allclose(got, ref, rtol=1e-6, atol=1e-6)  # it really ran quantized


def test_bf16_is_its_own_precision(files):
    # the table points precision bf16 at the fp32 file, for OpenVINO only
    with pytest.raises(LungedgeError, match="precision is fixed"):
        registry.open_runner(files["fp32"], backend="onnxruntime", precision="bf16")
    runner = registry.open_runner(files["fp32"], backend="openvino", precision="bf16", threads=1)
    assert runner.precision == "bf16" and runner.variant == "bf16"
    if not cpu_has_bf16():
        with pytest.raises(LungedgeError, match="BF16"):
            with runner:
                pass
        return
    x = files["x"]
    with runner as r:
        got = r.infer(x)
        assert r.describe()["inference_precision"] == "bf16"
    ref = _ort(files["fp32"], x)
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())
    assert not np.array_equal(got, ref)


def test_bf16_refuses_a_quantized_file(files):
    with pytest.raises(LungedgeError, match="int8 model"):
        registry.open_runner(files["int8"], backend="openvino", precision="bf16")


def test_cpu_plans_hold_openvino_rows_and_bf16_from_the_fp32_file(files, tmp_path):
    import shutil

    engines = tmp_path / "engines"
    (engines / "smallcnn").mkdir(parents=True)
    for v in ("fp32", "int8-cpu", "int8", "int8-ov"):
        if v in files:
            shutil.copy(files[v], engines / "smallcnn" / f"smallcnn.{v}.onnx")
    jobs = discover.jobs_for_model("smallcnn", "cpu", runs=tmp_path / "runs", engines=engines)
    ov = {(j.precision, j.artifact.name) for j in jobs if j.backend == "openvino"}
    assert ("fp32", "smallcnn.fp32.onnx") in ov and ("int8", "smallcnn.int8-cpu.onnx") in ov
    assert ("int8", "smallcnn.int8.onnx") in ov  # OpenVINO's fastest INT8 file depends on the model: both run
    assert not any(j.variant in ("int8", "int8-ov") for j in jobs if j.backend == "onnxruntime")  # ORT: U8S8 only
    if "int8-ov" in files:  # NNCF's file runs with OpenVINO, its variant read from the file's metadata
        assert ("int8", "smallcnn.int8-ov.onnx") in ov
        assert artifact_info(engines / "smallcnn" / "smallcnn.int8-ov.onnx").variant == "int8-ov"
    assert (("bf16", "smallcnn.fp32.onnx") in ov) == discover.cpu_computes_bf16()
    assert all(j.precision != "bf16" for j in jobs if j.backend != "openvino")
    ref = discover.fp32_reference(next(j for j in jobs if j.backend == "openvino" and j.precision == "int8"))
    assert ref.precision == "fp32" and ref.artifact.name == "smallcnn.fp32.onnx"


def test_a_model_openvino_cannot_read_is_one_line_error(tmp_path, files):
    import onnx

    model = onnx.load(str(files["fp32"]))
    model.graph.node[0].op_type = "NoSuchOp"  # lungedge metadata intact, graph not runnable
    bad = tmp_path / "smallcnn.fp32.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(LungedgeError) as err:  # caught by the metadata check or by OpenVINO: one line either way
        with registry.open_runner(bad, backend="openvino") as r:
            r.infer(files["x"])
    assert "\n" not in str(err.value)


def test_openvino_is_in_the_cpu_plans():
    entry = registry.get_backend("openvino")
    assert entry.available() and "cpu" in entry.devices and "onnx" in entry.kinds


def test_int8_ov_is_nncf_placement_from_the_calibration_images(files):
    """The int8-ov file is NNCF's Q/DQ graph (not ONNX Runtime's): its quantizers differ from int8-cpu's,
    it carries the ``ov`` target, and a second pass over the same images gives the same file."""
    import onnx

    if "int8-ov" not in files:
        pytest.skip("NNCF is not installed: no int8-ov file")
    qdq = lambda p: sorted(n.input[0] for n in onnx.load(str(p)).graph.node if n.op_type == "QuantizeLinear")  # noqa: E731
    assert qdq(files["int8-ov"]) and qdq(files["int8-ov"]) != qdq(files["int8-cpu"])
    assert onnx_meta.variant_of_meta(onnx_meta.read(files["int8-ov"])) == "int8-ov"
    again = quantize.to_int8_nncf(files["fp32"], files["int8-ov"].with_name("again.onnx"),
                                  lambda: iter([files["x"]]), len(files["x"]))
    assert onnx.load(str(again)).graph == onnx.load(str(files["int8-ov"])).graph
    with pytest.raises(LungedgeError, match="NNCF could not quantize"):  # one line, not NNCF's traceback
        quantize.to_int8_nncf(files["fp32"], files["int8-ov"].with_name("none.onnx"), lambda: iter([]), 1)


def test_rows_record_the_precision_openvino_computed_in_and_its_version(files, tmp_path, capsys):
    """A bench row says what OpenVINO ran (inference precision, hints, streams) and which OpenVINO it was."""
    import json

    from conftest import run_cli

    precisions = "fp32,bf16" if discover.cpu_computes_bf16() else "fp32"
    code, _, err = run_cli(["bench", files["fp32"], "--backend", "openvino", "--precision", precisions,
                            "--batch-sizes", "1", "--iters", 2, "--warmup", 1, "--no-preprocessing", "--threads", 1,
                            "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for f in (tmp_path / "r").glob("bench-*.jsonl") for line in f.read_text().splitlines()]
    assert {r["variant"] for r in rows} == set(precisions.split(","))
    for r in rows:
        assert r["runtime"]["inference_precision"] == {"fp32": "f32", "bf16": "bf16"}[r["variant"]]
        assert r["runtime"]["openvino"] and r["provenance"]["libraries"]["openvino"]
