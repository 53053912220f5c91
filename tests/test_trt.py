"""The logic around TensorRT engines, tested without TensorRT; the build itself needs the library."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lungedge import trt
from lungedge.errors import LungedgeError

H200 = trt.EngineTarget("NVIDIA H200", "9.0", "10.13.2.6")
ORIN = trt.EngineTarget("Orin (nvgpu)", "8.7", "10.3.0")


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
    trt.check_compatible(meta, trt.EngineTarget("Orin (nvgpu)", "8.7", "10.3.0.30"))  # build number may differ


@pytest.mark.parametrize("here,what", [(trt.EngineTarget("NVIDIA H200", "9.0", "10.3.0"), "this is NVIDIA H200"),
                                       (trt.EngineTarget("Orin (nvgpu)", "8.7", "10.4.0"), "TensorRT here is 10.4.0")])
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


def tiny_onnx(path, input_name: str = "input", output_name: str | None = None):
    """A 3x16x16 -> 4 conv net with a dynamic batch axis, for the real-TensorRT tests."""
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), path, input_names=[input_name],
                      output_names=[output_name] if output_name else None,
                      dynamic_axes={input_name: {0: "batch"}}, dynamo=False)
    return path, model


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT and a CUDA GPU")
def test_build_and_load_a_real_engine(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    onnx_file, _ = tiny_onnx(tmp_path / "tiny.onnx")
    engine = trt.build_engine(onnx_file, "tiny", "fp16", 4, tmp_path)
    _, meta = trt.load_engine(engine)
    assert meta["max_batch"] == 4 and engine.name.startswith("tiny.fp16.b4.")


def test_only_the_tensorrt_int8_variant_is_buildable():
    from lungedge import onnx_meta

    meta = {"architecture": "googlenet", "precision": "int8", "extra": {"int8_target": "trt"}}
    assert trt.check_buildable(meta, "g.int8.onnx") == "int8"
    with pytest.raises(LungedgeError, match=r"CPU form .* googlenet\.int8\.onnx \(S8S8\)"):
        trt.check_buildable({**meta, "extra": {"int8_target": "cpu"}}, "g.int8-cpu.onnx")
    with pytest.raises(LungedgeError, match="precision 'bf16'"):
        trt.check_buildable({**meta, "precision": "bf16"}, "g.onnx")
    # the one variant mapping: file-name part <-> (precision, INT8 form)
    assert onnx_meta.variant_of("int8", "cpu") == "int8-cpu" and onnx_meta.variant_of("int8", "trt") == "int8"
    assert onnx_meta.variant_of("fp16") == "fp16" and onnx_meta.variant_facts("int8-cpu") == ("int8", "cpu")
    assert all(onnx_meta.variant_of(*facts) == v for v, facts in onnx_meta.VARIANTS.items())
    with pytest.raises(LungedgeError, match="unknown variant"):
        onnx_meta.variant_facts("int4")


# --- issue #15: the plain logic of the engine build and the TensorRT / ONNX Runtime GPU paths --------------

@pytest.mark.parametrize("mode,precision,flags", [
    ("builder-flags", "fp32", []), ("builder-flags", "fp16", ["FP16"]), ("builder-flags", "int8", ["FP16", "INT8"]),
    ("strongly-typed", "fp16", []), ("strongly-typed", "int8", [])])
def test_builder_flags_per_release_and_precision(mode, precision, flags):
    assert trt.builder_flags(mode, precision) == flags


def test_sidecar_says_how_layers_outside_qdq_run(tmp_path):
    ten = trt.non_qdq_layers("builder-flags", "int8")
    eleven = trt.non_qdq_layers("strongly-typed", "int8")
    assert "TensorRT's choice" in ten and "FP16" in ten and "as typed in the ONNX" in eleven and ten != eleven
    assert trt.non_qdq_layers("builder-flags", "fp32").startswith("FP32")
    onnx_file = tmp_path / "m.int8.onnx"
    onnx_file.write_bytes(b"x")
    side = trt.make_sidecar(onnx_file, "m", "int8", 8, H200, 1.0, "builder-flags", opt_batch=4,
                            non_qdq_layers=ten, tf32=True)
    assert side["opt_batch"] == 4 and side["non_qdq_layers"] == ten and side["format"] == trt.SIDECAR_FORMAT


def test_profile_shapes_put_the_measured_batch_at_opt():
    assert trt.profile_shapes([3, 224, 224], 32, 8) == ([1, 3, 224, 224], [8, 3, 224, 224], [32, 3, 224, 224])
    assert trt.profile_shapes([3, 64, 64], 16)[1] == [16, 3, 64, 64]  # default: opt at the maximum
    with pytest.raises(LungedgeError, match="--opt-batch must be between 1 and --max-batch \\(8\\), got 9"):
        trt.profile_shapes([3, 64, 64], 8, 9)
    with pytest.raises(LungedgeError, match="--max-batch must be at least 1"):
        trt.profile_shapes([3, 64, 64], 0)
    with pytest.raises(LungedgeError, match="dynamic dimensions besides the batch"):
        trt.profile_shapes([3, -1, -1], 8)


def test_a_batch_above_the_profile_is_refused_not_split():
    trt.check_batch(8, 8)
    with pytest.raises(LungedgeError, match=r"batch of 9 is above m\.engine's profile maximum \(8\); rebuild it "
                                            r"with --max-batch 9"):
        trt.check_batch(9, 8, "m.engine")


def test_engine_refuses_an_onnx_that_is_not_its_own(tmp_path):
    engine, meta = _sidecar(tmp_path)  # built from tmp_path/m.fp16.onnx, which lies in tmp_path
    onnx_file = tmp_path / "m.fp16.onnx"
    engine.parent.mkdir(parents=True, exist_ok=True)
    (engine.parent / onnx_file.name).write_bytes(onnx_file.read_bytes())
    assert trt.check_onnx_matches(meta, engine) == engine.parent / "m.fp16.onnx"
    (engine.parent / onnx_file.name).write_bytes(b"another export")
    with pytest.raises(LungedgeError, match="built from another m.fp16.onnx \\(SHA-256 differs\\); rebuild it here"):
        trt.check_onnx_matches(meta, engine)
    (engine.parent / onnx_file.name).unlink()
    with pytest.raises(LungedgeError, match="must lie next to it"):
        trt.check_onnx_matches(meta, engine)


def test_engine_dtype_names_map_to_numpy():
    import numpy as np

    assert trt.numpy_dtype("FLOAT") == np.float32 and trt.numpy_dtype("DataType.HALF") == np.float16
    assert trt.numpy_dtype("INT8") == np.int8
    with pytest.raises(LungedgeError, match="BF16 has no NumPy equivalent"):
        trt.numpy_dtype("BF16")


def test_engine_io_is_one_input_and_one_output():
    import numpy as np

    inp = trt.TensorIO("images", True, np.dtype(np.float16), (-1, 3, 224, 224))
    out = trt.TensorIO("scores", False, np.dtype(np.float32), (-1, 3))
    assert trt.split_io([out, inp]) == (inp, out)  # names come from the engine, in any order
    with pytest.raises(LungedgeError, match="has 1 inputs and 2 outputs \\(images, scores, aux\\)"):
        trt.split_io([inp, out, trt.TensorIO("aux", False, np.dtype(np.float32), (-1, 3))])
    with pytest.raises(LungedgeError, match="expected \\(N, C, H, W\\)"):
        trt.split_io([trt.TensorIO("x", True, np.dtype(np.float32), (-1, 10)), out])


def test_onnxruntime_gpu_sessions_refuse_cpu_fallback_and_trt_gets_caches(tmp_path):
    from lungedge.runners.onnxrt import session_config
    from lungedge.runners.onnxrt_trt import trt_provider_options

    assert session_config("cuda") == {"session.disable_cpu_ep_fallback": "1"} and session_config("cpu") == {}
    fp32 = trt_provider_options("fp32", tmp_path)
    assert fp32["trt_fp16_enable"] == "False" and fp32["trt_int8_enable"] == "False"  # an FP32 row stays FP32
    assert fp32["trt_engine_cache_enable"] == "True" and fp32["trt_engine_cache_path"] == str(tmp_path)
    assert trt_provider_options("fp16", tmp_path)["trt_fp16_enable"] == "True"
    int8 = trt_provider_options("int8", tmp_path)
    assert int8["trt_fp16_enable"] == int8["trt_int8_enable"] == "True"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_runner_reads_io_from_the_engine_and_refuses_big_batches(tmp_path):
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from lungedge.runners.trt import TensorRTRunner

    onnx_file, model = tiny_onnx(tmp_path / "tiny.onnx", "images", "scores")
    engine = trt.build_engine(onnx_file, "tiny", "fp32", 4, tmp_path, opt_batch=2)
    assert trt.read_sidecar(engine)["opt_batch"] == 2 and trt.read_sidecar(engine)["tf32"] is False
    eng, meta = trt.load_engine(engine)
    inp, out = trt.split_io(trt.engine_io(eng))
    assert (inp.name, out.name, inp.dtype) == ("images", "scores", np.float32)
    # the runner's infer path, without the lungedge metadata an exported ONNX carries
    runner = TensorRTRunner.__new__(TensorRTRunner)
    runner.info = type("Info", (), {"path": engine})()
    runner.loader = lambda: (eng, meta)
    runner.load()
    x = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    want = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(runner._infer(x), want, rtol=1e-3, atol=1e-4)
    with pytest.raises(LungedgeError, match="above .* profile maximum \\(4\\)"):
        runner._infer(np.concatenate([x, x[:1]]))
    runner.close()


def test_engine_and_sidecar_are_published_as_one_set(tmp_path):
    """A failed sidecar write leaves the previous engine and sidecar both as they were, no temporaries."""
    engine, meta = _sidecar(tmp_path)
    engine.write_bytes(b"old engine")
    trt.publish_engine(engine, b"new engine", meta)
    assert engine.read_bytes() == b"new engine"
    assert trt.read_sidecar(engine)["engine_sha256"] == trt.sha256_bytes(b"new engine")
    side = trt.sidecar_path(engine)
    side.unlink()
    side.mkdir()  # the sidecar cannot take its name: the write fails after the engine is written
    with pytest.raises(LungedgeError, match=f"cannot write {side}"):
        trt.publish_engine(engine, b"newer engine", meta)
    assert engine.read_bytes() == b"new engine"
    assert sorted(p.name for p in engine.parent.iterdir()) == sorted([engine.name, side.name])


def test_a_build_killed_between_the_engine_and_its_sidecar_is_completed_when_read(tmp_path):
    """SIGKILL after the engine took its name, before the sidecar did: reading the engine (what bench, predict
    and a runner do) first completes the pair from the build's journal: the new engine with its new sidecar."""
    import signal
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    engine, meta = _sidecar(tmp_path)
    trt.publish_engine(engine, b"old engine", meta)
    code = textwrap.dedent(f"""
        import os, signal, json
        from pathlib import Path
        import lungedge.io as io
        from lungedge import trt
        io._renaming = lambda index, tmp, path: os.kill(os.getpid(), signal.SIGKILL) if index == 1 else None
        trt.publish_engine(Path({str(engine)!r}), b"new engine", json.loads({json.dumps(meta)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert engine.read_bytes() == b"new engine"  # renamed; its sidecar not yet
    assert json.loads(trt.sidecar_path(engine).read_text())["engine_sha256"] == trt.sha256_bytes(b"old engine")
    side = trt.read_sidecar(engine)
    trt.check_engine_bytes(side, engine.read_bytes(), engine)
    assert side["engine_sha256"] == trt.sha256_bytes(b"new engine")
    assert sorted(p.name for p in engine.parent.iterdir()) == sorted([engine.name, trt.sidecar_path(engine).name])


def test_an_engine_build_removes_what_a_build_killed_mid_write_left(tmp_path):
    engine, meta = _sidecar(tmp_path)
    litter = [f".{engine.name}.abcd1234.tmp", f".{trt.sidecar_path(engine).name}.k3j_x9a2.tmp"]
    folder = engine.parent
    for name in litter + ["notes.tmp", ".other.abcd1234.tmp"]:
        (folder / name).write_text("x")
    trt.publish_engine(engine, b"engine", meta)
    assert not any((folder / n).exists() for n in litter)
    assert (folder / "notes.tmp").exists() and (folder / ".other.abcd1234.tmp").exists()


def test_engine_build_is_refused_while_its_folder_is_written(tmp_path):
    engine, meta = _sidecar(tmp_path)
    with trt.FolderLock(engine.parent, "lungedge export"):
        with pytest.raises(LungedgeError, match="being written by .*lungedge export"):
            trt.publish_engine(engine, b"engine", meta)
    assert not engine.exists()


def test_an_engine_its_sidecar_does_not_describe_is_named(tmp_path):
    engine, meta = _sidecar(tmp_path)
    trt.publish_engine(engine, b"engine A", meta)
    side = trt.read_sidecar(engine)
    trt.check_engine_bytes(side, b"engine A", engine)
    with pytest.raises(LungedgeError, match="not the engine its sidecar .* describes"):
        trt.check_engine_bytes(side, b"engine B", engine)
    trt.check_engine_bytes(meta, b"engine B", engine)  # a sidecar written before the hash was recorded
