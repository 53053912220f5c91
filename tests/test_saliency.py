"""Saliency maps point at a planted feature: Grad-CAM on a torch module, occlusion on a plain
inference function (what every runner offers), and the overlay keeps the image's geometry."""

from __future__ import annotations

import numpy as np
import pytest

SIZE = 32


def _planted(n=4, seed=0):
    """NCHW inputs: noise, plus a bright 8x8 square at a random place; returns (x, square corners)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.1, size=(n, 3, SIZE, SIZE)).astype(np.float32)
    corners = []
    for i in range(n):
        r, c = rng.integers(0, SIZE - 8, size=2)
        x[i, :, r:r + 8, c:c + 8] += 3.0
        corners.append((int(r), int(c)))
    return x, corners


def _square_model():
    """conv (detects brightness) -> ReLU -> global mean -> linear: class 1 is 'a bright patch is present'."""
    import torch

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(1.0 / 27)
        conv.bias.fill_(-1.0)  # only clearly bright pixels pass the ReLU
    head = torch.nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
        head.bias.zero_()
    return torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head).eval()


def _inside_share(maps, corners, pad=2):
    shares = []
    for m, (r, c) in zip(maps, corners):
        box = m[max(0, r - pad):r + 8 + pad, max(0, c - pad):c + 8 + pad]
        shares.append(box.sum() / m.sum())
    return np.array(shares)


def test_gradcam_highlights_the_planted_square():
    from lungedge.saliency import gradcam

    x, corners = _planted()
    maps = gradcam(_square_model(), x, targets=[1] * len(x))
    assert maps.shape == (len(x), SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    # the 12x12 box around the square is ~14% of the image, yet holds most of the map
    assert (_inside_share(maps, corners) > 0.8).all()
    for m, (r, c) in zip(maps, corners):
        peak = np.unravel_index(m.argmax(), m.shape)
        assert r - 1 <= peak[0] <= r + 8 and c - 1 <= peak[1] <= c + 8


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_occlusion_works_on_any_infer_function(layout):
    """Occlusion only calls the model: here a numpy function, as an ONNX/Keras/OpenVINO runner's infer."""
    import torch

    from lungedge.saliency import occlusion

    model = _square_model()

    def infer(batch):  # what a runner does: numpy in, logits out
        t = torch.from_numpy(batch if layout == "NCHW" else np.moveaxis(batch, -1, 1).copy())
        with torch.no_grad():
            return model(t).numpy()

    x, corners = _planted(3, seed=1)
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    maps = occlusion(infer, x, [1, 1, 1], layout=layout, window=6, stride=2)
    assert maps.shape == (3, SIZE, SIZE)
    assert (_inside_share(maps, corners, pad=4) > 0.7).all()


def test_overlay_keeps_size_and_marks_the_hot_region():
    from lungedge.saliency import overlay

    pixels = np.full((40, 40, 3), 128, np.uint8)
    heat = np.zeros((20, 20), np.float32)
    heat[:5, :5] = 1.0  # resized to the image: the top-left 10x10 is hot
    out = overlay(pixels, heat)
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert np.abs(out[:8, :8].astype(int) - 128).sum() > 10 * np.abs(out[-10:, -10:].astype(int) - 128).sum()


def test_explain_refuses_gradcam_without_a_torch_model():
    from lungedge.errors import LungedgeError
    from lungedge.saliency import explain

    class FakeOnnx:  # only the attributes explain() reads before it refuses
        backend, classes = "onnxruntime", ["a", "b"]

        class info:
            from pathlib import Path
            path = Path("m.onnx")

    with pytest.raises(LungedgeError, match="unknown saliency method"):
        explain(FakeOnnx(), ["x.png"], method="lime")
    with pytest.raises(LungedgeError, match="Grad-CAM needs a PyTorch checkpoint"):
        explain(FakeOnnx(), ["x.png"], method="gradcam")


def test_explain_sees_the_pixels_inference_sees(tmp_path):
    """The map and the class it shows come from the decode every runner and the trainer use
    (Preprocessing.load: a large JPEG decoded at a reduced DCT scale), not from a full decode."""
    from PIL import Image

    from lungedge.preprocess import Preprocessing
    from lungedge.runners.base import to_probabilities
    from lungedge.saliency import explain

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"slice{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(p)
    prep = Preprocessing(size=32)
    w = rng.normal(size=(3, 3 * 32 * 32)).astype(np.float32)

    class Runner:  # a runner's surface: preprocessing, infer (numpy in, logits out), classes, output
        backend, classes, output, precision, model = "onnxruntime", ["a", "b", "c"], "logits", "fp32", None
        temperature = 1.0
        preprocessing = prep

        @staticmethod
        def infer(x):
            return x.reshape(len(x), -1) @ w.T

    expected = to_probabilities(Runner.infer(prep.load_batch(paths)), "logits")
    out = explain(Runner(), paths, method="occlusion")
    for e, p in zip(out, expected):
        assert e["class"] == Runner.classes[int(p.argmax())]
        assert e["probability"] == pytest.approx(float(p.max()), abs=1e-6)
        assert e["pixels"].shape == (32, 32, 3) and e["heat"].shape == (32, 32)
