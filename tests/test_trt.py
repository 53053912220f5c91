"""The logic around TensorRT engines, tested without TensorRT; the build itself needs the library."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lungedge import trt
from lungedge.errors import LungedgeError

H200 = trt.Target("NVIDIA H200", "9.0", "10.13.2.6")
ORIN = trt.Target("Orin (nvgpu)", "8.7", "10.3.0")


def test_engine_name_carries_precision_batch_gpu_and_version(tmp_path):
    path = trt.engine_path(tmp_path / "engines", "densenet121", "fp16", 8, H200)
    assert path == tmp_path / "engines" / "densenet121" / "densenet121.fp16.b8.nvidia-h200.trt10.13.2.engine"
    assert trt.engine_path("engines", "resnet50", "int8", 1, ORIN).name == "resnet50.int8.b1.orin-nvgpu.trt10.3.0.engine"
    assert trt.sidecar_path(path).name == "densenet121.fp16.b8.nvidia-h200.trt10.13.2.engine.json"


@pytest.mark.parametrize("precision,batch,message", [("bf16", 1, "unknown precision"), ("fp16", 0, "--max-batch")])
def test_engine_name_refuses_bad_settings(precision, batch, message):
    with pytest.raises(LungedgeError, match=message):
        trt.engine_path("engines", "m", precision, batch, H200)


@pytest.mark.parametrize("version,mode", [("10.3.0", "builder-flags"), ("10.13.2.6", "builder-flags"),
                                          ("11.0.0", "strongly-typed"), ("11.2.1", "strongly-typed")])
def test_build_mode_follows_the_tensorrt_release(version, mode):
    assert trt.build_mode(version, "int8") == mode


def test_old_tensorrt_is_refused():
    with pytest.raises(LungedgeError, match="too old"):
        trt.build_mode("8.6.1", "fp16")


def _sidecar(tmp_path, target=ORIN):
    onnx_file = tmp_path / "m.fp16.onnx"
    onnx_file.write_bytes(b"pretend onnx")
    engine = trt.engine_path(tmp_path, "resnet50", "fp16", 4, target)
    meta = trt.make_sidecar(onnx_file, "resnet50", "fp16", 4, target, 12.5, "builder-flags")
    trt.write_json(trt.sidecar_path(engine), meta)
    return engine, meta


def test_sidecar_round_trip(tmp_path):
    engine, meta = _sidecar(tmp_path)
    read = trt.read_sidecar(engine)
    assert read == meta
    assert read["onnx_sha256"] == trt.sha256_file(tmp_path / "m.fp16.onnx")
    assert (read["gpu"], read["compute_capability"], read["trt_version"]) == ("Orin (nvgpu)", "8.7", "10.3.0")


def test_same_gpu_and_release_is_accepted(tmp_path):
    _, meta = _sidecar(tmp_path)
    trt.check_compatible(meta, trt.Target("Orin (nvgpu)", "8.7", "10.3.0.30"))  # build number may differ


@pytest.mark.parametrize("here,what", [(trt.Target("NVIDIA H200", "9.0", "10.3.0"), "this is NVIDIA H200"),
                                       (trt.Target("Orin (nvgpu)", "8.7", "10.4.0"), "TensorRT here is 10.4.0")])
def test_other_gpu_or_release_is_refused_with_a_rebuild_hint(tmp_path, here, what):
    _, meta = _sidecar(tmp_path)
    with pytest.raises(LungedgeError) as err:
        trt.check_compatible(meta, here)
    assert what in str(err.value)
    assert "rebuild it here: lungedge engine build engines/resnet50/m.fp16.onnx --max-batch 4" in str(err.value)


def test_missing_or_corrupt_sidecar(tmp_path):
    engine = tmp_path / "x.engine"
    with pytest.raises(LungedgeError, match="sidecar .* is missing"):
        trt.read_sidecar(engine)
    trt.sidecar_path(engine).write_text("{broken")
    with pytest.raises(LungedgeError, match="corrupt"):
        trt.read_sidecar(engine)
    trt.sidecar_path(engine).write_text(json.dumps({"format": "other"}))
    with pytest.raises(LungedgeError, match="not a lungedge engine sidecar"):
        trt.read_sidecar(engine)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_the_build_says_where_to_build(tmp_path):
    with pytest.raises(LungedgeError, match="TensorRT is not installed here"):
        trt.build_engine(tmp_path / "m.onnx", "m", "fp16", 1, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT and a CUDA GPU")
def test_build_and_load_a_real_engine(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    onnx_file = tmp_path / "tiny.onnx"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), onnx_file, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    engine = trt.build_engine(onnx_file, "tiny", "fp16", 4, tmp_path)
    _, meta = trt.load_engine(engine)
    assert meta["max_batch"] == 4 and engine.name.startswith("tiny.fp16.b4.")
