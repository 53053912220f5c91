"""The one preprocessing definition."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lungedge.errors import LungedgeError
from lungedge.preprocess import ImageReadError, Preprocessing


def test_grayscale_becomes_three_equal_channels():
    img = Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8), mode="L")
    x = Preprocessing(size=32, mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], x[1])
    np.testing.assert_array_equal(x[1], x[2])


def test_normalisation_matches_the_formula():
    img = Image.new("RGB", (10, 10), (255, 0, 128))
    p = Preprocessing(size=10)
    x = p(img)
    expected = (np.array([255, 0, 128]) / 255.0 - np.array(p.mean)) / np.array(p.std)
    np.testing.assert_allclose(x[:, 0, 0], expected, rtol=1e-6)


def test_caffe_style_bgr_nhwc():
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    p = Preprocessing(size=8, mean=(1, 2, 3), std=(1, 1, 1), scale=1.0, channel_order="BGR", layout="NHWC")
    x = p(img)
    assert x.shape == (8, 8, 3)
    np.testing.assert_allclose(x[0, 0], [30 - 1, 20 - 2, 10 - 3])


@pytest.mark.parametrize("shape", [(512, 512), (801, 512), (512, 623), (331, 506)])
def test_every_aspect_ratio_gives_the_same_shape_and_no_padding(shape):
    w, h = shape
    img = Image.new("L", (w, h), 200)  # uniform: any padding would show as a different value
    x = Preprocessing(size=64, mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert x.shape == (3, 64, 64)
    np.testing.assert_allclose(x, 200 / 255.0, rtol=1e-6)


def test_wide_image_is_centre_cropped_not_squashed():
    arr = np.zeros((100, 300), np.uint8)
    arr[:, 100:200] = 255  # the centre square is white, the sides black
    x = Preprocessing(size=20, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(arr))
    np.testing.assert_allclose(x, 1.0)


def test_metadata_round_trip():
    p = Preprocessing(size=299, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channel_order="BGR", layout="NHWC")
    assert Preprocessing.from_dict(p.to_dict()) == p
    assert p.with_size(96).size == 96 and p.with_size(96).layout == "NHWC"


def test_bad_spec_is_refused():
    with pytest.raises(LungedgeError, match="layout"):
        Preprocessing(layout="CHWN")


def test_unreadable_files_raise_a_clear_error(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_text("hello")
    with pytest.raises(ImageReadError, match="not an image"):
        Preprocessing().load(bad)
    good = tmp_path / "y.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, quality=95)
    good_bytes = good.read_bytes()
    (tmp_path / "t.jpg").write_bytes(good_bytes[: len(good_bytes) // 2])
    with pytest.raises(ImageReadError, match="unreadable"):
        Preprocessing().load(tmp_path / "t.jpg")
