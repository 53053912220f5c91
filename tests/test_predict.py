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
