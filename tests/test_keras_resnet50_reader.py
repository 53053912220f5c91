"""A Keras ResNet50 .h5 read without TensorFlow into PyTorch and exported by torch.onnx (issue #14):
the same outputs as Keras, and every file that is not exactly that network left to tf2onnx."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: F401  (torch before tensorflow)

import foreign_files as ff  # noqa: E402
from lungedge.export.sources import keras_resnet50 as kr  # noqa: E402


def _torch_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("activation", ["softmax", "linear", "sigmoid"])
def test_the_reader_gives_what_keras_gives(tmp_path, activation):
    keras_model = ff.keras_resnet50_softmax(tmp_path / "r.h5", size=32, activation=activation)
    model, size = kr.read(tmp_path / "r.h5")
    assert size == 32
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32) * 50
    want = np.asarray(keras_model(x, training=False))
    got = _torch_out(model, x)
    assert got.shape == want.shape == (3, 3)
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= 1e-4 * scale
    if activation == "softmax":
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_files_that_are_not_exactly_resnet50_go_to_tf2onnx(tmp_path, monkeypatch):
    ff.tiny_keras(tmp_path / "tiny.h5")
    with pytest.raises(kr.NotResNet50, match="convolutions are not ResNet50's"):
        kr.read(tmp_path / "tiny.h5")
    ff.tiny_keras(tmp_path / "rescale.h5", rescale=True)
    with pytest.raises(kr.NotResNet50, match="other kinds: Rescaling"):
        kr.read(tmp_path / "rescale.h5")
    ff.keras_resnet50_softmax(tmp_path / "max.h5", size=32, pooling="max")
    with pytest.raises(kr.NotResNet50, match="other kinds: GlobalMaxPooling2D"):
        kr.read(tmp_path / "max.h5")
    (tmp_path / "bad.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # an HDF5 signature, then nothing
    with pytest.raises(kr.NotResNet50, match="unreadable here"):
        kr.read(tmp_path / "bad.h5")
    with pytest.raises(kr.NotResNet50, match="not an .h5 file"):
        kr.read(tmp_path / "model.keras")
    ff.keras_resnet50_softmax(tmp_path / "ok.h5", size=32)
    kr.read(tmp_path / "ok.h5")  # the very file it reads ...
    monkeypatch.setenv("LUNGEDGE_KERAS_CONVERTER", "tf2onnx")
    with pytest.raises(kr.NotResNet50, match="LUNGEDGE_KERAS_CONVERTER"):
        kr.read(tmp_path / "ok.h5")  # ... is left to tf2onnx when asked


def test_the_keras_worker_runs_keras_itself_and_a_dead_worker_is_one_line(tmp_path):
    from lungedge.errors import LungedgeError
    from lungedge.export.sources.keras import KerasReference

    keras_model = ff.keras_resnet50_softmax(tmp_path / "r.h5", size=32, activation="linear")
    ref = KerasReference(tmp_path / "r.h5", kr.inspect(tmp_path / "r.h5"))
    assert ref.keras and ref.note is None
    x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32) * 50
    np.testing.assert_allclose(ref(x), np.asarray(keras_model(x, training=False)), rtol=1e-5, atol=1e-5)
    proc = ref._proc
    ref.close()
    assert proc.returncode == 0  # the worker ended when its input closed
    (tmp_path / "r.h5").write_bytes(b"not a keras file any more")
    broken = KerasReference(tmp_path / "r.h5", None)  # the worker cannot load what is now there
    with pytest.raises(LungedgeError, match="Keras worker .* stopped") as err:
        broken(x)
    broken.close()
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_the_groups_file_exports_in_a_process_that_cannot_import_tensorflow(tmp_path):
    """The export process of the group's ResNet50 never needs TensorFlow: blocked there, it still exports,
    checks the ONNX against the PyTorch reading, and says so."""
    import json
    import subprocess
    import sys

    from lungedge import onnx_meta

    keras_model = ff.keras_resnet50_softmax(tmp_path / "model_resnet50_20241016.h5", size=32, activation="linear")
    code = ("import sys, json\n"
            "sys.modules.update(tensorflow=None, keras=None, tf2onnx=None)  # importing any of them now fails\n"
            "from lungedge.cli import main\n"
            f"rc = main(['export', 'resnet50', '--checkpoint', {str(tmp_path / 'model_resnet50_20241016.h5')!r}, "
            f"'--classes', 'Benign,Malignant,Normal', '--out', {str(tmp_path / 'e')!r}, '--no-engine'])\n"
            "print(json.dumps([rc, any(sys.modules.get(m) for m in ('tensorflow', 'keras', 'tf2onnx'))]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    rc, loaded = json.loads(p.stdout.strip().splitlines()[-1])
    assert rc == 0 and not loaded, p.stderr[-2000:]
    assert "TensorFlow is not installed here" in p.stdout + p.stderr
    fp32 = tmp_path / "e" / "resnet50" / "resnet50.fp32.onnx"
    assert onnx_meta.read(fp32)["extra"]["converter"] == kr.NAME
    import onnxruntime as ort

    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32) * 50
    got = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    want = np.asarray(keras_model(x, training=False))
    assert float(np.abs(got - want).max()) <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_keras_2_weight_names_and_configs_are_read_too(tmp_path):
    """Keras 2 (tf.keras, tf_keras) writes "conv1_conv/kernel:0" and "batch_input_shape", and Keras 2.2 a
    Sequential config as a bare list. (Checked by hand on ResNet50 files saved by tf_keras 2.21, flat
    functional and nested Sequential with dropout: the reader's outputs equal tf_keras's within 2e-6.)"""
    import h5py

    with h5py.File(tmp_path / "k2.h5", "w") as f:
        g = f.create_group("model_weights/resnet50")
        g.attrs["weight_names"] = [b"conv1_conv/kernel:0", b"conv1_conv/bias:0"]
        g.create_dataset("conv1_conv/kernel:0", data=np.ones((7, 7, 3, 64), np.float32))
        g.create_dataset("conv1_conv/bias:0", data=np.zeros(64, np.float32))
        d = f.create_group("model_weights/dense")
        d.attrs["weight_names"] = [b"dense/kernel:0"]
        d.create_dataset("dense/kernel:0", data=np.ones((2048, 3), np.float32))
        weights = kr._weights(f["model_weights"])
    assert set(weights) == {"conv1_conv", "dense"} and set(weights["conv1_conv"]) == {"kernel", "bias"}
    assert weights["dense"]["kernel"].shape == (2048, 3)
    layers = [{"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape": [None, 96, 96, 3]}},
              {"class_name": "Dense", "config": {"name": "dense"}}]
    assert kr._layers({"class_name": "Sequential", "config": layers}) == layers  # Keras 2.2: a bare list
    assert kr._input_size(layers) == 96


def test_hostile_or_altered_files_are_not_taken_for_resnet50(tmp_path):
    import json
    import shutil

    import h5py

    ff.keras_resnet50_softmax(tmp_path / "r.h5", size=32)
    shutil.copy(tmp_path / "r.h5", tmp_path / "narrow.h5")
    with h5py.File(tmp_path / "narrow.h5", "r+") as f:  # ResNet50's names and config, one kernel of another shape
        g = f["model_weights/resnet50"]
        del g["conv1_conv/kernel"]
        g.create_dataset("conv1_conv/kernel", data=np.zeros((7, 7, 3, 32), np.float32))
    with pytest.raises(kr.NotResNet50, match="conv1_conv or its batch norm does not have ResNet50's weight shapes"):
        kr.inspect(tmp_path / "narrow.h5")
    for bad in ({"class_name": "Sequential", "config": {"layers": ["not", "a", "layer"]}}, {"config": 7}, [1, 2]):
        shutil.copy(tmp_path / "r.h5", tmp_path / "odd.h5")
        with h5py.File(tmp_path / "odd.h5", "r+") as f:
            f.attrs["model_config"] = json.dumps(bad)
        with pytest.raises(kr.NotResNet50):
            kr.inspect(tmp_path / "odd.h5")


def test_a_worker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    import sys

    from lungedge.errors import LungedgeError
    from lungedge.export.sources.keras import KerasReference

    ref = KerasReference(tmp_path / "any.h5", None)
    if not ref.keras:
        pytest.skip("TensorFlow is not installed: no worker to start")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))  # the interpreter is gone
    with pytest.raises(LungedgeError, match="cannot start the Keras worker") as err:
        ref(np.zeros((1, 8, 8, 3), np.float32))
    assert "\n" not in str(err.value)
