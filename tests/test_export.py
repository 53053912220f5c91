"""Export: FP32/FP16/INT8 ONNX of the four architectures, metadata, parity, the group's own files."""

from __future__ import annotations

import json

import torch  # torch and torchvision before anything imports tensorflow
import torchvision  # noqa: F401
import numpy as np
import pytest

from conftest import TRAIN_CLASSES, run_cli, write_dataset
from lungedge import onnx_meta, quantize
from lungedge.export.compare import compare_outputs as parity
from lungedge.io import sha256_file
from lungedge.models.checkpoint import build_of, read_meta

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _ort(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
    return sess.run(None, {"input": x})[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["googlenet", "densenet121", "inception_v3", "resnet50"])
def test_export_fp32_fp16_int8_of_each_architecture(name, trained_run, tmp_path, capsys):
    run = trained_run(name)
    ckpt = run / ("best.h5" if name == "resnet50" else "best.pth")
    code, out, err = run_cli(["export", name, "--runs", trained_run.runs, "--out", tmp_path / "engines",
                              "--calibration", tmp_path / "calibration", "--fp16", "--int8", "--calib-size", 12,
                              "--calib-method", "minmax"], capsys)
    assert code == 0, err
    folder = tmp_path / "engines" / name
    # says how to build each engine on the target
    for precision in ("int8", "fp16"):
        assert f"lungedge engine build {folder / f'{name}.{precision}.onnx'} --max-batch 8" in out
    files = {p: folder / f"{name}.{p}.onnx" for p in ("fp32", "fp16", "int8", "int8-cpu")}
    meta = read_meta(ckpt)
    prep = None
    for precision, path in files.items():
        assert path.is_file() and not path.with_name(path.name + ".data").exists()  # one self-contained file
        m = onnx_meta.read(path)
        assert m["architecture"] == name and m["classes"] == TRAIN_CLASSES
        assert m["source_sha256"] == sha256_file(ckpt) and m["lungedge_version"]
        assert m["precision"] == precision.split("-")[0]
        assert m["preprocessing"].to_dict() == meta["preprocessing"]
        assert m["build"] == build_of(meta) and m["build"]["architecture"] == name  # how it was built travels
        prep = m["preprocessing"]
    x = np.random.default_rng(0).normal(size=(3, *prep.input_shape)).astype(np.float32)
    outs = {p: _ort(path, x) for p, path in files.items()}
    assert all(o.shape == (3, 3) for o in outs.values())  # dynamic batch, 3 classes
    np.testing.assert_allclose(_ort(files["fp32"], x[:1]), outs["fp32"][:1], rtol=1e-4, atol=1e-5)
    assert onnx_meta.read(files["int8"])["extra"]["int8_target"] == "trt"
    summary = json.loads((folder / f"{name}.export.json").read_text())
    assert summary["parity"]["fp32_vs_source"]["max_rel"] <= 1e-3
    assert {"fp16_vs_fp32", "int8_vs_fp32", "int8-cpu_vs_fp32"} <= set(summary["parity"])
    nncf = {"int8-ov"} if quantize.nncf_available() else set()  # NNCF's file for OpenVINO, where NNCF is installed
    assert set(summary["accuracy"]) == {"fp32", "fp16", "int8", "int8-cpu"} | nncf
    if nncf:
        assert onnx_meta.read(folder / f"{name}.int8-ov.onnx")["extra"]["int8_target"] == "ov"
    assert len(list((tmp_path / "calibration").glob("*/manifest.json"))) == 1


def _qdq_zero_points(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]


@pytest.mark.slow
def test_int8_for_tensorrt_is_symmetric_and_calibration_is_reused(trained_run, tmp_path, capsys):
    trained_run("googlenet")  # trains it, unless an earlier test already did
    args = ["export", "googlenet", "--runs", trained_run.runs, "--out", tmp_path / "e", "--calibration",
            tmp_path / "c", "--int8", "--calib-size", 9, "--calib-method", "minmax", "--no-engine"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    ranges = [line for line in out.splitlines() if line.startswith("int8 (")]
    assert len(ranges) == 2 and "computed and saved" in ranges[0]  # computed once, for the first form
    assert ranges[0].startswith("int8 (trt)") and ranges[1].startswith("int8 (cpu)") and "reused" in ranges[1]
    zps = _qdq_zero_points(tmp_path / "e" / "googlenet" / "googlenet.int8.onnx")
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    cpu = _qdq_zero_points(tmp_path / "e" / "googlenet" / "googlenet.int8-cpu.onnx")
    assert all(z.dtype == np.uint8 for z in cpu)
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "ranges reused" in out and "computed" not in out
    manifest = json.loads(next((tmp_path / "c").glob("*/manifest.json")).read_text())
    assert manifest["size"] == 9 and manifest["method"] == "minmax" and len(manifest["files"]) == 9
    labels = [f["label"] for f in manifest["files"]]
    assert all(labels.count(c) == 3 for c in TRAIN_CLASSES)  # class-stratified


def test_parity_ignores_ties_but_not_real_flips():
    ref = np.array([[1.0, 1.0 + 1e-7, -1.0], [3.0, 0.0, 0.0]], np.float32)
    got = np.array([[1.0 + 1e-7, 1.0, -1.0], [3.0, 0.0, 0.0]], np.float32)
    p = parity(ref, got)
    assert p["top1_agreement"] == 0.5 and p["top1_agreement_decisive"] == 1.0
    flipped = np.array([[1.0, 1.0, -1.0], [0.0, 3.0, 0.0]], np.float32)
    assert parity(ref, flipped)["top1_agreement_decisive"] == 0.0


def test_export_without_a_trained_model(tmp_path, capsys):
    code, _, err = run_cli(["export", "densenet121", "--runs", tmp_path / "runs"], capsys)
    assert code == 2
    assert err.strip().startswith("error: no trained densenet121 under") and "lungedge train densenet121" in err


def test_unknown_model_and_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["export", "alexnet"], capsys)
    assert code == 2 and "alexnet" in err and "densenet121" in err
    code, _, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "nope.pth"], capsys)
    assert code == 2 and "checkpoint not found" in err


