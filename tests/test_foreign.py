"""Models from outside (issue #12): the group's four files, custom models of every source kind,
output kinds, and files that only look like models."""

from __future__ import annotations

import json

import torch  # torch and torchvision before anything imports tensorflow
import torchvision  # noqa: F401
import numpy as np
import pytest

import foreign_files as ff
from conftest import one_error, run_cli, write_dataset
from lungedge import onnx_meta
from lungedge.errors import LungedgeError
from lungedge.models import sniff

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")

LFS = (b"version https://git-lfs.github.com/spec/v1\n"
       b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 102502400\n")
HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def _save_state(state: dict, path):
    """``state`` saved as users hand it over: ``torch.save`` for a ``.pth``, safetensors' ``save_file`` for a
    ``.safetensors`` (Hugging Face, timm)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _ort(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


# -- files that are not models ----------------------------------------------------------------------------

@pytest.fixture
def not_models(tmp_path):
    files = {}
    for suffix in (".pth", ".h5", ".safetensors"):
        (tmp_path / f"lfs{suffix}").write_bytes(LFS)
        (tmp_path / f"empty{suffix}").write_bytes(b"")
        (tmp_path / f"random{suffix}").write_bytes(np.random.default_rng(7).bytes(5000))
        (tmp_path / f"page{suffix}").write_bytes(HTML)
        files.update({f"lfs{suffix}": "Git LFS pointer", f"empty{suffix}": "is empty",
                      f"random{suffix}": "random or damaged", f"page{suffix}": "HTML"})
    files["random.safetensors"] = "not a readable safetensors file: its header length says"
    return tmp_path, files


def test_sniff_names_real_containers(tmp_path):
    model = ff.tiny_torch()
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    ff.torchscript_file(tmp_path / "ts.pt", model)
    ff.torch_export_file(tmp_path / "ep.pt2", model)
    ff.onnx_file(tmp_path / "m.onnx", model)
    _save_state(model.state_dict(), tmp_path / "sd.safetensors")
    assert sniff.sniff(tmp_path / "sd.pth") == "torch-zip"
    assert sniff.sniff(tmp_path / "sd.safetensors") == "safetensors"
    assert sniff.sniff(tmp_path / "ts.pt") == "torchscript"
    assert sniff.sniff(tmp_path / "ep.pt2") == "torch-export"
    assert sniff.sniff(tmp_path / "m.onnx") == "onnx"
    for name in ("sd.pth", "ts.pt", "ep.pt2", "m.onnx", "sd.safetensors"):
        assert sniff.problem(tmp_path / name) is None


def test_sniff_says_what_is_not_a_model(not_models):
    folder, files = not_models
    for name, words in files.items():
        with pytest.raises(LungedgeError, match=words) as exc:
            sniff.check_model_file(folder / name)
        assert len(str(exc.value).splitlines()) == 1
    with pytest.raises(LungedgeError, match=r"run `git lfs pull` \(the real file is 102,502,400 bytes\)"):
        sniff.check_model_file(folder / "lfs.h5")
    (folder / "notes.pth").write_text("these are my notes\n")
    with pytest.raises(LungedgeError, match="is a text file"):
        sniff.check_model_file(folder / "notes.pth")


@pytest.mark.parametrize("name", ["lfs.pth", "lfs.h5", "empty.pth", "random.pth", "page.h5", "random.h5",
                                  "lfs.safetensors", "random.safetensors"])
def test_export_predict_and_eval_say_what_is_not_a_model(not_models, name, capsys):
    folder, files = not_models
    words = files[name]
    code, _, err = run_cli(["export", "resnet50" if name.endswith(".h5") else "googlenet", "--checkpoint",
                            folder / name, "--classes", ff.GROUP_CLASSES, "--out", folder / "e"], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    img = write_dataset(folder / "data", ["a"], per_class=1, size=16) / "a" / "img000_0.png"
    code, _, err = run_cli(["predict", folder / name, img], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])  # .bin: Hugging Face's pytorch_model.bin
def test_foreign_checkpoints_in_eval_and_predict_say_export_first(suffix, tmp_path, capsys):
    theirs = _save_state(ff.tiny_torch().state_dict(), tmp_path / f"theirs{suffix}")
    img = write_dataset(tmp_path / "data", ["a", "b"], per_class=1, size=16) / "a" / "img000_0.png"
    code, _, err = run_cli(["predict", theirs, img], capsys)
    assert code == 2 and "lungedge export MODEL --checkpoint" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["eval", theirs, "--data", tmp_path / "data"], capsys)
    assert code == 2 and "lungedge export" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_unknown_architecture_state_dict_says_which_forms_are_accepted(suffix, tmp_path, capsys):
    theirs = _save_state(ff.tiny_torch().state_dict(), tmp_path / f"theirs{suffix}")
    code, _, err = run_cli(["export", "googlenet", "--checkpoint", theirs, "--classes", "a,b,c",
                            "--out", tmp_path / "e"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "not a googlenet state dict" in err and "TorchScript" in err and "--custom" in err
    code, _, err = run_cli(["export", "mine", "--checkpoint", theirs, "--custom", "--classes",
                            "a,b,c", "--out", tmp_path / "e"], capsys)
    assert code == 2 and "carries no architecture" in err and "TorchScript" in err, err
    code, _, err = run_cli(["export", "mine", "--checkpoint", theirs, "--classes", "a,b,c"], capsys)
    assert code == 2 and "--custom" in err, err
    (tmp_path / "dir.pth").mkdir()
    code, _, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "dir.pth", "--classes", "a,b,c",
                            "--out", tmp_path / "e"], capsys)
    assert code == 2 and "dir.pth is a folder, not a model file" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_whole_pickled_model_is_checked_like_its_state_dict(tmp_path, capsys):
    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=4,
                                       transform_input=False).eval()
    torch.save(torch.nn.DataParallel(net).half(), tmp_path / "gn4.pth")  # fp16, DataParallel-wrapped, 4 outputs
    torch.save(torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=2),
               tmp_path / "gn2.pth")
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3)), tmp_path / "seq.pth")
    for name, arch, words in (("gn2.pth", "googlenet", "has 2 outputs but 3 class names"),
                              ("gn4.pth", "densenet121", "holds a pickled GoogLeNet, which is not a densenet121"),
                              ("seq.pth", "googlenet", "holds a pickled Sequential, which is not a googlenet")):
        code, _, err = run_cli(["export", arch, "--checkpoint", tmp_path / name, "--classes", "a,b,c",
                                "--trust-pickle", "--out", tmp_path / "e"], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    out, fp32 = _export(tmp_path, capsys, "googlenet", tmp_path / "gn4.pth", "--classes", "a,b,c", "--input-size",
                        32, "--trust-pickle")
    _is_fp16_parallel_net_first_three(out, fp32, net, seed=4)


def _is_fp16_parallel_net_first_three(out: str, fp32, net, seed: int) -> None:
    """An fp16 4-output net pickled inside DataParallel was exported as float32, its first 3 outputs."""
    assert "wrapped in DataParallel" in out and "float16 weights; converted to float32" in out
    assert "4 outputs; exporting the first 3" in out
    x = np.random.default_rng(seed).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = net.half().float()(torch.from_numpy(x))[:, :3].numpy()
    np.testing.assert_allclose(_ort(fp32, x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_training_checkpoint_holding_a_whole_model_is_read_only_with_trust_pickle(tmp_path, capsys):
    torch.manual_seed(1)
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=4,
                                       transform_input=False).eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.save({"model": torch.nn.DataParallel(net).half(), "optimizer": opt.state_dict(), "epoch": 7},
               tmp_path / "ckpt.pth")
    code, _, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "ckpt.pth", "--classes", "a,b,c",
                            "--out", tmp_path / "e"], capsys)
    line = one_error(code, err, "runs code when loaded")
    assert "--trust-pickle" in line
    code, _, err = run_cli(["export", "densenet121", "--checkpoint", tmp_path / "ckpt.pth", "--classes", "a,b,c",
                            "--trust-pickle", "--out", tmp_path / "e"], capsys)
    one_error(code, err, "holds a pickled GoogLeNet, which is not a densenet121")
    code, _, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "ckpt.pth", "--classes", "a,b,c,d,e",
                            "--trust-pickle", "--out", tmp_path / "e"], capsys)
    one_error(code, err, "has 4 outputs but 5 class names")
    assert not (tmp_path / "e").exists()
    out, fp32 = _export(tmp_path, capsys, "googlenet", tmp_path / "ckpt.pth", "--classes", "a,b,c", "--input-size",
                        32, "--trust-pickle")
    assert "ckpt.pth is a training checkpoint: exporting the pickled model under 'model' (left out: optimizer, epoch)" \
        in out, out
    _is_fp16_parallel_net_first_three(out, fp32, net, seed=5)


@pytest.mark.parametrize("name", ["ckpt.pth", "epoch=7-step=70.ckpt", "pytorch_model.bin"])  # also Lightning's, HF's
def test_training_checkpoint_with_prefix_and_dropout_head_exports_its_weights(tmp_path, capsys, name):
    """A torch.save file is read as one whatever its name says (export picks the reader from the bytes)."""
    head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(1024, 3))
    model = ff.googlenet_training_checkpoint(tmp_path / name, head=head)
    out, fp32 = _export(tmp_path, capsys, "googlenet", tmp_path / name, "--classes", "a,b,c", "--input-size",
                        32, "--no-transform-input")
    assert "exporting the weights under 'model_state_dict' (left out: optimizer_state_dict, epoch, best_acc)" in out
    assert "removed the 'model.' prefix" in out and "only weights are fc.1 (Linear 1024 -> 3)" in out
    x = np.random.default_rng(6).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(fp32, x), model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    mlp = torch.nn.Sequential(torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    ff.googlenet_training_checkpoint(tmp_path / "mlp.pth", head=mlp, key="state_dict", prefix="")
    code, out, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "mlp.pth", "--classes", "a,b,c",
                              "--out", tmp_path / "e2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "head fc is an nn.Sequential with weights in 2 layers (fc.0, fc.2), not one Linear" in err
    assert "--custom" in err
    torch.save({"optimizer": {}, "epoch": 3}, tmp_path / "noweights.pth")
    code, out, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "noweights.pth", "--classes",
                              "a,b,c", "--out", tmp_path / "e2"], capsys)
    assert code == 2 and "keys optimizer, epoch and no state dict under them" in err, err


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".ckpt"])  # .ckpt: Lightning's name for a torch.save file
def test_densenet_old_tensor_names_load_as_torchvision_does(suffix, tmp_path):
    from lungedge.models.registry import get_spec
    from lungedge.models.weights import load_into, read_weights_file

    torch.manual_seed(0)
    net = torchvision.models.densenet121(weights=None, num_classes=3).eval()
    old = ff.densenet121_old_names(net.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    if suffix != ".safetensors":  # as `lungedge train --weights` reads it: a training checkpoint
        torch.save({"state_dict": old, "epoch": 1}, tmp_path / f"dn{suffix}")
    else:  # flat tensors only; DataParallel's prefix on every name
        _save_state({f"module.{k}": v for k, v in old.items()}, tmp_path / "dn.safetensors")
    spec = get_spec("densenet121")
    fresh = torchvision.models.densenet121(weights=None, num_classes=3).eval()
    load_into(spec, fresh, read_weights_file(spec, tmp_path / f"dn{suffix}"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


# -- your own model, any architecture ---------------------------------------------------------------------------

def _image_folder(tmp_path, classes, size=24, colour=True):
    return write_dataset(tmp_path / "data", classes, per_class=3, size=size, colour=colour)


def _export(tmp_path, capsys, name, path, *extra):
    code, out, err = run_cli(["export", name, "--checkpoint", path, "--out", tmp_path / "e", "--no-engine",
                              "--calibration", tmp_path / "c", *extra], capsys)
    assert code == 0, err
    return out, tmp_path / "e" / name / f"{name}.fp32.onnx"


def test_custom_torchscript_with_declared_preprocessing_runs_downstream(tmp_path, capsys):
    model = ff.tiny_torch(outputs=3)
    ff.torchscript_file(tmp_path / "mine.pt", model, size=20)
    data = _image_folder(tmp_path, ["x", "y", "z"])
    out, fp32 = _export(tmp_path, capsys, "mine", tmp_path / "mine.pt", "--custom", "--data", data,
                        "--input-size", 20, "--scale", "1/255", "--mean", "0.5", "--std", "0.25", "--channels", "BGR",
                        "--resize", "stretch", "--fp16", "--int8", "--calib-data", data, "--calib-size", 6)
    m = onnx_meta.read(fp32)
    p = m["preprocessing"]
    assert m["architecture"] == "mine" and m["classes"] == ["x", "y", "z"] and m["output"] == "logits"
    assert (p.size, p.scale, p.mean, p.std, p.channel_order, p.layout, p.resize) == \
        (20, 1 / 255, (0.5,) * 3, (0.25,) * 3, "BGR", "NCHW", "stretch-bilinear")
    assert m["build"]["source_kind"] == "torchscript"
    x = np.random.default_rng(0).normal(size=(4, 3, 20, 20)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort(fp32, x), expected, rtol=1e-4, atol=1e-5)
    folder = fp32.parent
    assert (folder / "mine.fp16.onnx").is_file() and (folder / "mine.int8-cpu.onnx").is_file()
    img = data / "y" / "img001_0.png"
    code, out, err = run_cli(["predict", folder / "mine.fp32.onnx", img, "--json"], capsys)
    assert code == 0, err
    probs = json.loads(out)["predictions"][0]["probabilities"]
    with torch.no_grad():
        logits = model(torch.from_numpy(p.load_batch([img])))
    np.testing.assert_allclose([probs[c] for c in "xyz"], torch.softmax(logits, 1)[0].numpy(), atol=1e-5)
    code, out, err = run_cli(["eval", folder / "mine.int8-cpu.onnx", "--data", data, "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["bench", folder / "mine.fp16.onnx", "--batch-sizes", "1", "--iters", 2, "--warmup", 1,
                              "--no-preprocessing", "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["bundle", "create", "mine", "--out", tmp_path / "mine.tar.gz", "--engines",
                              tmp_path / "e", "--results", tmp_path / "r", "--allow-failed-gate"], capsys)
    assert code == 0 and (tmp_path / "mine.tar.gz").is_file(), err


def test_custom_model_name_is_a_model_for_predict_bench_and_eval(tmp_path, capsys):
    ff.onnx_file(tmp_path / "plain.onnx", ff.tiny_torch(outputs=3), size=16)
    data = _image_folder(tmp_path, ["a", "b", "c"], size=16)
    _, fp32 = _export(tmp_path, capsys, "mycnn", tmp_path / "plain.onnx", "--custom", "--classes", "a,b,c",
                      "--scale", "1/255", "--mean", "none", "--std", "none")
    engines = ["--engines", tmp_path / "e", "--runs", tmp_path / "runs"]
    img = data / "b" / "img000_0.png"
    code, out, err = run_cli(["predict", "mycnn", img, "--json", *engines], capsys)
    assert code == 0, err
    assert set(json.loads(out)["predictions"][0]["probabilities"]) == {"a", "b", "c"}
    code, out, err = run_cli(["eval", "mycnn", "--data", data, "--backend", "onnxruntime", "--out", tmp_path / "r",
                              *engines], capsys)
    assert code == 0 and "mycnn" in out, err
    for spec in (["mycnn"], ["--all"]):
        code, out, err = run_cli(["bench", *spec, "--backend", "onnxruntime", "--batch-sizes", "1", "--iters", 2,
                                  "--warmup", 1, "--no-preprocessing", "--out", tmp_path / "r", *engines], capsys)
        assert code == 0 and "mycnn" in out, err
    (tmp_path / "e" / "other").mkdir()  # a folder without lungedge's files is no model
    for name in ("other", "nosuch"):
        code, _, err = run_cli(["predict", name, img, *engines], capsys)
        assert code == 2 and f"'{name}' is neither a file nor a model" in err and "mycnn" in err, err


def test_custom_torch_export_program_reads_its_input_size(tmp_path, capsys):
    model = ff.tiny_torch(outputs=2, channels=1, final=torch.nn.Softmax(dim=1))
    ff.torch_export_file(tmp_path / "prog.pt2", model, size=18, channels=1)
    out, fp32 = _export(tmp_path, capsys, "prog", tmp_path / "prog.pt2", "--custom", "--classes", "neg,pos",
                        "--scale", "1/255", "--mean", "none", "--std", "none")
    m = onnx_meta.read(fp32)
    p = m["preprocessing"]
    assert (p.size, p.channel_order, p.input_shape) == (18, "GRAY", (1, 18, 18))  # read from the program
    assert m["output"] == "probabilities" and "not softmaxed again" in out
    x = np.random.default_rng(1).uniform(size=(3, 1, 18, 18)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(fp32, x), model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-6)


def test_custom_plain_onnx_with_more_outputs_than_classes(tmp_path, capsys):
    model = ff.tiny_torch(outputs=5)
    ff.onnx_file(tmp_path / "plain.onnx", model, size=16)
    out, fp32 = _export(tmp_path, capsys, "plain", tmp_path / "plain.onnx", "--custom", "--classes", "a,b,c",
                        "--scale", "1", "--mean", "none", "--std", "none", "--layout", "NCHW")
    assert "5 outputs; exporting the first 3" in out
    x = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(fp32, x), model(torch.from_numpy(x))[:, :3].numpy(), rtol=1e-4, atol=1e-5)
    assert onnx_meta.read(fp32)["preprocessing"].size == 16  # fixed in the graph


def test_torch_export_program_holding_code_is_refused_without_trust_pickle(tmp_path, capsys):
    import zipfile

    ff.torch_export_file(tmp_path / "prog.pt2", ff.tiny_torch(), size=16)
    marker = tmp_path / "ran"
    ff.torch_export_with_code(tmp_path / "evil.pt2", tmp_path / "prog.pt2", marker)
    code, out, err = run_cli(["export", "evil", "--checkpoint", tmp_path / "evil.pt2", "--custom", "--classes",
                              "a,b,c", "--out", tmp_path / "e", "--no-engine"], capsys)
    assert not marker.exists()  # torch.export.load's fallback to a full unpickle never ran
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.strip(), err
    assert "evil.pt2" in err and "runs code when loaded" in err and "--trust-pickle" in err
    with zipfile.ZipFile(tmp_path / "prog.pt2") as src, zipfile.ZipFile(tmp_path / "aoti.pt2", "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info.filename))
        dst.writestr(src.namelist()[0].split("/")[0] + "/data/aotinductor/model/model.so", b"\x7fELF")
    code, _, err = run_cli(["export", "aoti", "--checkpoint", tmp_path / "aoti.pt2", "--custom", "--classes",
                            "a,b,c", "--out", tmp_path / "e", "--no-engine"], capsys)
    assert code == 2 and "AOTInductor" in err and "--trust-pickle" in err and len(err.strip().splitlines()) == 1, err


def test_torch_export_program_fixed_to_batch_one_is_said(tmp_path, capsys):
    ff.torch_export_file(tmp_path / "b1.pt2", ff.tiny_torch(), size=16, dynamic=False)
    code, out, err = run_cli(["export", "b1", "--checkpoint", tmp_path / "b1.pt2", "--custom", "--classes", "a,b,c",
                              "--out", tmp_path / "e", "--no-engine"], capsys)
    assert code == 2 and "b1.pt2 fixes batch 1" in err and "dynamic batch" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "e" / "b1").exists()


def test_plain_onnx_input_types_and_fixed_batch(tmp_path, capsys):
    model = ff.tiny_torch(outputs=3)
    ff.onnx_file(tmp_path / "u8.onnx", ff.uint8_input(model), size=16, dtype=torch.uint8)
    ff.onnx_file(tmp_path / "b1.onnx", ff.fixed_batch_one(), size=16)
    decl = ["--classes", "a,b,c", "--scale", "1", "--mean", "none", "--std", "none", "--out", tmp_path / "e"]
    for name, words in (("u8.onnx", "takes uint8 inputs; lungedge feeds float32 images"),
                        ("b1.onnx", "fixes batch 1 inside its graph (its Reshape node")):
        code, out, err = run_cli(["export", "m", "--custom", "--checkpoint", tmp_path / name, *decl], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and not out.strip(), err
        assert name == "u8.onnx" or ("dynamic_shapes=" in err and "dynamic_axes with dynamo=False" in err), err
    half = ff.tiny_torch(outputs=3).half()
    ff.onnx_file(tmp_path / "f16.onnx", half, size=16, dtype=torch.float16)
    out, fp32 = _export(tmp_path, capsys, "f16", tmp_path / "f16.onnx", "--custom", *decl[:-2])
    assert "takes float16; cast from float32 in front" in out and "returns float16; cast to float32" in out
    x = np.random.default_rng(5).normal(size=(3, 3, 16, 16)).astype(np.float32)
    got = _ort(fp32, x)
    with torch.no_grad():
        expected = half(torch.from_numpy(x).half()).float().numpy()
    assert got.dtype == np.float32 and got.shape == (3, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)


def test_onnx_with_outputs_of_other_shapes_or_names(tmp_path, capsys):
    decl = ["--custom", "--classes", "a,b,c", "--scale", "1", "--mean", "none", "--std", "none"]
    ff.onnx_file(tmp_path / "r4.onnx", ff.rank4_output(), size=16)  # scores as (N, 3, 1, 1)
    code, out, err = run_cli(["export", "r4", "--checkpoint", tmp_path / "r4.onnx", *decl, "--out", tmp_path / "e",
                              "--calibration", tmp_path / "c"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "outputs a 3x1x1 array per image" in err and "Flatten" in err
    model = ff.tiny_torch()
    import torch.onnx

    torch.onnx.export(ff.softmax_first(model), torch.zeros(1, 3, 16, 16), str(tmp_path / "two.onnx"), dynamo=False,
                      input_names=["x"], output_names=["probs", "logits"], dynamic_axes={"x": {0: "n"}})
    out, fp32 = _export(tmp_path, capsys, "two", tmp_path / "two.onnx", *decl)
    assert "using the first (probs)" in out and onnx_meta.read(fp32)["output"] == "probabilities"
    x = np.random.default_rng(8).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(fp32, x), torch.softmax(model(torch.from_numpy(x)), 1).numpy(), atol=1e-6)


def test_keras_model_with_two_outputs_is_refused_in_one_line(tmp_path, capsys):
    ff.keras_two_outputs(tmp_path / "two.h5")
    code, out, err = run_cli(["export", "two", "--checkpoint", tmp_path / "two.h5", "--custom", "--classes", "a,b,c",
                              "--out", tmp_path / "e"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "two.h5 has 2 outputs (classes, tumour)" in err and "model.outputs[i]" in err


def test_keras_weights_only_file_says_so_and_how_to_save_the_model(tmp_path, capsys):
    import h5py

    model = ff.tiny_keras(tmp_path / "whole.h5")
    model.save_weights(tmp_path / "model.weights.h5")  # Keras 3: layers/ and vars/ groups, no model config
    with h5py.File(tmp_path / "k2.h5", "w") as fh:  # Keras 2's save_weights layout: layer_names, no model config
        fh.attrs["layer_names"] = [b"conv2d", b"dense"]
        fh.create_group("conv2d")
        fh.create_group("dense")
    for name in ("model.weights.h5", "k2.h5"):
        for arch in (["resnet50"], ["mine", "--custom"]):
            code, _, err = run_cli(["export", *arch, "--checkpoint", tmp_path / name, "--classes", "A,B,C",
                                    "--out", tmp_path / "e"], capsys)
            line = one_error(code, err)
            assert f"{name} holds Keras weights only (model.save_weights)" in line, line
            assert "model.load_weights()" in line and 'model.save("model.h5")' in line, line
    assert not (tmp_path / "e").exists()


def test_pth_from_a_newer_torch_says_so(tmp_path, capsys):
    """A torch.save zip whose format version is beyond this torch's: the versions, without torch's C++ prefix."""
    import zipfile

    torch.save(ff.tiny_torch().state_dict(), tmp_path / "now.pth")
    with zipfile.ZipFile(tmp_path / "now.pth") as src, zipfile.ZipFile(tmp_path / "new.pth", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"99\n" if name.endswith("/version") else src.read(name))
    said = (r"new\.pth is not a readable [.a-z ]+ \(saved by a newer PyTorch: file format version 99, torch \S+ here "
            r"reads up to \d+\)$")
    code, _, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "new.pth", "--classes", "A,B,C",
                            "--out", tmp_path / "e", "--no-engine"], capsys)
    one_error(code, err, match=said)
    code, _, err = run_cli(["predict", tmp_path / "new.pth", tmp_path / "new.pth"], capsys)
    one_error(code, err, match=said)
    assert not (tmp_path / "e").exists()


def test_keras_file_under_another_name_says_which_name_keras_reads(tmp_path, capsys):
    ff.tiny_keras(tmp_path / "m.keras")
    (tmp_path / "m.bin").write_bytes((tmp_path / "m.keras").read_bytes())
    code, _, err = run_cli(["export", "mine", "--custom", "--checkpoint", tmp_path / "m.bin", "--classes", "A,B,C",
                            "--out", tmp_path / "e"], capsys)
    one_error(code, err, match=r"m\.bin holds a Keras 3 \.keras archive, which Keras reads only under the name "
                               r"\.keras: copy or rename it so")


def test_keras_file_from_a_newer_keras_names_the_option_and_the_version(tmp_path, capsys):
    """A .keras archive whose layer config carries an option this Keras does not know (a newer Keras wrote it):
    the innermost reason Keras gives and the versions, not the first line of its nested config dump."""
    import zipfile

    ff.tiny_keras(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    config = json.loads(members["config.json"])
    layer = next(l for l in config["config"]["layers"] if l["class_name"] == "Dense")
    layer["config"]["future_option"] = 7
    members["config.json"] = json.dumps(config).encode()
    members["metadata.json"] = json.dumps({**json.loads(members["metadata.json"]), "keras_version": "3.99.0"}).encode()
    with zipfile.ZipFile(tmp_path / "new.keras", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    code, _, err = run_cli(["export", "mine", "--custom", "--checkpoint", tmp_path / "new.keras", "--classes", "A,B,C",
                            "--out", tmp_path / "e"], capsys)
    one_error(code, err, match=r"new\.keras: cannot load the Keras model \(Unrecognized keyword arguments passed to "
                               r"Dense: \{'future_option': 7\}\); saved by Keras 3\.99\.0, newer than Keras [\d.]+ here")
    assert not (tmp_path / "e").exists()


def test_keras_lambda_layer_needs_trust_and_channels_first_is_said(tmp_path, capsys):
    model = ff.keras_lambda(tmp_path / "lam.keras")
    args = ["export", "lam", "--checkpoint", tmp_path / "lam.keras", "--custom", "--classes", "a,b,c",
            "--out", tmp_path / "e"]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds a Lambda layer with Python code, which runs when loaded" in err and "--trust-pickle" in err
    out, fp32 = _export(tmp_path, capsys, "lam", tmp_path / "lam.keras", "--custom", "--classes", "a,b,c",
                        "--trust-pickle")
    x = np.random.default_rng(9).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(_ort(fp32, x), np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-5)
    ff.keras_channels_first(tmp_path / "cf.keras")
    code, out, err = run_cli(["export", "cf", "--checkpoint", tmp_path / "cf.keras", "--custom", "--classes",
                              "a,b,c", "--out", tmp_path / "e"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "channels-first (N, C, H, W)" in err and "--layout says" not in err


def test_undeclared_preprocessing_is_said_and_size_must_be_known(tmp_path, capsys):
    ff.torchscript_file(tmp_path / "ts.pt", ff.tiny_torch(), size=16)
    code, _, err = run_cli(["export", "ts", "--checkpoint", tmp_path / "ts.pt", "--custom", "--classes", "a,b,c",
                            "--out", tmp_path / "e"], capsys)
    assert code == 2 and "--input-size" in err and len(err.strip().splitlines()) == 1, err
    out, _ = _export(tmp_path, capsys, "ts", tmp_path / "ts.pt", "--custom", "--classes", "a,b,c", "--input-size", 16)
    assert ("preprocessing not declared, assumed: layout NCHW, channels RGB, scale 1/255, mean none, std none, "
            "resize crop") in out


def test_keras_softmax_model_predicts_its_own_probabilities(tmp_path, capsys):
    model = ff.tiny_keras(tmp_path / "soft.h5", size=20, outputs=3, activation="softmax", rescale=True)
    data = _image_folder(tmp_path, ["a", "b", "c"])
    out, fp32 = _export(tmp_path, capsys, "soft", tmp_path / "soft.h5", "--custom", "--data", data,
                        "--scale", "1", "--mean", "none", "--std", "none")
    m = onnx_meta.read(fp32)
    assert m["output"] == "probabilities" and m["framework"] == "keras" and m["input_layout"] == "NHWC"
    imgs = sorted(data.rglob("*.png"))[:4]
    code, out, err = run_cli(["predict", fp32, *imgs, "--json"], capsys)
    assert code == 0, err
    got = np.array([[p["probabilities"][c] for c in "abc"] for p in json.loads(out)["predictions"]])
    own = np.asarray(model(m["preprocessing"].load_batch(imgs), training=False))
    np.testing.assert_allclose(got, own, atol=1e-5)  # not softmaxed twice
    code, _, err = run_cli(["eval", fp32, "--data", data, "--out", tmp_path / "r"], capsys)
    assert code == 0, err


def test_keras_softmax_followed_by_dropout_is_probabilities(tmp_path, capsys):
    ff.tiny_keras(tmp_path / "drop.keras", size=16, outputs=3, activation="softmax", dropout_last=True)
    out, fp32 = _export(tmp_path, capsys, "drop", tmp_path / "drop.keras", "--custom", "--classes", "a,b,c")
    assert onnx_meta.read(fp32)["output"] == "probabilities" and "not softmaxed again" in out


def test_keras_single_sigmoid_is_a_binary_model(tmp_path, capsys):
    model = ff.tiny_keras(tmp_path / "sig.keras", size=16, outputs=1, activation="sigmoid")
    code, _, err = run_cli(["export", "sig", "--checkpoint", tmp_path / "sig.keras", "--custom", "--classes",
                            "a,b,c", "--out", tmp_path / "e"], capsys)
    assert code == 2 and "give 2 class names" in err
    out, fp32 = _export(tmp_path, capsys, "sig", tmp_path / "sig.keras", "--custom", "--classes", "healthy,tumour")
    assert onnx_meta.read(fp32)["output"] == "sigmoid"
    data = _image_folder(tmp_path, ["healthy", "tumour"], size=16)
    imgs = sorted(data.rglob("*.png"))[:3]
    code, out, err = run_cli(["predict", fp32, *imgs, "--json"], capsys)
    assert code == 0, err
    preds = json.loads(out)["predictions"]
    prep = onnx_meta.read(fp32)["preprocessing"]
    p = np.asarray(model(prep.load_batch(imgs), training=False))[:, 0]
    for pred, pi in zip(preds, p):
        probs = pred["probabilities"]
        assert abs(probs["healthy"] + probs["tumour"] - 1) < 1e-5 and abs(probs["tumour"] - pi) < 1e-5


def test_more_outputs_than_classes_is_the_same_for_keras_and_torch(tmp_path, capsys):
    model = ff.tiny_keras(tmp_path / "k5.h5", size=16, outputs=5, activation=None)
    out_k, fp32 = _export(tmp_path, capsys, "k5", tmp_path / "k5.h5", "--custom", "--classes", "a,b,c")
    x = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(_ort(fp32, x), np.asarray(model(x, training=False))[:, :3], rtol=1e-4, atol=1e-5)
    ff.torchscript_file(tmp_path / "t5.pt", ff.tiny_torch(outputs=5), size=16)
    out_t, _ = _export(tmp_path, capsys, "t5", tmp_path / "t5.pt", "--custom", "--classes", "a,b,c", "--input-size", 16)
    line = "the model has 5 outputs; exporting the first 3, labelled a, b, c"
    assert line in out_k and line in out_t


def test_keras_file_given_as_resnet50_must_be_one(tmp_path, capsys):
    ff.tiny_keras(tmp_path / "small.h5", size=32, outputs=3)
    code, _, err = run_cli(["export", "resnet50", "--checkpoint", tmp_path / "small.h5", "--classes", "a,b,c",
                            "--out", tmp_path / "e"], capsys)
    assert code == 2 and "is not a resnet50" in err and "--custom" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_keras_resnet50_with_preprocessing_inside_is_not_taken_as_resnet50(tmp_path, capsys):
    ff.keras_resnet50_softmax(tmp_path / "r50.h5", size=32, rescale=True)  # weights as ResNet50's; input 0..255 RGB
    code, out, err = run_cli(["export", "resnet50", "--checkpoint", tmp_path / "r50.h5", "--classes", "a,b,c",
                              "--out", tmp_path / "e", "--no-engine"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "e" / "resnet50").exists(), err
    assert "is not a plain resnet50" in err and "Rescaling" in err and "--custom" in err


def test_readme_bring_your_own_model_commands_exist():
    from pathlib import Path

    import test_jetson as tj

    md = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = md.split("## Bring your own model", 1)[1].split("\n## ", 1)[0]
    commands = tj.walkthrough_commands(tj.SECTION + "\n" + section)
    kinds = {w.rsplit(".", 1)[-1] for c in commands for w in c if w.endswith((".pth", ".h5", ".pt", ".pt2", ".onnx"))}
    assert {"pth", "h5", "pt", "pt2", "onnx"} <= kinds  # one worked example per source kind
    for words in commands:
        assert tj.command_path(words), f"not a lungedge command: {' '.join(words)}"
        assert not tj.unknown_options(words), f"{' '.join(words)}: unknown options {tj.unknown_options(words)}"


@pytest.mark.slow
def test_googlenet_trained_from_a_torchvision_state_dict_keeps_its_transform_everywhere(tmp_path, capsys):
    from lungedge.models.checkpoint import load_checkpoint, read_meta
    from lungedge.runners import open_runner

    torch.manual_seed(0)
    imagenet_like = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)  # 1,000 + aux
    torch.save(imagenet_like.state_dict(), tmp_path / "googlenet-imagenet.pth")
    data = write_dataset(tmp_path / "data", ["a", "b", "c"], per_class=12, size=40, colour=True)
    code, _, err = run_cli(["train", "googlenet", "--data", data, "--weights", tmp_path / "googlenet-imagenet.pth",
                            "--epochs", 1, "--batch-size", 4, "--image-size", 40, "--mode", "transfer",
                            "--out", tmp_path / "runs", "--run-name", "r"], capsys)
    assert code == 0, err
    ckpt = tmp_path / "runs" / "googlenet" / "r" / "best.pth"
    assert read_meta(ckpt)["build"]["kwargs"]["transform_input"] is True  # torchvision's pretrained setting
    code, out, err = run_cli(["export", "googlenet", "--runs", tmp_path / "runs", "--out", tmp_path / "e",
                              "--no-engine"], capsys)
    assert code == 0, err
    fp32 = tmp_path / "e" / "googlenet" / "googlenet.fp32.onnx"
    m = onnx_meta.read(fp32)
    assert m["build"]["kwargs"]["transform_input"] is True
    x = m["preprocessing"].load_batch(sorted(data.rglob("*.png"))[:4])
    model, _ = load_checkpoint(ckpt)  # the source, rebuilt from the checkpoint alone
    with torch.no_grad():
        source = model(torch.from_numpy(x)).numpy()
    assert model.transform_input is True
    with open_runner(ckpt, backend="torch") as runner:  # what eval runs
        assert runner.model.transform_input is True
        evaluated = runner.infer(x)
    np.testing.assert_allclose(evaluated, source, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_ort(fp32, x), source, rtol=1e-4, atol=1e-4)
    t = torch.from_numpy(x)  # the transform is part of the function: it changes what the first layer sees
    assert (model._transform_input(t) - t).abs().max() > 0.1


# -- the group's four deliverables (real architectures, random weights) -------------------------------------

def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.slow
def test_group_densenet121_state_dict_with_1000_outputs(tmp_path, capsys):
    model = ff.densenet121_state_dict(tmp_path / "densenet_lung_cancer.pth")
    assert sum(p.numel() for p in model.parameters()) == 7_978_856
    out, fp32 = _export(tmp_path, capsys, "densenet121", tmp_path / "densenet_lung_cancer.pth", "--classes",
                        ff.GROUP_CLASSES, "--input-size", 64, "--fp16")
    assert "1000 outputs; exporting the first 3" in out
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[:, :3].numpy()
    assert _rel(_ort(fp32, x), ref) <= 1e-4
    assert _rel(_ort(fp32.with_name("densenet121.fp16.onnx"), x), ref) <= 2e-2


@pytest.mark.slow
def test_group_inception_v3_with_its_aux_head(tmp_path, capsys):
    model = ff.inception_v3_with_aux(tmp_path / "inception_v3_lung_cancer.pth")
    assert sum(p.numel() for p in model.parameters()) == 25_118_411  # the group's table
    out, fp32 = _export(tmp_path, capsys, "inception_v3", tmp_path / "inception_v3_lung_cancer.pth", "--classes",
                        ff.GROUP_CLASSES, "--input-size", 96)
    notes = [ln for ln in out.splitlines() if "auxiliary head" in ln]
    assert len(notes) == 1 and "AuxLogits" in notes[0]
    assert "transform_input=True assumed" in out
    m = onnx_meta.read(fp32)
    assert m["build"]["kwargs"]["transform_input"] is True and m["output"] == "logits"
    x = np.random.default_rng(1).normal(size=(2, 3, 96, 96)).astype(np.float32)
    model.transform_input = True  # what the export assumed, as torchvision's pretrained model does
    with torch.no_grad():
        assert _rel(_ort(fp32, x), model(torch.from_numpy(x)).numpy()) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("aux", [True, False])
def test_group_googlenet_with_or_without_aux_heads(aux, tmp_path, capsys):
    model = ff.googlenet_state_dict(tmp_path / "googlenet_model.pth", aux=aux)
    out, fp32 = _export(tmp_path, capsys, "googlenet", tmp_path / "googlenet_model.pth", "--classes",
                        ff.GROUP_CLASSES, "--input-size", 64, "--no-transform-input")
    assert ("dropped the auxiliary heads aux1, aux2" in out) == aux
    assert "transform_input=False (--no-transform-input given)" in out
    assert onnx_meta.read(fp32)["build"]["kwargs"]["transform_input"] is False  # the user's override
    x = np.random.default_rng(2).normal(size=(2, 3, 64, 64)).astype(np.float32)
    model.transform_input = False
    with torch.no_grad():
        assert _rel(_ort(fp32, x), model(torch.from_numpy(x)).numpy()) <= 1e-4


@pytest.mark.slow
def test_group_keras_resnet50_sequential_softmax_h5(tmp_path, capsys):
    model = ff.keras_resnet50_softmax(tmp_path / "model_resnet50_20241016.h5", size=64)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert (model.count_params(), trainable) == (23_593_859, 6_147)
    data = _image_folder(tmp_path, ["Benign", "Malignant", "Normal"], size=64)
    out, fp32 = _export(tmp_path, capsys, "resnet50", tmp_path / "model_resnet50_20241016.h5", "--classes",
                        ff.GROUP_CLASSES, "--int8", "--calib-data", data, "--calib-size", 6)
    m = onnx_meta.read(fp32)
    assert m["output"] == "probabilities" and m["architecture"] == "resnet50"
    from lungedge.export.sources import keras_resnet50

    assert m["extra"]["converter"] == keras_resnet50.NAME  # read without TensorFlow's converter
    x = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32) * 50
    own = np.asarray(model(x, training=False))
    assert _rel(_ort(fp32, x), own) <= 1e-4
    img = data / "Malignant" / "img000_0.png"
    code, out, err = run_cli(["predict", fp32, img, "--json"], capsys)
    assert code == 0, err
    probs = json.loads(out)["predictions"][0]["probabilities"]
    own = np.asarray(model(m["preprocessing"].load_batch([img]), training=False))[0]
    np.testing.assert_allclose([probs[c] for c in ff.GROUP_CLASSES.split(",")], own, atol=1e-5)
    assert (fp32.parent / "resnet50.int8-cpu.onnx").is_file()


# -- files made by other framework versions ---------------------------------------------------------------------

KERAS2 = __import__("pathlib").Path(__file__).parent / "fixtures" / "keras2"


def test_keras2_h5_with_a_nested_model_exports_to_keras2s_own_numbers(tmp_path, capsys):
    """A small CNN saved by tf_keras 2.21 (tests/fixtures/keras2/make_fixture.py): a Sequential holding a nested
    functional block with a BatchNormalization, as Keras 2 code wraps keras.applications bases. Keras 3 alone
    cannot load it (nested list axis and outputs); the export's outputs are Keras 2's, stored with the file."""
    import shutil

    import h5py
    from PIL import Image

    with h5py.File(KERAS2 / "tiny_keras2.h5", "r") as fh:
        assert str(fh.attrs["keras_version"]).startswith("2.")  # really written by Keras 2
    ref = np.load(KERAS2 / "tiny_keras2.npz")
    assert str(ref["keras_version"]).startswith("2.")
    shutil.copy(KERAS2 / "tiny_keras2.h5", tmp_path / "theirs.h5")
    before = (tmp_path / "theirs.h5").read_bytes()
    out, fp32 = _export(tmp_path, capsys, "k2cnn", tmp_path / "theirs.h5", "--custom", "--classes", "a,b,c",
                        "--scale", "1/255", "--mean", "none", "--std", "none")
    assert (tmp_path / "theirs.h5").read_bytes() == before
    m = onnx_meta.read(fp32)
    assert m["output"] == "probabilities" and m["input_layout"] == "NHWC" and m["preprocessing"].size == 24
    np.testing.assert_allclose(_ort(fp32, ref["pixels"] / np.float32(255)), ref["probabilities"], atol=1e-5)
    imgs = []
    for i, px in enumerate(ref["pixels"].astype(np.uint8)):
        imgs.append(tmp_path / f"scan{i}.png")
        Image.fromarray(px).save(imgs[-1])
    code, out, err = run_cli(["predict", fp32, *imgs, "--json"], capsys)
    assert code == 0, err
    got = [[p["probabilities"][c] for c in "abc"] for p in json.loads(out)["predictions"]]
    np.testing.assert_allclose(got, ref["probabilities"], atol=1e-5)  # Keras 2's numbers, softmaxed once


def test_plain_onnx_from_the_dynamo_exporter_needs_its_external_data_file(tmp_path, capsys):
    import shutil

    model = ff.tiny_torch(outputs=3)
    ff.onnx_dynamo_file(tmp_path / "model.onnx", model, size=16)
    assert (tmp_path / "model.onnx.data").is_file()  # the weights are beside the graph, not in it
    _, fp32 = _export(tmp_path, capsys, "dyn", tmp_path / "model.onnx", "--custom", "--classes", "a,b,c",
                      "--scale", "1", "--mean", "none", "--std", "none")
    x = np.random.default_rng(4).normal(size=(3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(fp32, x), model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in fp32.parent.glob("dyn.fp32.onnx*")) == ["dyn.fp32.onnx"]  # one file
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(tmp_path / "model.onnx", moved)  # the .onnx copied without its .data
    args = ["export", "dyn2", "--checkpoint", moved / "model.onnx", "--custom", "--classes", "a,b,c",
            "--out", tmp_path / "e2", "--no-engine"]
    line = one_error(*run_cli(args, capsys)[::2])
    assert "external data file 'model.onnx.data'" in line and "missing" in line and "beside the .onnx" in line
    (moved / "model.onnx.data").write_bytes((tmp_path / "model.onnx.data").read_bytes()[:100])  # cut short
    line = one_error(*run_cli(args, capsys)[::2])
    assert "model.onnx.data is 100 bytes, shorter than" in line
    assert not (tmp_path / "e2").exists()


def test_old_opset_onnx_is_converted_so_int8_works(tmp_path, capsys):
    model = ff.tiny_torch(outputs=4)
    ff.onnx_file(tmp_path / "op9.onnx", model, size=16, names=("data", "prob"), opset=9)
    data = _image_folder(tmp_path, ["a", "b", "c"], size=16)
    out, fp32 = _export(tmp_path, capsys, "op9", tmp_path / "op9.onnx", "--custom", "--classes", "a,b,c",
                        "--scale", "1/255", "--mean", "none", "--std", "none", "--int8", "--calib-data", data,
                        "--calib-size", 6)
    assert "the graph is opset 9; converted to opset 13" in out and "4 outputs; exporting the first 3" in out
    import onnx

    for variant in ("fp32", "int8", "int8-cpu"):
        model_file = onnx.load(str(fp32.parent / f"op9.{variant}.onnx"))
        assert next(o.version for o in model_file.opset_import if o.domain in ("", "ai.onnx")) >= 13
    x = np.random.default_rng(5).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(fp32, x), model(torch.from_numpy(x))[:, :3].numpy(), rtol=1e-4, atol=1e-5)
    code, out, err = run_cli(["predict", fp32.parent / "op9.int8-cpu.onnx", sorted(data.rglob("*.png"))[0]], capsys)
    assert code == 0, err


@pytest.mark.parametrize("field, value, said", [
    ("ir_version", 14, r"ONNX Runtime cannot load \S+: its ONNX IR version is 14, newer than onnxruntime [\d.]+ reads "
                       r"\(up to \d+\)"),
    ("ir_version", 20, r"\S+ has ONNX IR version 20, newer than onnx [\d.]+ here reads \(up to \d+\)"),
    ("opset", 99, r"ONNX Runtime cannot load \S+: its opset 99 is newer than onnxruntime [\d.]+ supports "
                  r"\(up to \d+\): export it with opset_version=\d+ or lower")])
def test_onnx_from_a_newer_onnx_says_which_version_it_needs(tmp_path, capsys, field, value, said):
    """A graph saved by a newer onnx than this ONNX Runtime reads: the version, not 'check --input-size'."""
    import onnx

    path = ff.onnx_file(tmp_path / "new.onnx", ff.tiny_torch(), size=16)
    model = onnx.load(str(path))
    if field == "ir_version":
        model.ir_version = value
    else:
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = value
    onnx.save(model, str(path))
    code, _, err = run_cli(["export", "new", "--custom", "--classes", "a,b,c", "--checkpoint", path,
                            "--out", tmp_path / "e", "--no-engine"], capsys)
    one_error(code, err, match=said)
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_pickled_model_with_a_softmax_head_is_not_softmaxed_twice(tmp_path, capsys):
    torch.manual_seed(2)
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=3,
                                       transform_input=False)
    net.fc = torch.nn.Sequential(torch.nn.Linear(1024, 3), torch.nn.Softmax(dim=1))  # as many notebooks write it
    net.eval()
    torch.save(net, tmp_path / "soft.pth")
    data = _image_folder(tmp_path, ["a", "b", "c"], size=32)
    out, fp32 = _export(tmp_path, capsys, "googlenet", tmp_path / "soft.pth", "--classes", "a,b,c", "--input-size",
                        32, "--trust-pickle")
    assert onnx_meta.read(fp32)["output"] == "probabilities" and "not softmaxed again" in out
    imgs = sorted(data.rglob("*.png"))[:3]
    code, out, err = run_cli(["predict", fp32, *imgs, "--json"], capsys)
    assert code == 0, err
    got = [[p["probabilities"][c] for c in "abc"] for p in json.loads(out)["predictions"]]
    with torch.no_grad():
        own = net(torch.from_numpy(onnx_meta.read(fp32)["preprocessing"].load_batch(imgs))).numpy()
    np.testing.assert_allclose(got, own, atol=1e-5)  # the model's own probabilities, softmaxed once


@pytest.mark.slow
def test_state_dict_declared_sigmoid_gets_the_activation_it_cannot_hold(tmp_path, capsys):
    torch.manual_seed(3)
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=1,
                                       transform_input=False).eval()  # one logit, trained with BCEWithLogitsLoss
    torch.save(net.state_dict(), tmp_path / "binary.pth")
    out, fp32 = _export(tmp_path, capsys, "googlenet", tmp_path / "binary.pth", "--classes", "normal,tumour",
                        "--input-size", 32, "--no-transform-input", "--output", "sigmoid")
    assert onnx_meta.read(fp32)["output"] == "sigmoid"
    x = np.random.default_rng(7).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():  # P(tumour), not the raw logit read as one
        np.testing.assert_allclose(_ort(fp32, x), torch.sigmoid(net(torch.from_numpy(x))).numpy(), atol=1e-5)
    assert "a Sigmoid is appended" in out


def test_pth_holding_only_the_head_says_so(tmp_path, capsys):
    head = torch.nn.Linear(1024, 3)
    torch.save(head.state_dict(), tmp_path / "fc.pth")  # model.fc.state_dict() saved instead of the model's
    torch.save({"fc": head.state_dict()}, tmp_path / "heads.pth")
    _save_state(head.state_dict(), tmp_path / "fc.safetensors")
    _save_state({f"fc.{k}": v for k, v in head.state_dict().items()}, tmp_path / "fc2.safetensors")
    for name, where in (("fc.pth", ""), ("heads.pth", " (under 'fc')"), ("fc.safetensors", ""),
                        ("fc2.safetensors", "")):
        code, _, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / name, "--classes", "a,b,c",
                                "--out", tmp_path / "e"], capsys)
        line = one_error(code, err)
        assert f"holds only a classifier head's weights{where}, a Linear 1024 -> 3, not a whole googlenet" in line
        assert "model.state_dict()" in line


class _Wrapper(torch.nn.Module):  # a training wrapper (PyTorch Lightning, timm/HF-style): every name gets "model."
    def __init__(self, model):
        super().__init__()
        self.model = model


@pytest.mark.parametrize("name,dtype", [("sd.pth", torch.float16), ("sd.safetensors", torch.float16),
                                        ("saved_model.safetensors", torch.bfloat16)])
def test_half_precision_state_dict_with_prefix_and_dropout_head_exports_its_logits(name, dtype, tmp_path, capsys):
    """A reduced-precision state dict, DataParallel's ``module.`` (or a wrapper's ``model.``) on every name and a
    ``Sequential(Dropout, Linear)`` head: a ``.safetensors`` file (``save_file`` or ``save_model``, with
    ``__metadata__``) is read exactly as the ``.pth`` is, and the FP32 ONNX gives the model's own logits."""
    torch.manual_seed(9)
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=3,
                                       transform_input=False)
    net.fc = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(1024, 3))
    net = net.to(dtype).eval()
    if name == "saved_model.safetensors":
        from safetensors.torch import save_model

        save_model(_Wrapper(net), str(tmp_path / name), metadata={"format": "pt"})
        prefix = "model."
    else:
        _save_state(torch.nn.DataParallel(net).state_dict(), tmp_path / name)
        prefix = "module."
    out, fp32 = _export(tmp_path, capsys, "googlenet", tmp_path / name, "--classes", "a,b,c", "--input-size", 32,
                        "--no-transform-input")
    assert f"removed the {prefix!r} prefix" in out and "only weights are fc.1 (Linear 1024 -> 3)" in out
    assert f"{name} holds {str(dtype).removeprefix('torch.')} weights; converted to float32" in out
    m = onnx_meta.read(fp32)
    assert m["architecture"] == "googlenet" and m["classes"] == ["a", "b", "c"] and m["output"] == "logits"
    assert m["source_sha256"] == __import__("hashlib").sha256((tmp_path / name).read_bytes()).hexdigest()
    x = np.random.default_rng(10).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():  # the same weights, in float32
        own = net.float()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort(fp32, x), own, rtol=1e-4, atol=1e-4)


