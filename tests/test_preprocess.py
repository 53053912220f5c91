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


def _formula(p, pixels_rgb):
    """Today's definition: float formula on the full-decode RGB pixels."""
    x = pixels_rgb.astype(np.float32) * np.float32(p.scale)
    x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def _ct_like(seed=0, shape=(512, 512)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    body = ((yy - shape[0] / 2) ** 2 / (0.4 * shape[0]) ** 2 + (xx - shape[1] / 2) ** 2 / (0.45 * shape[1]) ** 2) < 1
    img = np.where(body, 120 + 40 * np.sin(xx / 9.0) * np.cos(yy / 13.0), 0) + rng.normal(0, 6, shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")


def center_square(img):
    """The reference crop: the largest centred square of the fully decoded image."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


@pytest.mark.parametrize("size", [96, 224, 299])
def test_fast_jpeg_path_matches_the_full_decode(tmp_path, size):
    from lungedge.preprocess import open_image, to_rgb

    path = tmp_path / "ct.jpg"
    _ct_like().save(path, quality=90)
    p = Preprocessing(size=size)
    full = center_square(to_rgb(open_image(path))).resize((size, size), Image.BILINEAR)
    before, now = _formula(p, np.asarray(full)), p.load(path)
    assert now.shape == before.shape == (3, size, size) and now.dtype == np.float32
    levels = np.abs(now - before) * np.asarray(p.std, np.float32)[:, None, None] * 255
    if size * 2 > 256:  # no JPEG scale of a 512-px image covers twice the size: the very same pixels
        np.testing.assert_array_equal(now, before)
    else:  # decoded at 1/2: interpolation differences only
        assert levels.mean() < 1.5 and levels.max() < 48, (levels.mean(), levels.max())


def test_non_jpeg_and_rgb_images_give_exactly_the_formula(tmp_path):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), mode="RGB")
    rgb.save(tmp_path / "c.png")
    _ct_like(shape=(100, 140)).save(tmp_path / "g.png")
    for name, p in (("c.png", Preprocessing(size=32)), ("g.png", Preprocessing(size=48)),
                    ("c.png", Preprocessing(size=32, mean=(1, 2, 3), std=(2, 3, 4), scale=1.0, channel_order="BGR",
                                            layout="NHWC"))):
        from lungedge.preprocess import open_image, to_rgb

        full = np.asarray(center_square(to_rgb(open_image(tmp_path / name))).resize((p.size, p.size), Image.BILINEAR))
        x = full.astype(np.float32) * np.float32(p.scale)
        x = x[..., ::-1] if p.channel_order == "BGR" else x
        x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
        x = np.moveaxis(x, -1, -3) if p.layout == "NCHW" else x
        np.testing.assert_array_equal(p.load(tmp_path / name), x)


def test_batch_decoded_on_threads_equals_one_at_a_time_in_order(tmp_path):
    from lungedge import preprocess

    paths = []
    for i in range(7):  # different images, so a mixed-up order would show
        paths.append(tmp_path / f"{i}.jpg")
        _ct_like(seed=i, shape=(300 + 10 * i, 280)).save(paths[-1], quality=90)
    for p in (Preprocessing(size=64), Preprocessing(size=64, layout="NHWC", channel_order="BGR"),
              Preprocessing(size=64, input_dtype="uint8")):
        batch = p.load_batch(paths)
        assert batch.shape == (7, *p.input_shape) and batch.dtype == np.dtype(p.input_dtype)
        np.testing.assert_array_equal(batch, np.stack([p.load(q) for q in paths]))
    assert preprocess.decode_threads() >= 1
    assert Preprocessing(size=64).load_batch([]).shape == (0, 3, 64, 64)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        Preprocessing(size=64).load_batch([*paths[:3], tmp_path / "bad.jpg", *paths[3:]])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF"])
def test_a_decoded_image_outlives_its_closed_file(tmp_path, fmt):
    # read_image keeps a decoded JPEG as it is (no copy), copies other formats: no file left open, pixels usable
    import os

    from lungedge.preprocess import read_image

    frames = [_ct_like(seed=s, shape=(40, 50)) for s in (0, 1)]
    path = tmp_path / f"x.{fmt.lower()}"
    frames[0].save(path, format=fmt, **({"save_all": True, "append_images": frames[1:]} if fmt in ("GIF", "TIFF") else {}))
    before = len(os.listdir("/proc/self/fd"))
    imgs = [read_image(path, 16) for _ in range(20)]
    assert len(os.listdir("/proc/self/fd")) == before  # no file left open
    expected = np.asarray(Image.open(path).convert("L"))
    for img in imgs:
        np.testing.assert_array_equal(np.asarray(img.convert("L")), expected)  # the first frame


def test_normalize_into_a_slot_checks_its_shape():
    p = Preprocessing(size=8)
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = np.zeros((2, 3, 8, 8), np.float32)
    assert np.shares_memory(p.normalize(pixels, out=out[1]), out)
    np.testing.assert_array_equal(out[1], p.normalize(pixels))
    assert not out[0].any()
    with pytest.raises(ValueError, match="needs float32"):
        p.normalize(pixels, out=np.zeros((3, 4, 4), np.float32))


def test_decode_pool_is_made_again_in_a_forked_child(tmp_path):
    import os

    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, q in enumerate(paths):
        _ct_like(seed=i, shape=(40, 40)).save(q)
    p = Preprocessing(size=16)
    expected = p.load_batch(paths)  # the parent's pool now exists, with its threads
    pid = os.fork()
    if pid == 0:  # a child with a copy of the pool object but none of its threads
        import signal

        signal.alarm(30)  # a pool without threads would wait for ever: the alarm ends the child instead
        ok = np.array_equal(p.load_batch(paths), expected)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_a_float_tiff_of_hounsfield_units_is_stretched_as_its_integer_twin(tmp_path):
    """A CT slice saved as 32-bit float (HU, -1024..3071) is read as the same slice saved as 32-bit integers:
    both stretched by their own range; before, the float one was clipped to 0..255 (air and most tissue black,
    bone white). NaN pixels count as the lowest value."""
    from lungedge.preprocess import Preprocessing

    rng = np.random.default_rng(3)
    hu = rng.integers(-1024, 1500, size=(40, 48)).astype(np.int32)
    Image.fromarray(hu, mode="I").save(tmp_path / "int.tif")
    Image.fromarray(hu.astype(np.float32), mode="F").save(tmp_path / "float.tif")
    with_nan = hu.astype(np.float32)
    with_nan[0, 0] = np.nan
    hu_low = hu.copy()
    hu_low[0, 0] = hu.min()
    Image.fromarray(with_nan, mode="F").save(tmp_path / "nan.tif")
    Image.fromarray(hu_low, mode="I").save(tmp_path / "low.tif")
    p = Preprocessing(size=32)
    assert np.array_equal(p.load(tmp_path / "float.tif"), p.load(tmp_path / "int.tif"))
    assert np.array_equal(p.load(tmp_path / "nan.tif"), p.load(tmp_path / "low.tif"))
    assert p.load_pixels(tmp_path / "float.tif").std() > 20  # not clipped flat


def _tagged(path, orientation=None, fmt=None):
    """A small image file, with an EXIF Orientation tag when ``orientation`` is given."""
    img = Image.new("RGB", (24, 16), (90, 120, 30))
    if orientation is None:
        img.save(path, format=fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(path, format=fmt, exif=exif.tobytes())
    return path


def test_the_exif_turn_comes_with_the_decode_in_order_and_not_from_a_failed_batch(tmp_path):
    """load_batch / load_readable hand back each file's EXIF orientation from the one decode (predict and eval
    note such images without opening them again); the pixels are the stored ones whatever the tag."""
    files = [_tagged(tmp_path / "six.jpg", 6), _tagged(tmp_path / "plain.jpg"), _tagged(tmp_path / "three.png", 3),
             _tagged(tmp_path / "one.jpg", 1)]
    prep = Preprocessing(size=8)
    turns: list = []
    x = prep.load_batch(files, turns)
    assert turns == ["turned 90°", None, "turned 180°", None]
    assert np.array_equal(x[0], x[1])  # the tag turns nothing
    one: list = []
    prep.load_batch(files[:1], one)
    assert one == ["turned 90°"]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    failed: list = []
    with pytest.raises(ImageReadError):
        prep.load_batch([files[0], bad], failed)
    assert failed == []
    kept: list = []
    keep, _, skipped = prep.load_readable([bad, files[2], files[1]], kept)
    assert keep == [1, 2] and len(skipped) == 1 and kept == ["turned 180°", None]
