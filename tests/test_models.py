"""Model registry, `lungedge models`, checkpoint safety and bad-input errors (issue #4)."""

from __future__ import annotations

import json
import pickle

import torch  # noqa: F401  - torch and torchvision before anything imports tensorflow
import torchvision  # noqa: F401
import pytest

from conftest import run_cli, write_dataset
from lungedge.errors import LungedgeError
from lungedge.models import checkpoint as ckpt
from lungedge.models import registry


def test_registry_has_the_four_and_their_preprocessing():
    names = registry.names()
    assert {"resnet50", "googlenet", "inception_v3", "densenet121"} <= set(names)
    r50 = registry.get_spec("resnet50")
    assert r50.framework == "keras" and r50.native_size == 224
    assert r50.preprocessing.channel_order == "BGR" and r50.preprocessing.layout == "NHWC"
    assert r50.preprocessing.scale == 1.0 and r50.preprocessing.mean == (103.939, 116.779, 123.68)
    v3 = registry.get_spec("inception_v3")
    assert v3.native_size == 299 and v3.preprocessing.layout == "NCHW" and v3.framework == "torch"
    assert registry.get_spec("googlenet").defaults.mode == "full"
    assert registry.get_spec("googlenet").defaults.epochs == 10
    assert registry.get_spec("densenet121").defaults.batch_size == 32
    with pytest.raises(LungedgeError, match="at least 75"):
        v3.preprocessing_for(64)


def test_unknown_model_lists_the_valid_ones(capsys):
    code, out, err = run_cli(["train", "resnet5O", "--data", "x", "--weights", "none"], capsys)
    assert code == 2
    assert err.startswith("error: unknown model 'resnet5O'") and "googlenet" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_models_command_counts_parameters(capsys):
    code, out, err = run_cli(["models", "--json"], capsys)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["resnet50"]["mode"] == "transfer" and rows["resnet50"]["trainable_params"] == 6147
    assert rows["inception_v3"]["mode"] == "transfer" and rows["inception_v3"]["trainable_params"] == 6147
    assert rows["densenet121"]["trainable_params"] == 1024 * 3 + 3
    assert rows["googlenet"]["trainable_params"] == rows["googlenet"]["total_params"]  # all layers trained
    for r in rows.values():
        assert r["total_params"] >= r["trainable_params"] > 0
    code, out, err = run_cli(["models"], capsys)
    assert code == 0 and "6,147" in out and "inception_v3" in out


def test_modes_unfreeze_more():
    counts = {}
    for mode in ("transfer", "finetune", "full"):
        m = registry.create("googlenet", weights="none", mode=mode, image_size=64)
        counts[mode] = registry.count_parameters(registry.get_spec("googlenet"), m)[1]
    assert counts["transfer"] == 1024 * 3 + 3 < counts["finetune"] < counts["full"]


def _tiny_checkpoint(tmp_path, name="googlenet"):
    spec = registry.get_spec(name)
    model = registry.create(name, weights="none", mode="full", image_size=64)
    prep = spec.preprocessing_for(64)
    meta = ckpt.make_meta(spec, ["a", "b", "c"], prep, "full", "f" * 64, 1, [])
    return ckpt.save_torch_checkpoint(tmp_path / f"{name}.pth", model, meta), model


def _fake_imagenet(fn, **kw):
    """What torchvision's download would return: a 1000-class state dict (random values) in its layout."""
    def load(url, *a, **k):
        assert url.startswith("https://download.pytorch.org/models/")
        return getattr(torchvision.models, fn)(weights=None, num_classes=1000, init_weights=False, **kw).state_dict()
    return load


def test_imagenet_googlenet_checkpoint_reloads_the_same_function(monkeypatch, tmp_path):
    """torchvision builds ImageNet GoogLeNet with transform_input=True; the checkpoint records it and reloads it."""
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", _fake_imagenet("googlenet", aux_logits=True))
    built = registry.build_model("googlenet", weights="imagenet", mode="full", image_size=64)
    assert built.build["kwargs"]["transform_input"] is True and built.build["kwargs"]["aux_logits"] is False
    assert built.build["weights"]["name"] == torchvision.models.get_model_weights("googlenet").DEFAULT.__class__.__name__ + ".IMAGENET1K_V1"
    assert built.build["weights"]["meta"]["transforms"]["crop_size"] == [224] and built.build["head"]["num_classes"] == 3
    spec = registry.get_spec("googlenet")
    meta = ckpt.make_meta(spec, ["a", "b", "c"], built.preprocessing, "full", "f" * 64, 1, [], build=built.build)
    path = ckpt.save_torch_checkpoint(tmp_path / "g.pth", built.model, meta)
    loaded, meta = ckpt.load_checkpoint(path)
    assert loaded.transform_input is True and meta["build"] == built.build
    x = torch.randn(2, 3, 64, 64)
    built.model.eval()
    with torch.no_grad():
        assert torch.equal(built.model(x), loaded(x))
    # a file written before builds were recorded loads as before (random-init arguments)
    payload = torch.load(path, weights_only=True)
    del payload["meta"]["build"]
    torch.save(payload, tmp_path / "old.pth")
    old, _ = ckpt.load_checkpoint(tmp_path / "old.pth")
    assert old.transform_input is False


