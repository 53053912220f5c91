"""`lungedge bundle`: create from a tiny exported model, verify, refuse tampered/truncated/unsafe archives,
extract safely; `lungedge engine build` fails in one line where TensorRT is missing."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import run_cli

MODEL = "googlenet"
CLASSES = ["benign", "malignant", "normal"]


def tiny_onnx(path: Path, precision: str, **extra) -> Path:
    """A few-node ONNX (GlobalAveragePool -> Flatten -> Gemm) with lungedge metadata."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lungedge import onnx_meta
    from lungedge.preprocess import Preprocessing

    pre = Preprocessing(size=16)
    rng = np.random.default_rng(len(precision))
    w = numpy_helper.from_array(rng.standard_normal((3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_meta.attach(model, onnx_meta.make_metadata(MODEL, "torch", CLASSES, pre, precision, "ab" * 32, **extra))
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def exported(tmp_path):
    """engines/googlenet/ with fp32, fp16, int8, int8-cpu ONNX and an export summary; calibration/<key>/."""
    engines, calibration = tmp_path / "engines", tmp_path / "calibration"
    folder = engines / MODEL
    files = {}
    for name, precision, extra in (("fp32", "fp32", {}), ("fp16", "fp16", {}),
                                   ("int8", "int8", {"int8_target": "trt", "calibration": "k123"}),
                                   ("int8-cpu", "int8", {"int8_target": "cpu", "calibration": "k123"})):
        files[name] = str(tiny_onnx(folder / f"{MODEL}.{name}.onnx", precision, **extra))
    (calibration / "k123").mkdir(parents=True)
    (calibration / "k123" / "manifest.json").write_text(json.dumps({"format": "lungedge-calibration/1", "key": "k123"}))
    (calibration / "k123" / "ranges.googlenet-abc.json").write_text("{}")  # not for the device
    summary = {"model": MODEL, "checkpoint": "runs/x/best.pth", "checkpoint_sha256": "ab" * 32, "classes": CLASSES,
               "files": files, "calibration": {"folder": str(calibration / "k123"), "key": "k123", "size": 9}}
    (folder / f"{MODEL}.export.json").write_text(json.dumps(summary))
    return tmp_path


def make_bundle(exported, capsys, *extra, name="gnet-jetson.tar.gz"):
    out = exported / "dist" / name
    code, stdout, err = run_cli(["bundle", MODEL, "--out", out, "--engines", exported / "engines",
                                 "--calibration", exported / "calibration", *extra], capsys)
    assert code == 0, err
    return out, stdout


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isreg() else None) for m in tar}


def rewrite(path: Path, out: Path, change) -> Path:
    """Copy a bundle member by member, letting ``change(name, data)`` alter, drop (None) or keep data."""
    buf = io.BytesIO()
    with tarfile.open(path, "r:gz") as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src:
            data = src.extractfile(m).read() if m.isreg() else None
            if m.isreg():
                data = change(m.name, data)
                if data is None:
                    continue
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    out.write_bytes(gzip.compress(buf.getvalue()))
    return out


def test_bundle_create_verify_and_contents(exported, capsys):
    out, stdout = make_bundle(exported, capsys, "--precision", "fp16,int8")
    assert "wrote" in stdout and out.is_file()
    names = members(out)
    top = "gnet-jetson"
    files = {n for n, d in names.items() if d is not None}
    assert files == {f"{top}/{f}" for f in ("README.md", "manifest.json", "SHA256SUMS",
                                             "engines/googlenet/googlenet.fp16.onnx", "engines/googlenet/googlenet.int8.onnx",
                                             "engines/googlenet/googlenet.export.json", "calibration/k123/manifest.json")}
    manifest = json.loads(names[f"{top}/manifest.json"])
    assert manifest["precisions"] == ["fp16", "int8"] and manifest["classes"] == CLASSES
    assert manifest["metadata"]["engines/googlenet/googlenet.int8.onnx"]["int8_target"] == "trt"
    for rel, entry in manifest["files"].items():
        data = names[f"{top}/{rel}"]
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert "lungedge engine build" in names[f"{top}/README.md"].decode()
    # SHA256SUMS works with plain sha256sum -c
    sums = names[f"{top}/SHA256SUMS"].decode().splitlines()
    assert len(sums) == len(manifest["files"]) + 1 and any(s.endswith("  manifest.json") for s in sums)

    code, stdout, err = run_cli(["bundle", "verify", out], capsys)
    assert code == 0 and stdout.startswith("ok:"), err
    # the same inputs give the same bytes; the spelled-out subcommand works too
    again = exported / "again" / out.name
    code, _, err = run_cli(["bundle", "create", MODEL, "--out", again, "--engines", exported / "engines",
                            "--calibration", exported / "calibration", "--precision", "fp16,int8"], capsys)
    assert code == 0, err
    assert again.read_bytes() == out.read_bytes()


def test_default_precisions_leave_out_the_cpu_int8(exported, capsys):
    out, _ = make_bundle(exported, capsys)
    manifest = json.loads(members(out)["gnet-jetson/manifest.json"])
    assert manifest["precisions"] == ["fp32", "fp16", "int8"]


@pytest.mark.parametrize("case", ["changed", "missing", "extra", "manifest-edited", "truncated", "corrupt",
                                  "not-gzip", "traversal", "symlink"])
def test_verify_refuses_bad_bundles(exported, capsys, case):
    out, _ = make_bundle(exported, capsys, "--precision", "fp16")
    bad = exported / f"bad-{case}.tar.gz"
    onnx_name = "gnet-jetson/engines/googlenet/googlenet.fp16.onnx"
    if case == "changed":
        rewrite(out, bad, lambda n, d: (d[:-1] + bytes([d[-1] ^ 1])) if n == onnx_name else d)
        expect = "does not match its SHA-256"
    elif case == "missing":
        rewrite(out, bad, lambda n, d: None if n == onnx_name else d)
        expect = "is missing engines/googlenet/googlenet.fp16.onnx"
    elif case == "extra":
        rewrite(out, bad, lambda n, d: d)
        with tarfile.open(bad, "r:gz") as t:
            ms = [(m, t.extractfile(m).read() if m.isreg() else None) for m in t]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for m, d in ms:
                t.addfile(m, io.BytesIO(d) if d is not None else None)
            info = tarfile.TarInfo("gnet-jetson/evil.sh")
            info.size = 4
            t.addfile(info, io.BytesIO(b"boo\n"))
        bad.write_bytes(gzip.compress(buf.getvalue()))
        expect = "does not list: evil.sh"
    elif case == "manifest-edited":  # a changed file with a manifest edited to match, SHA256SUMS left alone
        def change(n, d):
            if n == onnx_name:
                return d + b"\0"
            if n == "gnet-jetson/manifest.json":
                m = json.loads(d)
                original = (exported / "engines" / MODEL / f"{MODEL}.fp16.onnx").read_bytes() + b"\0"
                m["files"]["engines/googlenet/googlenet.fp16.onnx"] = {"sha256": hashlib.sha256(original).hexdigest(),
                                                         "size": len(original)}
                return json.dumps(m).encode()
            return d
        rewrite(out, bad, change)
        expect = "SHA256SUMS disagrees"
    elif case == "truncated":
        data = out.read_bytes()
        bad.write_bytes(data[: len(data) * 2 // 3])
        expect = "truncated or corrupt"
    elif case == "corrupt":
        data = bytearray(out.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
        expect = "truncated or corrupt"
    elif case == "not-gzip":
        bad.write_bytes(b"hello, this is not a bundle\n" * 10)
        expect = "truncated or corrupt"
    elif case == "traversal":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo("gnet-jetson/../../etc/evil")
            info.size = 3
            t.addfile(info, io.BytesIO(b"boo"))
        bad.write_bytes(gzip.compress(buf.getvalue()))
        expect = "unsafe member path"
    elif case == "symlink":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo("gnet-jetson/link")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(info)
        bad.write_bytes(gzip.compress(buf.getvalue()))
        expect = "not a regular file"
    code, stdout, err = run_cli(["bundle", "verify", bad], capsys)
    assert code == 2, (stdout, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expect in err, err
    # extract verifies first and writes nothing
    dest = exported / f"x-{case}"
    code, _, err = run_cli(["bundle", "extract", bad, "--to", dest], capsys)
    assert code == 2 and not (dest / "gnet-jetson").exists() and not (exported / "etc").exists()


def test_extract_then_sha256sum(exported, capsys, tmp_path):
    out, _ = make_bundle(exported, capsys, "--precision", "fp32,int8")
    dest = tmp_path / "device"
    code, stdout, err = run_cli(["bundle", "extract", out, "--to", dest], capsys)
    assert code == 0, err
    root = dest / "gnet-jetson"
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest
    assert [p.name for p in dest.iterdir()] == ["gnet-jetson"]  # no staging folder left behind
    from lungedge import onnx_meta

    meta = onnx_meta.read(root / "engines" / "googlenet" / "googlenet.int8.onnx")  # an ONNX alone is enough on the device
    assert meta["classes"] == CLASSES and meta["precision"] == "int8"
    code, _, err = run_cli(["bundle", "extract", out, "--to", dest], capsys)
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("args, expect", [
    (["--precision", "fp64"], "unknown precision"),
    (["--precision", "int8-cpu", "--calibration", "nowhere"], "calibration manifest is missing"),
])
def test_create_refuses_bad_input(exported, capsys, args, expect):
    if expect.startswith("calibration"):
        (exported / "calibration" / "k123" / "manifest.json").unlink()
    code, _, err = run_cli(["bundle", MODEL, "--out", exported / "b.tar.gz", "--engines", exported / "engines", *args],
                           capsys)
    assert code == 2 and expect in err and err.count("\n") == 1, err
    assert not (exported / "b.tar.gz").exists()


def test_create_refuses_missing_export_and_bad_name(tmp_path, exported, capsys):
    code, _, err = run_cli(["bundle", "densenet121", "--out", tmp_path / "d.tar.gz", "--engines", tmp_path], capsys)
    assert code == 2 and "lungedge export densenet121" in err, err
    code, _, err = run_cli(["bundle", MODEL, "--out", tmp_path / "d.zip", "--engines", exported / "engines"], capsys)
    assert code == 2 and ".tar.gz" in err, err
    (exported / "engines" / MODEL / f"{MODEL}.fp16.onnx").write_bytes(b"\x08\x01garbage")
    code, _, err = run_cli(["bundle", MODEL, "--out", tmp_path / "e.tar.gz", "--engines", exported / "engines",
                            "--precision", "fp16"], capsys)
    assert code == 2 and "not a valid ONNX" in err and not (tmp_path / "e.tar.gz").exists(), err


def test_engine_build_fails_in_one_line_without_tensorrt(exported, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    onnx_file = exported / "engines" / MODEL / f"{MODEL}.fp16.onnx"
    code, _, err = run_cli(["engine", "build", onnx_file, "--out", exported / "e"], capsys)
    assert code == 2 and err.startswith("error: ") and "TensorRT is not installed" in err and err.count("\n") == 1
    code, _, err = run_cli(["engine", "build", exported / "engines" / MODEL / f"{MODEL}.int8-cpu.onnx"], capsys)
    assert code == 2 and "CPU form" in err, err
    code, _, err = run_cli(["engine", "build", exported / "missing.onnx"], capsys)
    assert code == 2 and "not found" in err, err


def test_extract_while_another_extract_holds_the_folder_is_one_line(exported, capsys, tmp_path):
    """Two extracts of one bundle at once: the second is refused in one line (it used to end in an internal
    error, 'Directory not empty', when both renamed their staging folder into place)."""
    from lungedge.io import FolderLock

    out, _ = make_bundle(exported, capsys, "--precision", "fp32")
    dest = tmp_path / "device"
    with FolderLock(dest / "gnet-jetson", "lungedge bundle extract"):
        code, _, err = run_cli(["bundle", "extract", out, "--to", dest], capsys)
    assert code == 2 and err.count("\n") == 1 and "is being written by pid" in err, err
    assert not (dest / "gnet-jetson").exists()


def test_extract_removes_what_a_killed_extract_left(exported, capsys, tmp_path):
    out, _ = make_bundle(exported, capsys, "--precision", "fp32")
    dest = tmp_path / "device"
    dest.mkdir()
    code = ("import os, sys, tarfile\n"
            "orig = tarfile.TarFile.extractall\n"
            "def killed(self, path, *a, **k):\n"
            "    orig(self, path, *a, **k)\n"
            "    os.kill(os.getpid(), 9)\n"
            "tarfile.TarFile.extractall = killed\n"
            "from lungedge.bundle import extract\n"
            f"extract({str(out)!r}, {str(dest)!r})\n")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -9
    left = [p.name for p in dest.iterdir()]
    assert left and all(n.startswith(".gnet-jetson.") for n in left), left  # a staging folder, no gnet-jetson
    code, _, err = run_cli(["bundle", "extract", out, "--to", dest], capsys)
    assert code == 0, err
    assert [p.name for p in dest.iterdir()] == ["gnet-jetson"]