def _safetensors_bytes(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


def _damaged_safetensors(tmp_path) -> dict:
    """name -> (bytes, the words the one error line must hold)."""
    from safetensors.torch import save

    good = save({"fc.weight": torch.ones(3, 4), "fc.bias": torch.zeros(3)})
    n = int.from_bytes(good[:8], "little")
    f4 = {"w": {"dtype": "F4", "shape": [2, 2], "data_offsets": [0, 2]}}
    return {
        "cut.safetensors": (good[:-7], "its header places 60 bytes of tensors after it, but the file holds 53"),
        "cut_header.safetensors": (good[:40], f"its header length says {n:,} bytes, but 32 follow it"),
        "long_header.safetensors": (_safetensors_bytes({}, length=10 ** 12), "its header length says 1,000,000,000,000"),
        "not_json.safetensors": ((10).to_bytes(8, "little") + b"{not json}" + bytes(16), "its header is not JSON"),
        "metadata_only.safetensors": (_safetensors_bytes({"__metadata__": {"format": "pt"}}), "holding no tensors"),
        "bad_dtype.safetensors": (_safetensors_bytes({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}},
                                                     b"\0"), r"not a readable safetensors file \(.*unknown variant"),
        "float4.safetensors": (_safetensors_bytes(f4, b"\0\0"), "tensor w is float4_e2m1fn_x2, which has no float32"),
    }