def test_preprocessing_is_per_weights_and_matches_torchvision():
    for name in ("googlenet", "inception_v3", "densenet121"):
        spec = registry.get_spec(name)
        t = torchvision.models.get_model_weights(spec.builder.fn).DEFAULT.transforms()
        prep = spec.preprocessing_for(None, "imagenet")
        assert prep.size == t.crop_size[0] == spec.native_size
        assert prep.mean == pytest.approx(tuple(t.mean)) and prep.std == pytest.approx(tuple(t.std))
    with pytest.raises(LungedgeError, match="no ImageNet weights"):
        registry.get_spec("smallcnn").preprocessing_for(None, "imagenet")


def test_torchvision_layout_file_gets_the_pretrained_transform(tmp_path):
    tv = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=1000)
    path = tmp_path / "inception_v3_imagenet.pth"
    torch.save(tv.state_dict(), path)
    built = registry.build_model("inception_v3", weights=str(path), image_size=75)
    assert built.model.transform_input is True and built.build["weights"]["assumed"]["transform_input"] is True
    assert torch.equal(built.model.Conv2d_1a_3x3.conv.weight, tv.Conv2d_1a_3x3.conv.weight)
    over = registry.build_model("inception_v3", weights=str(path), image_size=75, kwargs={"transform_input": False})
    assert over.model.transform_input is False


def test_build_record_rebuilds_every_torch_model():
    for name in ("googlenet", "inception_v3", "densenet121", "smallcnn"):
        built = registry.build_model(name, image_size=80)
        again = registry.rebuild(json.loads(json.dumps(built.build)))
        assert type(again).__name__ == type(built.model).__name__
        assert again.state_dict().keys() == built.model.state_dict().keys()


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    path, model = _tiny_checkpoint(tmp_path)
    model.eval()
    loaded, meta = ckpt.load_checkpoint(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["architecture"] == "googlenet" and meta["classes"] == ["a", "b", "c"]
    assert meta["input_size"] == 64 and meta["preprocessing"]["size"] == 64
    assert len(meta["checkpoint_sha256"]) == 64 and "torch" in meta["versions"]
    # readable with plain torch.load(weights_only=True)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == ckpt.FORMAT and "fc.weight" in payload["state_dict"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating the marker file = code ran


def test_malicious_pth_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    torch.save({"format": ckpt.FORMAT, "meta": {}, "state_dict": {"x": torch.zeros(1)}, "evil": _Evil(str(marker))}, bad)
    with pytest.raises(LungedgeError, match="refusing to unpickle"):
        ckpt.load_checkpoint(bad)
    assert not marker.exists()
    # through the CLI as --weights and as a finetune checkpoint: one line, exit 2
    code, out, err = run_cli(["finetune", bad], capsys)
    assert code == 2 and "refusing to unpickle" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    raw = tmp_path / "raw.pth"  # a plain pickle, not even torch's zip format
    raw.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(LungedgeError):
        ckpt.load_checkpoint(raw)
    assert not marker.exists()


def _save_plain(state: dict, path):
    """A plain state dict as ``torch.save`` (``.pth``) or safetensors' ``save_file`` (``.safetensors``) writes it."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_of_another_architecture_are_refused(suffix, tmp_path):
    path, _ = _tiny_checkpoint(tmp_path, "googlenet")
    with pytest.raises(LungedgeError, match="checkpoint of googlenet, not densenet121"):
        registry.create("densenet121", weights=str(path), mode="full", image_size=64)
    # a plain state dict of another architecture
    plain = tmp_path / f"plain{suffix}"
    _save_plain(registry.create("smallcnn", weights="none", image_size=64).state_dict(), plain)
    with pytest.raises(LungedgeError, match="does not hold googlenet weights"):
        registry.create("googlenet", weights=str(plain), image_size=64)
    # a plain state dict of the same architecture (e.g. torchvision's file, 1000 classes): backbone loads
    tv = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=1000)
    same = tmp_path / f"tv{suffix}"
    _save_plain(tv.state_dict(), same)
    m = registry.create("googlenet", weights=str(same), image_size=64)
    assert torch.equal(m.conv1.conv.weight, tv.conv1.conv.weight)
    assert m.transform_input is True  # torchvision's setting for a foreign state dict, whatever the container
    assert m.fc.out_features == 3 and not torch.equal(m.fc.weight[:3], tv.fc.weight[:3])  # 1000-class head skipped


def test_imagenet_offline_is_one_clear_line(monkeypatch, tmp_path, capsys):
    import urllib.error

    import torchvision.models._api

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    # what torchvision's WeightsEnum.get_state_dict calls to download
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    with pytest.raises(LungedgeError, match="--weights PATH") as info:
        registry.create("densenet121", weights="imagenet")
    assert "none" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(tmp_path, capsys):
    data = write_dataset(tmp_path / "d", ["a", "b", "c"], per_class=4)
    code, out, err = run_cli(["train", "smallcnn", "--data", data, "--device", "cuda", "--weights", "none",
                              "--out", tmp_path / "runs"], capsys)
    assert code == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_bad_mode_and_weights(tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", "googlenet", "--data", tmp_path, "--mode", "half", "--out", runs], capsys)
    assert code == 2 and "unknown mode 'half'" in err
    code, _, err = run_cli(["train", "googlenet", "--data", tmp_path, "--weights", tmp_path / "nope.pth", "--out",
                            runs], capsys)
    assert code == 2 and "neither 'imagenet', 'none' nor an existing file" in err
    assert not runs.exists()  # a refused run leaves no folder behind, not even runs/googlenet
