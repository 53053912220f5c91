"""The shortcut check finds a planted size shortcut and stays quiet without one."""

from __future__ import annotations

import numpy as np

from conftest import run_cli, smooth_image


def _write(root, shortcut: bool, per_class=24, seed=0):
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            img = smooth_image(rng, 64)
            if shortcut and cls == "b" and i % 4 != 0:  # 3 of 4 'b' images are wider: a size shortcut
                img = img.resize((80, 64))
            img.save(d / f"{cls}{i:03d}.png")
    return root


def _check(root):
    from lungedge.data.layout import detect_layout
    from lungedge.data.shortcut import check

    layout = detect_layout(root)
    paths = [layout.root / f.path for f in layout.files]
    labels = [f.label for f in layout.files]
    groups = [i // 2 for i in range(len(paths))]  # pairs of images of one class form a group
    return check(paths, labels, groups, layout.classes)


def test_planted_size_shortcut_is_found(tmp_path):
    r = _check(_write(tmp_path / "d", shortcut=True))
    assert r["balanced_accuracy"] > 0.8 and r["chance"] == 0.5
    assert r["strongest"] in ("width", "aspect_ratio", "non_square", "bytes_per_pixel")
    assert r["warning"] and "SHORTCUT" in r["warning"]
    assert r["per_class"]["b"]["non_square"] == 18 and r["per_class"]["a"]["non_square"] == 0


def test_no_shortcut_no_warning(tmp_path):
    r = _check(_write(tmp_path / "d", shortcut=False))
    assert r["warning"] is None
    assert r["balanced_accuracy"] < 0.5 + 0.15


def test_data_inspect_warns_loudly(tmp_path, capsys):
    root = _write(tmp_path / "d", shortcut=True)
    code, out, err = run_cli(["data", "inspect", root], capsys)
    assert code == 0, err
    assert "shortcut check" in out and "WARNING: SHORTCUT RISK" in err
    code, out, err = run_cli(["data", "inspect", root, "--no-shortcuts"], capsys)
    assert code == 0 and "shortcut" not in out + err
