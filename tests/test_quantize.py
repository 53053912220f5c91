"""FP16 and calibrated INT8 ONNX on a tiny CNN: runs in ONNX Runtime, right Q/DQ form, cached ranges."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: F401  (torch before anything that might pull in tensorflow)

from lungedge import quantize
from lungedge.errors import LungedgeError


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    ).eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


def _run(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _images(n=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


def test_fp16_keeps_fp32_io_and_agrees(tiny_onnx, tmp_path):
    import onnx

    out = quantize.to_fp16(tiny_onnx, tmp_path / "tiny.fp16.onnx")
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    x = _images()
    ref, half = _run(tiny_onnx, x), _run(out, x)
    np.testing.assert_allclose(half, ref, rtol=2e-2, atol=2e-2)


def _qdq_zero_points(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    return zps, scales


@pytest.mark.parametrize("target,dtype", [("trt", np.int8), ("cpu", np.uint8)])
def test_int8_forms_and_cached_ranges(tiny_onnx, tmp_path, target, dtype):
    x = _images(32)
    cache = tmp_path / "ranges.json"
    out = quantize.to_int8(tiny_onnx, tmp_path / f"tiny.int8-{target}.onnx", target, "minmax", cache,
                           batches=(x[i : i + 8] for i in range(0, 32, 8)))
    zps, scales = _qdq_zero_points(out)
    assert zps and all(z.dtype == dtype for z in zps)
    if target == "trt":
        assert all(int(np.abs(z.astype(np.int32)).max()) == 0 for z in zps)  # symmetric
    assert any(s.ndim == 1 and s.size > 1 for s in scales)  # per-channel weight scales
    ref, q = _run(tiny_onnx, x), _run(out, x)
    assert (ref.argmax(1) == q.argmax(1)).mean() >= 0.75
    assert cache.is_file()
    # the cached ranges rebuild the same model without calibration data
    again = quantize.to_int8(tiny_onnx, tmp_path / "again.onnx", target, "minmax", cache)
    np.testing.assert_array_equal(_run(again, x), q)


def test_int8_without_calibration_data_is_a_clear_error(tiny_onnx, tmp_path):
    with pytest.raises(LungedgeError, match="needs calibration data"):
        quantize.to_int8(tiny_onnx, tmp_path / "x.onnx", "trt", "minmax", tmp_path / "none.json")
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_sample_is_stratified_deterministic_and_train_only():
    items = [{"path": f"{c}/{i}.png", "label": c, "split": "train" if i % 5 else "test", "sha256": f"{c}{i}"}
             for c, n in (("A", 100), ("B", 20), ("C", 5)) for i in range(n)]
    sample = quantize.calibration_sample(items, ["A", "B", "C"], 30, seed=1)
    assert len(sample) == 30
    assert all(it["split"] == "train" for it in sample)
    counts = {c: sum(it["label"] == c for it in sample) for c in "ABC"}
    assert counts["A"] > counts["B"] > 0 and counts["C"] >= 1
    assert quantize.calibration_sample(items, ["A", "B", "C"], 30, seed=1) == sample
    m1 = quantize.calibration_manifest(sample, "entropy", {"size": 16}, "fp")
    m2 = quantize.calibration_manifest(sample, "minmax", {"size": 16}, "fp")
    assert m1["files_sha256"] == m2["files_sha256"] and m1["key"] != m2["key"]
    with pytest.raises(LungedgeError, match="calib-method"):
        quantize.calibration_manifest(sample, "magic", {}, "fp")