def test_corrupt_and_truncated_onnx_give_clear_errors(tmp_path):
    from lungedge.errors import LungedgeError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(LungedgeError, match="not a valid ONNX model"):
        onnx_meta.read(bad)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten())
    good = tmp_path / "good.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 8, 8), str(good), dynamo=False)
    data = good.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(LungedgeError, match="not a valid ONNX model"):
        onnx_meta.read(tmp_path / "cut.onnx")
    with pytest.raises(LungedgeError, match="no lungedge metadata"):
        onnx_meta.read(good)


# -- the group's own files -----------------------------------------------------------------------------

@pytest.mark.slow
def test_bare_torchvision_densenet121_state_dict_with_1000_outputs(tmp_path, capsys):
    torch.manual_seed(0)
    full = torchvision.models.densenet121(weights=None).eval()
    torch.save(full.state_dict(), tmp_path / "group.pth")
    code, out, err = run_cli(["export", "densenet121", "--checkpoint", tmp_path / "group.pth", "--classes",
                              "Benign,Malignant,Normal", "--out", tmp_path / "e", "--no-engine"], capsys)
    assert code == 0, err
    assert "1000 outputs" in out and "first 3" in out
    path = tmp_path / "e" / "densenet121" / "densenet121.fp32.onnx"
    assert onnx_meta.read(path)["classes"] == ["Benign", "Malignant", "Normal"]
    x = np.random.default_rng(1).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        expected = full(torch.from_numpy(x))[:, :3].numpy()
    np.testing.assert_allclose(_ort(path, x), expected, rtol=1e-3, atol=1e-4)


def test_checkpoint_without_class_names_needs_classes(tmp_path, capsys):
    torch.save(torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False,
                                            num_classes=3).state_dict(), tmp_path / "g.pth")
    code, _, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "g.pth"], capsys)
    assert code == 2 and "--classes" in err


@pytest.mark.slow
def test_whole_pickled_model_needs_trust_pickle(tmp_path, capsys):
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=3).eval()
    torch.save(model, tmp_path / "whole.pth")
    args = ["export", "googlenet", "--checkpoint", tmp_path / "whole.pth", "--classes", "a,b,c", "--out",
            tmp_path / "e", "--no-engine"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--trust-pickle" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e" / "googlenet" / "googlenet.fp32.onnx").exists()
    code, out, err = run_cli(args + ["--trust-pickle"], capsys)
    assert code == 0, err
    assert (tmp_path / "e" / "googlenet" / "googlenet.fp32.onnx").is_file()


