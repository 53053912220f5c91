"""--uint8-input (issue #14): the ONNX takes uint8 pixels and normalises inside; same logits as before."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: F401  (torch before anything that might pull in tensorflow)

from lungedge import onnx_meta  # noqa: E402
from lungedge.errors import LungedgeError  # noqa: E402
from lungedge.export.uint8 import fold_normalisation  # noqa: E402
from lungedge.preprocess import Preprocessing  # noqa: E402
from lungedge.runners import registry  # noqa: E402

CLASSES = ["Benign", "Malignant", "Normal"]


def _onnx(path, prep: Preprocessing):
    import onnx

    torch.manual_seed(0)
    c = prep.channels
    net = torch.nn.Sequential(torch.nn.Conv2d(c, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()

    class Nhwc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    model = Nhwc().eval() if prep.layout == "NHWC" else net
    torch.onnx.export(model, torch.zeros(1, *prep.input_shape), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    m = onnx.load(str(path))
    onnx_meta.attach(m, onnx_meta.make_metadata("smallcnn", "torch", CLASSES, prep, "fp32", "0" * 64))
    onnx.save(m, str(path))
    return path


def _images(folder, n=4):
    from PIL import Image

    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):  # grayscale JPEGs (as IQ-OTH/NCCD) and an RGB PNG, one not square
        p = folder / (f"g{i}.jpg" if i < n - 1 else "c.png")
        arr = rng.integers(0, 256, size=(40, 52) if i < n - 1 else (44, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("prep", [Preprocessing(size=16),  # torchvision: RGB, NCHW, ImageNet mean/std
                                  Preprocessing(size=16, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0),
                                                scale=1.0, channel_order="BGR", layout="NHWC")])  # Keras caffe
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_uint8_file_gives_the_float_files_logits_on_the_same_images(tmp_path, prep, backend):
    if not registry.get_backend(backend).available():
        pytest.skip(f"{backend} is not installed")
    paths = _images(tmp_path)
    f = _onnx(tmp_path / "smallcnn.fp32.onnx", prep)
    with registry.open_runner(f, backend="onnxruntime") as r:
        before = r.infer(r.preprocessing.load_batch(paths))
    check = fold_normalisation([f], prep, log=lambda s: None)
    assert check["max_rel"] <= 1e-5
    meta = onnx_meta.read(f)
    assert meta["preprocessing"].input_dtype == "uint8" and meta["input_layout"] == "NHWC"
    with registry.open_runner(f, backend=backend, threads=1) as r:
        x = r.preprocessing.load_batch(paths)
        assert x.dtype == np.uint8 and x.shape == (len(paths), 16, 16, 3)
        # the pixels are today's (the float input is their normalisation, value for value)
        np.testing.assert_array_equal(prep.normalize(x), prep.load_batch(paths))
        after = r.infer(x)
        with pytest.raises(LungedgeError, match="uint8"):  # a float batch is refused in one line
            r.infer(x.astype(np.float32))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_uint8_input_refuses_gray_models_and_a_second_fold(tmp_path):
    gray = Preprocessing(size=16, channel_order="GRAY", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(LungedgeError, match="RGB or BGR"):
        fold_normalisation([_onnx(tmp_path / "g.onnx", gray)], gray, log=lambda s: None)
    f = _onnx(tmp_path / "smallcnn.fp32.onnx", Preprocessing(size=16))
    fold_normalisation([f], Preprocessing(size=16), log=lambda s: None)
    with pytest.raises(LungedgeError, match="not float32"):
        fold_normalisation([f], Preprocessing(size=16), log=lambda s: None)
