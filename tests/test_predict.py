"""`lungedge predict`: class and probabilities per image, from any artifact."""

from __future__ import annotations

import json

import torch  # noqa: F401
import torchvision  # noqa: F401
import pytest

from conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_predict_checkpoint_json(trained_run, capsys):
    run = trained_run("googlenet")
    images = sorted(trained_run.data.rglob("*.png"))[:3]
    code, out, err = run_cli(["predict", run / "best.pth", *images, "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["backend"] == "torch" and len(res["predictions"]) == 3
    for p in res["predictions"]:
        assert p["class"] in res["classes"]
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    code, out, err = run_cli(["predict", "googlenet", images[0], "--runs", trained_run.runs], capsys)
    assert code == 0, err
    assert images[0].name in out and "googlenet via torch cpu fp32" in out
    code, _, err = run_cli(["predict", run / "best.pth", "/no/such.png"], capsys)
    assert code == 2 and err.startswith("error:")


def test_an_image_with_an_exif_orientation_is_said_to_be_seen_as_stored(trained_run, tmp_path, capsys):
    """A photo whose EXIF tag turns it in viewers: the prediction is on the stored pixels (as in training), and
    predict says so, in the JSON and in one stderr note; an upright copy gets neither."""
    from PIL import Image

    run = trained_run("googlenet")
    img = Image.open(sorted(trained_run.data.rglob("*.png"))[0]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "turned.jpg", exif=exif.tobytes())
    img.save(tmp_path / "upright.jpg")
    code, out, err = run_cli(["predict", run / "best.pth", tmp_path / "turned.jpg", tmp_path / "upright.jpg",
                              "--json"], capsys)
    assert code == 0, err
    turned, upright = json.loads(out)["predictions"]
    assert turned["exif_orientation"] == "turned 90°" and "exif_orientation" not in upright
    assert turned["probabilities"] == upright["probabilities"]  # the same stored pixels
    assert [ln for ln in err.splitlines() if ln.startswith("note: ")] == [
        f"note: 1 image(s) carry an EXIF orientation (first: {tmp_path / 'turned.jpg'}, turned 90° in photo viewers); "
        "the model saw the pixels as stored, as lungedge reads every image in training too: if what you see is the "
        "right way up, save the image upright without the tag"]


def test_prefetched_computes_the_next_item_while_the_current_one_is_used():
    import threading

    from lungedge.batching import prefetched

    started = {i: threading.Event() for i in range(4)}

    def work(i):
        started[i].set()
        if i == 2:
            raise ValueError("item 2 is bad")
        return i * 10

    got = []
    with pytest.raises(ValueError, match="item 2 is bad"):
        for i, r in enumerate(prefetched(work, range(4))):
            # while item i is in the caller's hands, item i+1 is already being computed
            assert started[i + 1].wait(10), f"item {i + 1} was not started ahead"
            got.append(r)
    assert got == [0, 10]  # in order, and the failure surfaces where item 2's result would be
    assert list(prefetched(work, [])) == [] and list(prefetched(work, [3])) == [30]


def test_predict_opens_each_image_once(trained_run, tmp_path, monkeypatch):
    """The EXIF orientation predict notes comes from the decode that feeds the model; before, every image's
    header was opened a second time to read it."""
    import PIL.Image

    from lungedge.predict import predict

    images = sorted(trained_run.data.rglob("*.png"))[:3]
    real, opened = PIL.Image.open, []

    def counting(fp, *args, **kwargs):
        opened.append(str(fp))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting)
    result = predict(trained_run("googlenet") / "best.pth", images)
    assert len(result["predictions"]) == 3
    assert sorted(o for o in opened if o in map(str, images)) == sorted(map(str, images))


def test_a_stopped_explain_says_the_earlier_overlays_stay_and_they_do(trained_run, tmp_path, capsys, monkeypatch):
    """Ctrl-C while predict --explain writes its overlays (those of the first batch already written under
    temporary names): before, only "interrupted"; the overlays are one set, so none of this run's is left and the
    earlier ones stay as they were, and now the line says so."""
    import os
    import signal
    import time

    from lungedge import saliency

    run, maps = trained_run("googlenet") / "best.pth", tmp_path / "maps"
    images = sorted(trained_run.data.rglob("*.png"))
    code, _, err = run_cli(["predict", run, *images[:2], "--explain", maps], capsys)
    assert code == 0 and len(list(maps.iterdir())) == 2, err
    before = {p.name: p.read_bytes() for p in maps.iterdir()}
    real = saliency.write_overlays

    def stopped(*args, **kwargs):
        written = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the KeyboardInterrupt arrives here
        return written

    monkeypatch.setattr(saliency, "write_overlays", stopped)
    code, out, err = run_cli(["predict", run, *images[2:5], "--explain", maps], capsys)
    assert code == 130 and out == "", out
    assert err.splitlines() == [f"interrupted; no overlay written: {maps} holds its 2 earlier overlay(s) as they were"]
    assert {p.name: p.read_bytes() for p in maps.iterdir()} == before
    code, _, err = run_cli(["predict", run, *images[2:5], "--explain", tmp_path / "new"], capsys)
    assert code == 130 and err.splitlines() == [f"interrupted; no overlay written to {tmp_path / 'new'}"]