@pytest.mark.slow
def test_keras_resnet50_saved_with_plain_model_save(tmp_path, capsys, monkeypatch):
    """Through tf2onnx (the reader of test_keras_resnet50_reader.py stepped aside): the converter every
    Keras model that is not exactly ResNet50 + head goes through."""
    from lungedge.models.registry import import_keras

    monkeypatch.setenv("LUNGEDGE_KERAS_CONVERTER", "tf2onnx")

    keras = import_keras()
    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50(include_top=False, weights=None, pooling="avg", input_shape=(64, 64, 3))
    inputs = keras.Input((64, 64, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(base(inputs)))
    model.save(tmp_path / "group.h5")
    data = write_dataset(tmp_path / "data", ["Benign", "Malignant", "Normal"], per_class=2, size=64)
    code, out, err = run_cli(["export", "resnet50", "--checkpoint", tmp_path / "group.h5", "--data", data,
                              "--out", tmp_path / "e", "--no-engine"], capsys)
    assert code == 0, err
    path = tmp_path / "e" / "resnet50" / "resnet50.fp32.onnx"
    meta = onnx_meta.read(path)
    assert meta["classes"] == ["Benign", "Malignant", "Normal"] and meta["input_layout"] == "NHWC"
    assert meta["extra"]["converter"] == "tf2onnx"
    x = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32) * 50
    np.testing.assert_allclose(_ort(path, x), model(x, training=False).numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_calibration_set_of_another_data_set_is_refused(trained_run, tmp_path, capsys):
    trained_run("googlenet")
    other = write_dataset(tmp_path / "other", TRAIN_CLASSES, per_class=3, size=64, seed=42)
    code, _, err = run_cli(["export", "googlenet", "--runs", trained_run.runs, "--out", tmp_path / "e",
                            "--calibration", tmp_path / "c", "--int8", "--calib-data", other], capsys)
    assert code == 2 and "another data set" in err


def test_engine_asked_for_without_tensorrt_fails_before_any_work(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    torch.save(torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False,
                                            num_classes=3).state_dict(), tmp_path / "g.pth")
    previous = tmp_path / "e" / "googlenet" / "googlenet.int8.onnx"  # a set exported before, with INT8
    previous.parent.mkdir(parents=True)
    previous.write_bytes(b"the user's INT8 file")
    code, _, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "g.pth", "--classes", "a,b,c",
                            "--out", tmp_path / "e", "--engine"], capsys)
    assert code == 2 and "--engine: no TensorRT engine can be built here" in err and "TensorRT is not installed" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in previous.parent.iterdir()) == [previous.name]  # nothing written or replaced
    assert previous.read_bytes() == b"the user's INT8 file"
    code, out, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "g.pth", "--classes", "a,b,c",
                              "--out", tmp_path / "e"], capsys)
    assert code == 0 and "lungedge engine build" in out + err
    fp32 = tmp_path / "e" / "googlenet" / "googlenet.fp32.onnx"
    assert fp32.is_file()  # without --engine the ONNX is written and the build command printed
    build = onnx_meta.read(fp32)["build"]  # a foreign googlenet state dict: torchvision's pretrained defaults, recorded
    assert build["constructor"] == "torchvision.models.googlenet" and build["kwargs"]["transform_input"] is True
    assert build["weights"]["layout"] == "plain" and build["weights"]["assumed"]["transform_input"] is True


def test_source_kind_is_chosen_by_the_file(tmp_path):
    from lungedge.errors import LungedgeError
    from lungedge.export.sources import kind_of, kinds

    assert [k.name for k in kinds()] == ["torchscript", "torch.export", "torch", "keras", "onnx"]
    assert kind_of(tmp_path / "m.onnx").name == "onnx"
    assert kind_of(tmp_path / "m.pth").name == "torch" and kind_of(tmp_path / "m.PT").name == "torch"
    assert kind_of(tmp_path / "model.safetensors").name == "torch"  # a state dict, read as a .pth's is
    assert kind_of(tmp_path / "m.h5").name == "keras" and kind_of(tmp_path / "m.keras").name == "keras"
    with pytest.raises(LungedgeError, match=r"not a model file export reads \(accepted: TorchScript"):
        kind_of(tmp_path / "m.txt")