def test_damaged_or_empty_safetensors_is_one_line_for_export_and_train_weights(tmp_path, capsys):
    from lungedge.models import registry

    for name, (data, words) in _damaged_safetensors(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        code, _, err = run_cli(["export", "densenet121", "--checkpoint", tmp_path / name, "--classes", "a,b,c",
                                "--out", tmp_path / "e"], capsys)
        one_error(code, err, match=words)
        with pytest.raises(LungedgeError, match=words):  # `lungedge train densenet121 --weights FILE`
            registry.create("densenet121", weights=str(tmp_path / name), image_size=32)
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_files_saved_on_a_gpu_machine_load_on_the_cpu(tmp_path, capsys):
    torch.manual_seed(4)
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=3,
                                       transform_input=False).eval()
    torch.save(net.state_dict(), tmp_path / "sd.pth")
    torch.save({"model": net, "epoch": 2}, tmp_path / "whole.pth")
    x = np.random.default_rng(8).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        own = net(torch.from_numpy(x)).numpy()
    for name, extra in (("sd.pth", ["--no-transform-input"]), ("whole.pth", ["--trust-pickle"])):
        cuda = ff.as_saved_on_cuda(tmp_path / name, tmp_path / f"cuda_{name}")
        if not torch.cuda.is_available():  # what a load without map_location="cpu" meets on this machine
            with pytest.raises(RuntimeError, match="CUDA"):
                torch.load(cuda, weights_only=name == "sd.pth")
        _, fp32 = _export(tmp_path, capsys, "googlenet", cuda, "--classes", "a,b,c", "--input-size", 32, *extra)
        np.testing.assert_allclose(_ort(fp32, x), own, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_int8_ranges_are_not_reused_for_another_graph_of_the_same_file(tmp_path, capsys):
    """One state dict gives two networks (with and without GoogLeNet's transform_input); the ranges calibrated
    on the first must not quantize the second."""
    ff.googlenet_state_dict(tmp_path / "g.pth", aux=False)
    data = _image_folder(tmp_path, ["a", "b", "c"], size=32)

    def int8(calibration, *extra):
        code, out, err = run_cli(["export", "googlenet", "--checkpoint", tmp_path / "g.pth", "--classes", "a,b,c",
                                  "--input-size", 32, "--int8", "--calib-data", data, "--calib-size", 3,
                                  "--calibration", tmp_path / calibration, "--out", tmp_path / "e", "--no-engine",
                                  *extra], capsys)
        assert code == 0, err
        return out, (tmp_path / "e" / "googlenet" / "googlenet.int8-cpu.onnx").read_bytes()

    int8("c1")  # transform_input=True (the default for a state dict)
    out, shared = int8("c1", "--no-transform-input")
    _, fresh = int8("c2", "--no-transform-input")
    assert shared == fresh  # the same as a calibration of its own
    assert "ranges computed and saved" in out and "ranges reused" in out  # computed for the trt file, reused once
    assert len(list((tmp_path / "c1").rglob("ranges.googlenet-*.json"))) == 2