def test_keras_file_for_a_torch_model_is_refused(tmp_path, capsys):
    (tmp_path / "m.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    code, _, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "m.h5"], capsys)
    assert code == 2 and "is not a torch checkpoint, which googlenet needs" in err, err


def test_one_test_set_loader(tmp_path):
    from lungedge.data.split import make_split, write_manifest
    from lungedge.errors import LungedgeError
    from lungedge.preprocess import Preprocessing
    from lungedge.testset import load_test_set, split_of_run

    data = write_dataset(tmp_path / "data", TRAIN_CLASSES, per_class=4, size=16)
    manifest = make_split(data, val=0.0, test=0.5, group_by="none")
    split = write_manifest(manifest, tmp_path / "run" / "split.json")
    assert split_of_run(tmp_path / "run" / "best.pth") == split
    assert split_of_run(tmp_path / "elsewhere" / "best.pth") is None
    n_test = sum(it["split"] == "test" for it in manifest["items"])
    ts = load_test_set(split=split)
    assert len(ts.paths) == n_test and str(split) in ts.where
    assert sorted(ts.labels) == sorted(it["label"] for it in manifest["items"] if it["split"] == "test")
    assert list(ts.label_indices(TRAIN_CLASSES)) == [TRAIN_CLASSES.index(lbl) for lbl in ts.labels]
    assert ts.label_indices(["x", "y"]) is None
    x = ts.inputs(Preprocessing(size=16))
    assert x.shape == (n_test, 3, 16, 16) and ts.inputs(Preprocessing(size=16)) is x  # loaded once
    assert ts.head(2).inputs(Preprocessing(size=16)).shape[0] == 2
    assert len(load_test_set(split=split, limit=2).paths) == 2
    every = load_test_set(data=data)
    assert len(every.paths) == 4 * len(TRAIN_CLASSES) and every.where.startswith("all ")
    assert len(load_test_set(data=data, limit=3).paths) == 3
    with pytest.raises(LungedgeError, match="test images of .* are missing under"):
        load_test_set(split=split, data=tmp_path / "empty")
    with pytest.raises(LungedgeError, match="no test set given"):
        load_test_set()


def test_without_images_parity_uses_random_pixels_in_the_models_own_range():
    """No test images: random pixel images through the model's preprocessing, not N(0, 1) tensors (which a
    caffe-style model, that only subtracts means, sees as a black image: every INT8 file then 'disagrees')."""
    from types import SimpleNamespace

    from lungedge.export import evaluation_set
    from lungedge.preprocess import Preprocessing

    caffe = Preprocessing(size=16, mean=(103.939, 116.779, 123.68), std=(1, 1, 1), scale=1.0, channel_order="BGR",
                          layout="NHWC")
    ev = evaluation_set(SimpleNamespace(split_path=None, preprocessing=caffe), limit=8)
    assert ev.x.shape == (8, 16, 16, 3) and ev.x.dtype == np.float32 and ev.y is None
    assert -124 <= ev.x.min() < -100 and 130 < ev.x.max() <= 152 and ev.x.std() > 50
    assert "random-pixel images" in ev.where
    imagenet = evaluation_set(SimpleNamespace(split_path=None, preprocessing=Preprocessing(size=16)), limit=4)
    assert imagenet.x.shape == (4, 3, 16, 16) and -2.2 < imagenet.x.min() < -1.9 and 2.3 < imagenet.x.max() < 2.7


def test_parity_counts_nan_outputs_and_refuses_a_nan_reference():
    from lungedge.export.compare import within

    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 4.0]])
    other = ref.copy()
    other[1, 0] = np.nan
    other[2, 2] = np.inf
    p = parity(ref, other)
    assert p["nonfinite"] == 2 and p["top1_agreement"] == pytest.approx(1 / 3) and p["max_abs"] == 0.0
    assert not within(p) and within(parity(ref, ref.copy()))
    json.dumps(p, allow_nan=False)  # the export summary stays valid JSON
    with pytest.raises(ValueError, match="reference output is NaN or infinite on 1 of 3"):
        parity(np.array([[np.nan, 0, 0], [0, 0, 0], [1, 0, 0]]), ref)
