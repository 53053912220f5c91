"""The hostile-user battery of issue #13: every bad input gives exit 2 and exactly one ``error:`` line,
never a traceback; an internal error is one line, exit 3, traceback in a log; Ctrl-C is exit 130 and
says what was kept; sets written by train and export are never mixed; measurements survive a failed write.

Files are generated here and tiny. One small trained smallcnn run (and its ONNX export) is shared.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import one_error, run_cli, small_file_limit, unwritable_folder, write_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # smallcnn input side in these tests
CLASSES = ["benign", "malignant", "normal"]


def cli(args, **kw) -> subprocess.CompletedProcess:
    """The real console script in a fresh process (for signals, limits and concurrency)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    if "preexec_fn" in kw:  # under a file-size limit a .pyc compiled on the way would be left truncated
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run([sys.executable, "-m", "lungedge", *map(str, args)], capture_output=True, text=True,
                          cwd=kw.pop("cwd", ROOT), env=env, timeout=kw.pop("timeout", 300), **kw)


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A PNG whose header says side x side pixels (a decompression bomb), a few hundred bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side + 1) * 4, 9)  # a few rows; the header is what must be refused
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny data set, its split manifest and a one-epoch smallcnn run (made once for the module)."""
    base = tmp_path_factory.mktemp("bad-input")
    data = write_dataset(base / "data", CLASSES, per_class=8, size=SIZE, colour=True)
    split = base / "split.json"
    runs = base / "runs"
    code = cli(["data", "split", data, "--out", split, "--group-by", "none"])
    assert code.returncode == 0, code.stderr
    proc = cli(["train", "smallcnn", "--split", split, "--epochs", "1", "--batch-size", "8", "--image-size", SIZE,
                "--weights", "none", "--out", runs, "--run-name", "r"])
    assert proc.returncode == 0, proc.stderr
    return {"base": base, "data": data, "split": split, "runs": runs, "run": runs / "smallcnn" / "r",
            "manifest": json.loads(split.read_text())}


# -- 1. the last-resort handler and Ctrl-C ------------------------------------------------------------------

BOOM = """
import sys
from lungedge.cli import app, run
@app.command("boom")
def boom():
    "Fail with an unexpected error."
    {body}
sys.argv = ["lungedge", "boom"]
run()
"""


@pytest.mark.parametrize("body, text", [("raise RuntimeError('disk on fire\\nsecond line')", "RuntimeError: disk on fire second line"),
                                        ("raise ValueError()", "ValueError: (no message)"),
                                        ("{}['missing']", "KeyError: 'missing'")])
def test_unexpected_error_is_one_line_and_a_log(tmp_path, body, text):
    proc = subprocess.run([sys.executable, "-c", BOOM.format(body=body)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    line = one_error(proc.returncode, proc.stderr, exit_code=3)
    m = re.fullmatch(rf"error: internal error in boom: {re.escape(text)}; details in (\S+)", line)
    assert m, line
    log = Path(m.group(1))
    assert log.parent == tmp_path / "cache" / "lungedge" / "logs"
    assert "Traceback (most recent call last)" in log.read_text() and "command: lungedge boom" in log.read_text()


def test_internal_error_log_falls_back_when_cache_is_read_only(tmp_path):
    ro = unwritable_folder(tmp_path)
    proc = subprocess.run([sys.executable, "-c", BOOM.format(body="raise RuntimeError('x')")], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "XDG_CACHE_HOME": str(ro / "cache")})
    line = one_error(proc.returncode, proc.stderr, exit_code=3)
    log = Path(line.split("details in ")[1])
    assert log.is_file() and not str(log).startswith(str(ro))


def test_ctrl_c_prints_interrupted(tmp_path):
    body = "import os, signal; os.kill(os.getpid(), signal.SIGINT)"
    proc = subprocess.run([sys.executable, "-c", BOOM.format(body=body)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 130
    assert proc.stderr.strip() == "interrupted"


# -- 2. data: unreadable files are listed, not tracebacks ---------------------------------------------------

@pytest.fixture
def messy_data(tmp_path):
    data = write_dataset(tmp_path / "data", ["a", "b"], per_class=4, size=24)
    (data / "a" / "loop.png").symlink_to("loop.png")  # a symlink loop
    (data / "a" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    bomb_png(data / "b" / "bomb.png")
    (data / "b" / "empty.png").write_bytes(b"")
    os.rename(write_dataset(tmp_path / "x", ["c", "d"], per_class=1, size=24) / "c" / "img000_0.png",
              os.fsencode(data / "b") + b"/caf\xe9.png")  # a Latin-1 name: not valid UTF-8
    return data


def test_inspect_lists_unreadable_files(messy_data, capsys):
    code, out, err = run_cli(["data", "inspect", messy_data, "--json", "--no-shortcuts"], capsys)
    assert code == 0 and "Traceback" not in err, err
    report = json.loads(out)
    reasons = {u["path"]: u["reason"] for u in report["unreadable"]}
    assert set(reasons) == {"a/loop.png", "a/dangling.png", "b/bomb.png", "b/empty.png"}
    assert "image too large" in reasons["b/bomb.png"] and "LUNGEDGE_MAX_PIXELS" in reasons["b/bomb.png"]
    assert "Too many levels of symbolic links" in reasons["a/loop.png"]
    assert "No such file" in reasons["a/dangling.png"]
    assert report["readable_counts"] == {"a": 4, "b": 4}
    assert any("not valid UTF-8" in n and "caf\ufffd.png" in n for n in report["notes"])


def test_split_skips_unreadable_files(messy_data, tmp_path, capsys):
    code, out, err = run_cli(["data", "split", messy_data, "--out", tmp_path / "s.json", "--group-by", "none"], capsys)
    assert code == 0 and "Traceback" not in err, err
    manifest = json.loads((tmp_path / "s.json").read_text())
    assert len(manifest["items"]) == 8
    assert {s["path"] for s in manifest["skipped"]} == {"a/loop.png", "a/dangling.png", "b/bomb.png", "b/empty.png"}


def memory_limit(nbytes: int = 3 << 30):
    """preexec_fn for subprocess: at most ``nbytes`` of address space (reading /dev/zero to the end fails fast)."""
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))

    return apply


def test_fifo_and_device_named_like_images_are_not_read(tmp_path):
    data = write_dataset(tmp_path / "data", ["a", "b"], per_class=2, size=24)
    os.mkfifo(data / "a" / "fifo.png")  # opening it would wait for a writer forever
    (data / "b" / "zero.png").symlink_to("/dev/zero")  # reading it never ends
    proc = cli(["data", "inspect", data, "--json", "--no-shortcuts"], timeout=60, preexec_fn=memory_limit())
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    assert {u["path"]: u["reason"] for u in report["unreadable"]} == {"a/fifo.png": "not a regular file",
                                                                      "b/zero.png": "not a regular file"}
    assert report["identical"] == [] and report["readable_counts"] == {"a": 2, "b": 2}


def test_pixel_limit_is_configurable(tmp_path, capsys, monkeypatch):
    data = write_dataset(tmp_path / "data", ["a", "b"], per_class=2, size=24)
    monkeypatch.setenv("LUNGEDGE_MAX_PIXELS", str(20 * 20))
    code, out, err = run_cli(["data", "inspect", data, "--json", "--no-shortcuts"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["unreadable"]) == 4  # every 24x24 image is now over the limit
    monkeypatch.setenv("LUNGEDGE_MAX_PIXELS", "lots")
    one_error(*run_cli(["data", "inspect", data, "--no-shortcuts"], capsys)[::2], match="LUNGEDGE_MAX_PIXELS must be")


def test_permission_denied_class_folder_is_an_error(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", ["a", "b", "c"], per_class=2, size=24)
    (data / "c").chmod(0)
    try:
        if os.access(data / "c", os.R_OK):
            pytest.skip("running as root: permissions do not stop reading")
        code, _, err = run_cli(["data", "inspect", data, "--no-shortcuts"], capsys)
        one_error(code, err, match=r"cannot read folder .*/c: Permission denied")
    finally:
        (data / "c").chmod(0o755)


# -- 2/4. manifests: schema and containment ------------------------------------------------------------------

def _mutations():
    def item(i, **kv):
        return lambda m: m["items"][i].update(kv)

    return {
        "missing key": (lambda m: m["items"][0].pop("sha256"), r"items\.0\.sha256: Field required"),
        "string items": (lambda m: m.__setitem__("items", ["a.png"]), r"items\.0: Input should be a valid dictionary"),
        "unknown split": (item(0, split="holdout"), r"items\.0\.split: Input should be 'train', 'val' or 'test'"),
        "unknown label": (item(1, label="tumour"), r"items\.1\.label: 'tumour' is not one of the classes"),
        "parent path": (item(0, path="../../etc/passwd"), r"items\.0\.path: '\.\./\.\./etc/passwd' is not inside"),
        "absolute path": (item(0, path="/etc/passwd"), r"items\.0\.path: '/etc/passwd' is not inside .*absolute"),
        "missing dataset": (lambda m: m.pop("dataset"), r"dataset: Field required"),
        "one class": (lambda m: m.__setitem__("classes", ["benign"]), r"classes: List should have at least 2"),
        "string threshold": (lambda m: m["params"].__setitem__("threshold", "NaN"),
                             r"params\.threshold: Input should be a valid number"),
        "nan threshold": (lambda m: m["params"].__setitem__("threshold", float("nan")),
                          r"params\.threshold: Input should be a finite number"),
        "no items": (lambda m: m.__setitem__("items", []), r"items: List should have at least 1 item"),
        "repeated item": (lambda m: m["items"].append(dict(m["items"][0])),
                          r"items\.24\.path: '.*' is listed twice \(also items\.0\)"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
@pytest.mark.parametrize("command", ["audit", "train"])
def test_bad_manifest_is_one_line_naming_file_and_field(small, tmp_path, capsys, case, command):
    mutate, pattern = _mutations()[case]
    manifest = copy.deepcopy(small["manifest"])
    mutate(manifest)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(manifest))
    args = (["data", "audit", path, "--no-shortcuts"] if command == "audit" else
            ["train", "smallcnn", "--split", path, "--epochs", "1", "--weights", "none", "--out", tmp_path / "runs"])
    code, _, err = run_cli(args, capsys)
    one_error(code, err, match=rf"{re.escape(str(path))}: {pattern}")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd"])
def test_manifest_entries_stay_inside_the_root_without_the_schema(small, tmp_path, monkeypatch, entry):
    """The data root is enforced where images are read, not only by pydantic's schema (a bare machine may lack it)."""
    from lungedge import validation
    from lungedge.data.split import load_manifest
    from lungedge.errors import LungedgeError

    monkeypatch.setattr(validation, "validate", lambda *a, **k: None)  # as on a machine without pydantic
    manifest = copy.deepcopy(small["manifest"])
    manifest["items"][0]["path"] = entry
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(LungedgeError, match=r"manifest entry '.*' is not inside"):
        load_manifest(path, root=small["data"])


def test_training_part_without_a_declared_class_is_refused(small, tmp_path, capsys):
    """A hand-edited manifest whose training images are all of one class (or that declares a class without
    images) would train a model that never saw the others, and score it on val/test parts that hide it."""
    manifest = copy.deepcopy(small["manifest"])
    manifest["items"] = [it for it in manifest["items"] if it["label"] == "benign" or it["split"] != "train"]
    path = tmp_path / "only-benign.json"
    path.write_text(json.dumps(manifest))
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", "smallcnn", "--split", path, "--epochs", "1", "--weights", "none",
                            "--image-size", SIZE, "--out", runs], capsys)
    one_error(code, err, match=r"training part has no images of malignant, normal "
                               r"\(classes benign, malignant, normal\)")
    assert not any(p.is_dir() for p in runs.glob("smallcnn/*")), list(runs.rglob("*"))


# -- 2. numeric options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, pattern", [
    (["--image-size", "100000"], r"--image-size must be a whole number of pixels from 8 to 2048"),
    (["--image-size", "4"], r"--image-size must be"),
    (["--lr", "inf"], r"--lr must be a finite number greater than 0, got inf"),
    (["--lr", "nan"], r"--lr must be a finite number greater than 0, got nan"),
    (["--lr", "1e30"], r"--lr must be at most 1"),
    (["--lr", "0"], r"--lr must be a finite number greater than 0"),
    (["--batch-size", "0"], r"--batch-size must be a whole number greater than 0"),
    (["--batch-size", "-3"], r"--batch-size must be a whole number greater than 0"),
    (["--run-name", "../../x"], r"--run-name must be a plain folder name .* got '\.\./\.\./x'"),
    (["--run-name", "/tmp/abs"], r"--run-name must be a plain folder name"),
])
def test_train_options_are_checked(small, tmp_path, capsys, args, pattern):
    code, _, err = run_cli(["train", "smallcnn", "--split", small["split"], "--epochs", "1", "--weights", "none",
                            "--out", tmp_path / "runs", *args], capsys)
    one_error(code, err, match=pattern)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_split_without_validation_images_is_refused_and_leaves_no_run(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", CLASSES, per_class=4, size=SIZE)  # 12 images: no room for a val part
    runs = tmp_path / "runs"
    code, _, err = run_cli(["train", "smallcnn", "--data", data, "--epochs", "1", "--weights", "none",
                            "--image-size", SIZE, "--out", runs], capsys)
    one_error(code, err, match=r"the split has no validation images \(12 images in all\)")
    assert not any(p.is_dir() for p in runs.glob("smallcnn/*")), list(runs.rglob("*"))


def test_input_size_cap_is_configurable(small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LUNGEDGE_MAX_INPUT_SIZE", "16")
    code, _, err = run_cli(["train", "smallcnn", "--split", small["split"], "--epochs", "1", "--weights", "none",
                            "--image-size", SIZE, "--out", tmp_path / "runs"], capsys)
    one_error(code, err, match=r"from 8 to 16 \(LUNGEDGE_MAX_INPUT_SIZE\), got 32")


# -- 3. two trainings into one run folder; Ctrl-C keeps the last epoch -----------------------------------------

@pytest.mark.parametrize("stop, code, said", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, r"terminated \(SIGTERM\)")])  # docker stop
def test_second_train_into_same_run_refuses_and_first_set_stays_whole(small, tmp_path, stop, code, said):
    runs = tmp_path / "runs"
    args = ["train", "smallcnn", "--split", small["split"], "--batch-size", "4", "--image-size", SIZE, "--weights",
            "none", "--out", runs, "--run-name", "same"]
    first = subprocess.Popen([sys.executable, "-m", "lungedge", *map(str, args), "--epochs", "500"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = runs / "smallcnn" / "same"
    try:
        deadline = time.time() + 120
        while not (run / "metrics.json").exists():  # one epoch done: last.pth and metrics.json written
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() is not None else "slow"
            time.sleep(0.2)
        second = cli([*args, "--epochs", "1", "--seed", "7"])
        one_error(second.returncode, second.stderr,
                  match=rf"{re.escape(str(run))} is being written by pid {first.pid} on .*lungedge train")
    finally:
        first.send_signal(stop)
        _, err = first.communicate(timeout=60)
    assert first.returncode == code, err
    assert "Traceback" not in err
    assert re.search(rf"^{said}; {re.escape(str(run))} keeps its last finished epoch; continue with "
                     r"'lungedge train smallcnn .* --run-name same --resume'$", err, re.M), err
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["seed"] == 0 and metrics["config"]["seed"] == 0 and config["epochs"] == 500
    assert not list(run.glob(".*.tmp")) and not (runs / "smallcnn" / ".same.lock").exists()
    again = cli([*args, "--epochs", "1"])
    one_error(again.returncode, again.stderr, match="already holds a run; use --resume or another --run-name")


def _unfinished_copy(run: Path, dst: Path) -> Path:
    """A copy of a finished run as a kill after its first epoch leaves it: metrics.json says "running";
    its best checkpoint is the newest file under the runs folder."""
    import shutil

    shutil.copytree(run, dst)
    metrics = json.loads((dst / "metrics.json").read_text())
    (dst / "metrics.json").write_text(json.dumps({**metrics, "status": "running", "test": None}))
    later = time.time() + 60
    os.utime(dst / "best.pth", (later, later))
    return dst


def test_default_checkpoint_is_the_newest_finished_run(small, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(small["run"], runs / "smallcnn" / "r")
    killed = _unfinished_copy(small["run"], runs / "smallcnn" / "k")
    code, out, err = run_cli(["export", "smallcnn", "--runs", runs, "--out", tmp_path / "e", "--no-engine"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "e" / "smallcnn" / "smallcnn.export.json").read_text())
    assert summary["checkpoint"] == str(runs / "smallcnn" / "r" / "best.pth")
    assert re.search(r"^note: using .*/r/best\.pth, the newest finished run; passed over the newer unfinished k",
                     out, re.M), out
    shutil.rmtree(runs / "smallcnn" / "r")  # only the killed run is left: refused, with the way to use it anyway
    code, _, err = run_cli(["export", "smallcnn", "--runs", runs, "--out", tmp_path / "e2", "--no-engine"], capsys)
    one_error(code, err, match=rf"training of {re.escape(str(killed))} did not finish \(status running\).* "
                               rf"--resume', or pass --checkpoint {re.escape(str(killed / 'best.pth'))} ")
    code, _, err = run_cli(["eval", "smallcnn", "--runs", runs, "--engines", tmp_path / "none", "--backend", "torch",
                            "--out", tmp_path / "res"], capsys)
    one_error(code, err, match=r"did not finish \(status running\), so it is not used by default")
    assert not (tmp_path / "e2").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("edit, pattern", [
    (lambda text: text[: len(text) // 2], r" is not a run configuration \(invalid JSON: .*\)"),
    (lambda text: text.replace('"epochs": 1', '"epochs": "many"'), r": epochs: Input should be a valid integer"),
    (lambda text: re.sub(r'"lr": [^,]+', '"lr": 5', text), r": lr: Input should be less than or equal to 1"),
])
def test_resume_with_a_damaged_config_names_the_file_and_field(small, tmp_path, capsys, edit, pattern):
    run = _unfinished_copy(small["run"], tmp_path / "runs" / "smallcnn" / "k")
    (run / "config.json").write_text(edit((run / "config.json").read_text()))
    before = _set_digest(run)
    code, _, err = run_cli(["train", "smallcnn", "--out", tmp_path / "runs", "--run-name", "k", "--resume"], capsys)
    one_error(code, err, match=re.escape(str(run / "config.json")) + pattern)
    assert "--lr" not in err and _set_digest(run) == before  # the stored value is named, not an option never given


def test_resume_refuses_options_that_differ_from_the_run(small, tmp_path, capsys):
    run = _unfinished_copy(small["run"], tmp_path / "runs" / "smallcnn" / "k")
    before = _set_digest(run)
    code, _, err = run_cli(["train", "smallcnn", "--out", tmp_path / "runs", "--run-name", "k", "--resume",
                            "--epochs", "3", "--lr", "0.5", "--image-size", "64", "--no-augment"], capsys)
    one_error(code, err, match=rf"--resume continues {re.escape(str(run))} as it was started, but --epochs 3 "
                               r"\(started with 1\); --image-size 64 \(started with 32\); --lr 0\.5 \(started with "
                               r"[0-9.e-]+\); --no-augment \(started with --augment\): drop these options")
    assert _set_digest(run) == before


# -- exported ONNX: one small export shared by the rest -----------------------------------------------------

@pytest.fixture(scope="module")
def exported(small):
    engines = small["base"] / "engines"
    proc = cli(["export", "smallcnn", "--runs", small["runs"], "--out", engines, "--fp16", "--no-engine"])
    assert proc.returncode == 0, proc.stderr
    return {**small, "engines": engines, "folder": engines / "smallcnn", "onnx": engines / "smallcnn" / "smallcnn.fp32.onnx"}


def _tampered(src: Path, dst: Path, **props) -> Path:
    import onnx

    model = onnx.load(str(src))
    for p in model.metadata_props:
        key = p.key[len("lungedge."):]
        if key in props:
            p.value = props[key]
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("props, pattern", [
    ({"classes": "[not json"}, r"metadata lungedge\.classes is not valid JSON"),
    ({"preprocessing": json.dumps({"size": 100000, "mean": [0, 0, 0], "std": [1, 1, 1], "scale": 1,
                                   "channel_order": "RGB", "layout": "NCHW"})},
     r"metadata: preprocessing\.size: input size 100000 is outside 8\.\.2048"),
    ({"classes": json.dumps(["a", "a", "b"])}, r"metadata: classes: .*class names repeat"),
    ({"precision": "fp8"}, r"metadata: precision: Input should be 'fp32', 'fp16' or 'int8'"),
    ({"extra": json.dumps({"temperature": {"value": -1}})},
     r"metadata extra\.temperature: temperature -1 is not a finite number above 0"),
])
def test_onnx_with_bad_metadata_is_one_line(exported, tmp_path, capsys, props, pattern):
    onnx_file = _tampered(exported["onnx"], tmp_path / "smallcnn.fp32.onnx", **props)
    img = tmp_path / "x.png"
    write_dataset(tmp_path / "d", ["a", "b"], per_class=1, size=SIZE)
    img.write_bytes((tmp_path / "d" / "a" / "img000_0.png").read_bytes())
    code, _, err = run_cli(["predict", onnx_file, img], capsys)
    one_error(code, err, match=pattern)


def test_onnx_with_more_class_names_than_outputs_is_refused(exported, tmp_path, capsys):
    onnx_file = _tampered(exported["onnx"], tmp_path / "m.onnx", classes=json.dumps([*CLASSES, "extra"]))
    img = next((exported["data"] / "benign").glob("*.png"))
    code, _, err = run_cli(["predict", onnx_file, img], capsys)
    one_error(code, err, match=r"shape \(1, 3\).*\(1, 4\)")


def test_predict_lists_a_decompression_bomb_as_unreadable(exported, tmp_path, capsys):
    good = next((exported["data"] / "benign").glob("*.png"))
    bomb = bomb_png(tmp_path / "bomb.png")
    code, out, err = run_cli(["predict", exported["onnx"], good, bomb, "--json"], capsys)
    assert code == 1 and "Traceback" not in err, err  # a partial answer is not exit 0; the JSON still comes whole
    assert "1 of 2 images could not be read" in err and not [ln for ln in err.splitlines() if ln.startswith("error:")]
    res = json.loads(out)
    assert [p["image"] for p in res["predictions"]] == [str(good)]
    assert res["unreadable"][0]["image"] == str(bomb) and "image too large" in res["unreadable"][0]["reason"]
    code, out, err = run_cli(["predict", exported["onnx"], good, bomb], capsys)
    assert code == 1 and f"{bomb}: unreadable" in out and "1 of 2 images could not be read" in err
    code, out, _ = run_cli(["predict", exported["onnx"], good], capsys)
    assert code == 0 and str(good) in out
    code, _, err = run_cli(["predict", exported["onnx"], bomb], capsys)
    one_error(code, err, match="none of the 1 images could be read .*image too large")


def test_predict_on_a_fifo_is_one_line(exported, tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    proc = cli(["predict", exported["onnx"], tmp_path / "fifo.png"], timeout=120)
    one_error(proc.returncode, proc.stderr, match=r"none of the 1 images could be read \(first: .*fifo\.png: not a regular file\)")


@pytest.fixture
def odd_names(exported, tmp_path):
    """An image under a name with a newline and one under a name that is not UTF-8."""
    good = next((exported["data"] / "benign").glob("*.png")).read_bytes()
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "new\nline.png").write_bytes(good)
    Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png")).write_bytes(good)
    return [folder / "new\nline.png", Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png"))]


def test_odd_file_names_are_printed_escaped_one_line_each(exported, odd_names, capsys):
    code, out, err = run_cli(["predict", exported["onnx"], *odd_names], capsys)
    assert code == 0, err
    lines = out.splitlines()[1:]
    assert len(lines) == 2 and lines[0].startswith(repr(str(odd_names[0])) + ": ")
    assert lines[1].startswith(repr(str(odd_names[1])) + ": ") and "\\udce9" in lines[1]
    data = write_dataset(odd_names[0].parent.parent / "data", ["a", "b"], per_class=2, size=24)
    (data / "a" / "new\nline.png").write_bytes((data / "a" / "img000_0.png").read_bytes())
    (data / "b" / "bad\rname.png").write_bytes(b"not an image")
    code, out, err = run_cli(["data", "inspect", data, "--no-shortcuts"], capsys)
    assert code == 0, err
    assert "  a/img000_0.png  ==  'a/new\\nline.png'\n" in out and "  'b/bad\\rname.png': not an image file\n" in out


def test_predict_json_is_valid_utf8_whatever_the_file_names(exported, odd_names):
    proc = subprocess.run([sys.executable, "-m", "lungedge", "predict", exported["onnx"], *odd_names, "--json"],
                          capture_output=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.decode("utf-8"))  # strict: undecodable bytes would fail here
    assert [os.fsencode(p["image"]) for p in result["predictions"]] == [os.fsencode(p) for p in odd_names]


@pytest.fixture
def same_names(exported, tmp_path):
    """Three different images, each named img05.png, in three folders."""
    sources = sorted((exported["data"] / "benign").glob("*.png"))[:3]
    images = []
    for folder, src in zip("abc", sources):
        (tmp_path / folder).mkdir()
        images.append(tmp_path / folder / "img05.png")
        images[-1].write_bytes(src.read_bytes())
    return images


def test_explain_keeps_one_overlay_per_image_when_names_repeat(exported, same_names, tmp_path, capsys):
    code, out, err = run_cli(["predict", exported["onnx"], *same_names, "--explain", tmp_path / "maps", "--json"],
                             capsys)
    assert code == 0, err
    overlays = [p["overlay"] for p in json.loads(out)["predictions"]]
    assert len(set(overlays)) == 3 and sorted(map(str, (tmp_path / "maps").iterdir())) == sorted(overlays)
    assert len({Path(f).read_bytes() for f in overlays}) == 3  # none overwrote another


def test_explain_on_a_full_disk_names_the_overlay_and_leaves_no_partial_file(exported, same_names, tmp_path):
    maps = tmp_path / "maps"
    proc = cli(["predict", exported["onnx"], *same_names, "--explain", maps], preexec_fn=small_file_limit(200))
    one_error(proc.returncode, proc.stderr, match=rf"cannot write {re.escape(str(maps))}/img05\.\w+\.occlusion\.png: ")
    assert list(maps.iterdir()) == []


@pytest.mark.parametrize("seconds", ["nan", "inf", "-1", "1e9"])
def test_bench_seconds_must_be_finite_and_bounded(exported, capsys, seconds):
    code, _, err = run_cli(["bench", exported["onnx"], "--seconds", seconds, "--out", exported["base"] / "res"], capsys)
    one_error(code, err, match="--seconds must be a finite number of seconds from 0 to 3600")


@pytest.mark.parametrize("opset", ["5", "99"])
def test_export_opset_out_of_range(exported, tmp_path, capsys, opset):
    code, _, err = run_cli(["export", "smallcnn", "--runs", exported["runs"], "--out", tmp_path / "e",
                            "--opset", opset, "--no-engine"], capsys)
    one_error(code, err, match=r"--opset")
    assert not (tmp_path / "e" / "smallcnn").exists()


def test_export_calibrates_again_over_a_truncated_ranges_cache(exported, tmp_path, capsys):
    args = ["export", "smallcnn", "--runs", exported["runs"], "--out", tmp_path / "e", "--int8", "--calib-size", "6",
            "--calib-method", "minmax", "--calibration", tmp_path / "c", "--no-engine"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    first = (tmp_path / "e" / "smallcnn" / "smallcnn.int8.onnx").read_bytes()
    cache = next((tmp_path / "c").rglob("ranges.*.json"))
    cache.write_text(cache.read_text()[:300])  # a copy cut short
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert f"note: calibration cache {cache} could not be used (not a calibration cache (JSONDecodeError" in out
    assert (tmp_path / "e" / "smallcnn" / "smallcnn.int8.onnx").read_bytes() == first  # the same ranges again


# -- 5. measurements survive a failed write ------------------------------------------------------------------

def test_bench_skips_an_unreadable_image_of_its_data_folder(exported, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(exported["data"], data)
    (data / "benign" / "aaa-empty.png").write_bytes(b"")
    code, out, err = run_cli(["bench", exported["onnx"], "--data", data, "--batch-sizes", "1", "--iters", "2",
                              "--warmup", "0", "--backend", "onnxruntime", "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    assert re.search(r"^skipped .*aaa-empty\.png: empty file \(0 bytes\): an interrupted download or copy\?$", err, re.M), err
    (data / "malignant").rename(tmp_path / "gone")  # only the empty file and the normal class left:
    for p in (data / "normal").iterdir():
        p.write_bytes(b"")
    for p in (data / "benign").iterdir():
        p.write_bytes(b"")
    code, _, err = run_cli(["bench", exported["onnx"], "--data", data, "--batch-sizes", "1", "--iters", "1",
                            "--backend", "onnxruntime", "--out", tmp_path / "r2"], capsys)
    one_error(code, err, match=r"none of the images picked from .* for the \+prep timing could be read")


@pytest.mark.parametrize("command", ["bench", "eval"])
@pytest.mark.parametrize("failure", ["read-only", "full disk", "a file"])
def test_table_printed_before_a_failed_write(exported, tmp_path, command, failure):
    kw = {}
    if failure == "read-only":
        out = unwritable_folder(tmp_path) / "results"
    elif failure == "a file":
        out = tmp_path / "results"
        out.write_text("not a folder")
    else:
        out, kw = tmp_path / "results", {"preexec_fn": small_file_limit(1024)}
    args = ([command, exported["onnx"], "--out", out] +
            (["--batch-sizes", "1", "--iters", "2", "--warmup", "0", "--data", exported["data"]] if command == "bench"
             else ["--split", exported["split"], "--bootstrap", "100"]))
    proc = cli(args, **kw)
    one_error(proc.returncode, proc.stderr, match=rf"cannot write {re.escape(str(out))}")
    assert "onnxruntime" in proc.stdout and "fp32" in proc.stdout  # the table came first
    assert not list(tmp_path.rglob("*.jsonl"))


@pytest.mark.parametrize("command", ["predict", "bundle extract", "data split", "eval", "report"])
@pytest.mark.parametrize("below", [False, True])
def test_a_file_where_an_output_folder_must_be(exported, tmp_path, capsys, command, below):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    out = afile / "sub" if below else afile
    image = next((exported["data"] / "benign").glob("*.png"))
    if command == "predict":
        args = ["predict", exported["onnx"], image, "--explain", out]
    elif command == "bundle extract":
        bundle = tmp_path / "sc.tar.gz"
        assert run_cli(["bundle", "create", "smallcnn", "--engines", exported["engines"], "--out", bundle,
                        "--results", tmp_path / "none"], capsys)[0] == 0
        args = ["bundle", "extract", bundle, "--to", out]
    elif command == "data split":
        args = ["data", "split", exported["data"], "--out", out / "s.json", "--group-by", "none"]
    elif command == "eval":
        args = ["eval", exported["onnx"], "--split", exported["split"], "--bootstrap", "100", "--out", out]
    else:
        results = tmp_path / "results"
        assert run_cli(["eval", exported["onnx"], "--split", exported["split"], "--bootstrap", "100",
                        "--out", results], capsys)[0] == 0
        args = ["report", "--results", results, "--out", out]
    code, _, err = run_cli(args, capsys)
    one_error(code, err, match=rf"{re.escape(str(afile))} exists and is not a folder$")
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("failure", ["read-only", "full disk"])
def test_bundle_write_error_names_the_bundle(exported, tmp_path, failure):
    kw = {}
    if failure == "read-only":
        out = unwritable_folder(tmp_path) / "sc.tar.gz"
    else:
        out, kw = tmp_path / "sc.tar.gz", {"preexec_fn": small_file_limit(1024)}
        out.write_bytes(b"the previous bundle")
    proc = cli(["bundle", "create", "smallcnn", "--engines", exported["engines"], "--out", out,
                "--results", tmp_path / "none"], **kw)
    one_error(proc.returncode, proc.stderr, match=rf"cannot write {re.escape(str(out))}: ")
    assert ".tmp" not in proc.stderr and not list(out.parent.glob(".*.tmp"))
    if failure == "full disk":
        assert out.read_bytes() == b"the previous bundle"


def test_export_write_error_names_the_file_not_the_staging_folder(exported, tmp_path):
    out = tmp_path / "engines"
    proc = cli(["export", "smallcnn", "--runs", exported["runs"], "--out", out, "--no-engine"],
               preexec_fn=small_file_limit(1024))
    target = out / "smallcnn" / "smallcnn.fp32.onnx"
    one_error(proc.returncode, proc.stderr, match=rf"cannot write {re.escape(str(target))}: ")
    assert "staging" not in proc.stderr and not (out / "smallcnn").exists()


def test_eval_of_a_folder_skips_unreadable_images_with_a_note(exported, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", CLASSES, per_class=2, size=SIZE, colour=True)
    (data / "benign" / "zero.png").write_bytes(b"")
    (data / "normal" / "text.png").write_text("not an image")
    code, _, err = run_cli(["eval", exported["onnx"], "--data", data, "--bootstrap", "100", "--out",
                            tmp_path / "results"], capsys)
    assert code == 0, err
    assert f"skipped {data / 'benign' / 'zero.png'}: empty file (0 bytes): an interrupted download or copy?" in err.splitlines()
    assert f"skipped {data / 'normal' / 'text.png'}: not an image file" in err.splitlines()
    row = json.loads(next((tmp_path / "results").glob("eval-*.jsonl")).read_text().splitlines()[0])
    assert len(row["images"]) == len(row["labels"]) == 6 and "2 unreadable skipped" in row["test_set"]
    for f in data.rglob("img*.png"):
        f.write_bytes(b"")
    code, _, err = run_cli(["eval", exported["onnx"], "--data", data, "--out", tmp_path / "results"], capsys)
    one_error(code, err, match=r"none of the test images could be read \(all 8 images of .*; first: .*empty file \(0 bytes\)")


def _nan_output(src: Path, dst: Path, foreign: bool = False) -> Path:
    """The exported ONNX with its output multiplied by NaN: a model broken in one layer (``foreign``:
    without lungedge's metadata, as another tool would write it)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    if foreign:
        del model.metadata_props[:]
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_pre" if o == out else o for o in node.output]
    model.graph.node.append(helper.make_node("Constant", [], ["nan_c"], value=helper.make_tensor(
        "nan_c", onnx.TensorProto.FLOAT, [], [float("nan")])))
    model.graph.node.append(helper.make_node("Mul", [f"{out}_pre", "nan_c"], [out]))
    onnx.save(model, str(dst))
    return dst


def test_eval_refuses_a_model_whose_output_is_nan(exported, tmp_path, capsys):
    onnx_file = _nan_output(exported["onnx"], tmp_path / "smallcnn.fp32.onnx")
    code, _, err = run_cli(["eval", onnx_file, "--split", exported["split"], "--data", exported["data"],
                            "--out", tmp_path / "res"], capsys)
    one_error(code, err, match=r"smallcnn\.fp32\.onnx \(onnxruntime fp32\): the model's output is NaN or infinite "
                               r"on \d+ of \d+ test images")
    assert not (tmp_path / "res").exists()


def test_export_refuses_a_source_whose_output_is_nan(exported, tmp_path, capsys):
    onnx_file = _nan_output(exported["onnx"], tmp_path / "broken.onnx", foreign=True)
    code, _, err = run_cli(["export", "broken", "--checkpoint", onnx_file, "--custom", "--classes", ",".join(CLASSES),
                            "--out", tmp_path / "e", "--no-engine"], capsys)
    one_error(code, err, match=r"broken\.onnx: the model's own output is NaN or infinite on 32 of 32 random-pixel")
    assert not (tmp_path / "e" / "broken").exists()


# -- 4. eval checks the manifest's hashes ----------------------------------------------------------------------

def test_eval_refuses_images_changed_since_the_split(exported, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(exported["data"], data)
    manifest = exported["manifest"]
    test_item = next(it for it in manifest["items"] if it["split"] == "test")
    from PIL import Image

    Image.new("RGB", (SIZE, SIZE), (255, 0, 0)).save(data / test_item["path"])
    code, _, err = run_cli(["eval", exported["onnx"], "--split", exported["split"], "--data", data,
                            "--out", tmp_path / "res"], capsys)
    one_error(code, err, match=r"images changed since the split")


# -- report rows ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, pattern", [
    ({"kind": "bench", "model": "m", "backend": "onnxruntime", "device": "cpu", "variant": "fp32",
      "artifact_sha256": "0" * 64, "preprocessing": False, "latency_ms": {}}, r"row 1: batch_size: Field required"),
    ({"kind": "eval", "model": "m", "backend": "onnxruntime", "device": "cpu", "variant": "fp32",
      "artifact_sha256": "0" * 64, "classes": ["a", "b"], "metrics": {}},
     r"row 1: metrics\.confusion_matrix: Field required"),
    ({"kind": "eval", "model": "m"}, r"row 1: backend: Field required \(and \d+ more problems\)"),
])
def test_report_rows_missing_fields(tmp_path, capsys, row, pattern):
    res = tmp_path / "results.jsonl"
    res.write_text(json.dumps(row) + "\n")
    code, _, err = run_cli(["report", "--results", res, "--out", tmp_path / "rep"], capsys)
    one_error(code, err, match=rf"{re.escape(str(res))} {pattern}")


_EVAL_ROW = {"format": "lungedge-result/1", "kind": "eval", "model": "m", "backend": "onnxruntime", "device": "cpu",
             "variant": "fp32", "artifact_sha256": "0" * 64, "classes": ["a", "b"],
             "metrics": {"n": 2, "accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5,
                         "confusion_matrix": [[1, 0], [1, 0]], "sensitivity": {"a": 1.0, "b": 0.0}}}
_BENCH_ROW = {**{k: _EVAL_ROW[k] for k in ("format", "model", "backend", "device", "variant", "artifact_sha256")},
              "kind": "bench", "batch_size": 1, "preprocessing": False, "latency_ms": {"p50": 2.0, "p99": 3.0}}


@pytest.mark.parametrize("path, value, pattern", [
    (("metrics", "balanced_accuracy"), "high", r"metrics\.balanced_accuracy: Input should be a valid number"),
    (("metrics", "balanced_accuracy"), 7.5, r"metrics\.balanced_accuracy: 7\.5 is not a number from 0 to 1"),
    (("metrics", "sensitivity"), {"a": -0.1}, r"metrics\.sensitivity: -0\.1 is not a number from 0 to 1"),
    (("format",), "lungedge-result/9", r"format: 'lungedge-result/9' is not 'lungedge-result/1'"),
    (("latency_ms", "p50"), -1, r"latency_ms\.p50: Input should be greater than 0"),
    (("latency_ms", "p99"), float("inf"), r"latency_ms\.p99: Input should be a finite number"),
])
def test_report_rows_with_values_out_of_range(tmp_path, capsys, path, value, pattern):
    row = copy.deepcopy(_BENCH_ROW if path[0] == "latency_ms" else _EVAL_ROW)
    *parents, key = path
    target = row
    for p in parents:
        target = target[p]
    target[key] = value
    res = tmp_path / "results.jsonl"
    res.write_text(json.dumps(row) + "\n")  # json writes inf as Infinity, which Python's reader takes
    code, _, err = run_cli(["report", "--results", res, "--out", tmp_path / "rep"], capsys)
    one_error(code, err, match=rf"{re.escape(str(res))} row 1: {pattern}")
    assert not (tmp_path / "rep").exists()


def test_a_valid_row_of_each_kind_makes_a_report(tmp_path, capsys):
    res = tmp_path / "results.jsonl"
    res.write_text(json.dumps(_EVAL_ROW) + "\n" + json.dumps(_BENCH_ROW) + "\n")
    code, _, err = run_cli(["report", "--results", res, "--out", tmp_path / "rep"], capsys)
    assert code == 0, err


# -- 3. export sets: locked, staged, never mixed ---------------------------------------------------------------

def _set_digest(folder: Path) -> dict:
    from lungedge.io import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_reexport_names_the_precisions_it_removes(exported, tmp_path, capsys):
    import shutil

    engines = tmp_path / "engines"
    shutil.copytree(exported["folder"], engines / "smallcnn")  # an FP32 + FP16 set
    code, out, err = run_cli(["export", "smallcnn", "--runs", exported["runs"], "--out", engines, "--no-engine"],
                             capsys)
    assert code == 0, err
    assert sorted(p.name for p in (engines / "smallcnn").iterdir()) == ["smallcnn.export.json", "smallcnn.fp32.onnx"]
    assert re.search(rf"^note: {re.escape(str(engines / 'smallcnn'))} was replaced by the new set; removed 1 file of "
                     r"the previous set that it does not have: smallcnn\.fp16\.onnx$", out, re.M), out


def test_bundle_refuses_onnx_files_of_two_exports(exported, tmp_path, capsys):
    import shutil

    engines = tmp_path / "engines"
    shutil.copytree(exported["folder"], engines / "smallcnn")
    summary_file = engines / "smallcnn" / "smallcnn.export.json"
    summary = json.loads(summary_file.read_text())
    summary["files"] = {v: str(engines / "smallcnn" / Path(f).name) for v, f in summary["files"].items()}
    summary_file.write_text(json.dumps(summary))
    fp16 = engines / "smallcnn" / "smallcnn.fp16.onnx"
    prep = json.dumps({"size": 40, "mean": [0.5] * 3, "std": [0.5] * 3, "scale": 1 / 255, "channel_order": "RGB",
                       "layout": "NCHW", "resize": "center-crop-bilinear"})
    _tampered(fp16, fp16, source_sha256="f" * 64, preprocessing=prep)  # as if left by another export
    code, _, err = run_cli(["bundle", "create", "smallcnn", "--engines", engines, "--out", tmp_path / "b.tar.gz",
                            "--results", tmp_path / "none"], capsys)
    one_error(code, err, match=r"smallcnn\.fp16\.onnx is not from the same export as .*fp32\.onnx .*at 40 px")
    assert not (tmp_path / "b.tar.gz").exists()


def test_export_into_a_folder_being_written_refuses(exported, tmp_path):
    folder = exported["folder"]
    before = _set_digest(folder)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from lungedge.io import FolderLock; "
                               f"FolderLock({str(folder)!r}, 'lungedge export').acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = cli(["export", "smallcnn", "--runs", exported["runs"], "--out", exported["engines"], "--no-engine"])
        one_error(proc.returncode, proc.stderr, match=rf"{re.escape(str(folder))} is being written by pid "
                                                      rf"{holder.pid} on .*lungedge export")
    finally:
        holder.kill()
        holder.wait()
    assert _set_digest(folder) == before


def test_export_killed_mid_way_leaves_the_previous_set(exported):
    folder, engines = exported["folder"], exported["engines"]
    before = _set_digest(folder)
    proc = subprocess.Popen([sys.executable, "-m", "lungedge", "export", "smallcnn", "--runs", str(exported["runs"]),
                             "--out", str(engines), "--fp16", "--no-engine"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(any(s.iterdir()) for s in engines.glob(".smallcnn.staging-*")):  # first file being written
        assert proc.poll() is None and time.time() < deadline, "export ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _set_digest(folder) == before  # the previous complete set, untouched
    done = cli(["export", "smallcnn", "--runs", exported["runs"], "--out", engines, "--fp16", "--no-engine"])
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in engines.iterdir()) == ["smallcnn"]  # the killed run's stage and lock are gone
    assert sorted(_set_digest(folder)) == sorted(before)
    from lungedge import onnx_meta

    shas = {onnx_meta.read(p)["source_sha256"] for p in folder.glob("*.onnx")}
    assert len(shas) == 1


def test_explain_that_fails_half_way_leaves_the_folder_as_it_was(exported, same_names, tmp_path, capsys):
    """The overlays of one predict --explain are one set: a disk that fills after the first overlays used to
    leave those (a part of the set, beside any older overlays); now none of this run's overlays is left."""
    code, out, err = run_cli(["predict", exported["onnx"], *same_names, "--explain", tmp_path / "all", "--json"],
                             capsys)
    assert code == 0, err
    sizes = {p["image"]: Path(p["overlay"]).stat().st_size for p in json.loads(out)["predictions"]}
    order = sorted(same_names, key=lambda p: sizes[str(p)])  # the smallest first: it fits, a later one does not
    assert sizes[str(order[0])] < sizes[str(order[-1])]
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "mine.txt").write_text("kept")
    proc = cli(["predict", exported["onnx"], *order, "--explain", maps],
               preexec_fn=small_file_limit((sizes[str(order[0])] + sizes[str(order[-1])]) // 2))
    one_error(proc.returncode, proc.stderr, match=rf"cannot write {re.escape(str(maps))}/img05")
    assert [p.name for p in maps.iterdir()] == ["mine.txt"]


def test_a_second_explain_into_the_same_folder_is_refused(exported, same_names, tmp_path, capsys):
    from lungedge.io import FolderLock

    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / ".img05.Benign.occlusion.png.x1y2.tmp").write_bytes(b"half")  # what a killed run left
    with FolderLock(maps, "lungedge predict --explain"):
        code, _, err = run_cli(["predict", exported["onnx"], *same_names, "--explain", maps], capsys)
    one_error(code, err, match="is being written by pid")
    code, _, err = run_cli(["predict", exported["onnx"], *same_names, "--explain", maps], capsys)
    assert code == 0, err
    assert len(list(maps.iterdir())) == 3 and not [p for p in maps.iterdir() if p.name.startswith(".")]


def test_explain_again_replaces_an_images_overlay_under_another_class(exported, same_names, tmp_path, capsys):
    """An overlay is named by the class predicted: a second --explain into the folder (a retrained model, another
    precision) that predicts another class for an image left the first one's overlay beside the new one, two
    answers for one image. Now the image's overlay under another class of the model goes with the new set."""
    maps = tmp_path / "maps"
    maps.mkdir()
    stems = ["img05", "img05-2", "img05-3"]
    earlier = [maps / f"{stem}.{c}.occlusion.png" for stem in stems for c in CLASSES]
    for f in earlier:  # an earlier run's overlays, every class among them
        f.write_bytes(b"earlier")
    mine = [maps / "img05.gradcam.png", maps / "img05.unknown.occlusion.png", maps / "other.benign.occlusion.png"]
    for f in mine:
        f.write_bytes(b"mine")
    code, out, err = run_cli(["predict", exported["onnx"], *same_names, "--explain", maps, "--json"], capsys)
    assert code == 0, err
    overlays = {Path(p["overlay"]) for p in json.loads(out)["predictions"]}
    assert len(overlays) == 3 and all(f.read_bytes() != b"earlier" for f in overlays)
    assert set(maps.iterdir()) == overlays | set(mine)  # one overlay per image; the user's files stay


# -- option sweep: hostile values, option by option -----------------------------------------------------------

@pytest.mark.parametrize("args, pattern", [
    (["mlp", "train", "--steps", "abc"], r"Invalid value for '--steps'.*\(see 'lungedge mlp train --help'\)"),
    (["train", "smallcnn", "--epochs", "1.5"], r"Invalid value for '--epochs'.*\(see 'lungedge train --help'\)"),
    (["bench", "--warmup", ""], r"Invalid value for '--warmup'"),
    (["data", "split", "nowhere"], r"Missing option '--out'.*\(see 'lungedge data split --help'\)"),
    (["bench", "--bogus"], r"No such option: --bogus"),
    (["engine", "build"], r"Missing argument 'FILE\.onnx'"),
])
def test_a_value_that_does_not_parse_is_one_error_line(capsys, args, pattern):
    """A usage error was click's three lines (usage, hint, ``Error: ...``) with no ``error:`` line."""
    code, out, err = run_cli(args, capsys)
    one_error(code, err, match=pattern)
    assert "Usage:" not in err + out and len(err.strip().splitlines()) == 1, err


def test_a_command_group_without_a_command_still_shows_its_help(capsys):
    code, out, err = run_cli(["mlp"], capsys)
    assert "Usage:" in out + err and "train" in out + err


@pytest.mark.parametrize("command", [["mlp", "export", "--out"], ["mlp", "train", "--steps", "2", "--save-weights"],
                                     ["mlp", "demo", "--save-weights"]])
def test_an_output_that_is_a_pipe_or_device_is_refused_not_replaced(tmp_path, capsys, command):
    """The write through a temporary file renamed over ``--out /dev/null`` replaced the device itself with a
    regular file (as root: /dev/null gone for every program). A FIFO here stands for the device."""
    import stat

    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    link = tmp_path / "link.json"
    link.symlink_to(fifo)
    for target in (fifo, link):
        code, _, err = run_cli([*command, target], capsys)
        one_error(code, err, match=rf"cannot write {re.escape(str(target))}: it is a pipe, not a file")
        assert stat.S_ISFIFO(os.stat(target).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "out.json"]  # no temporary left


def test_atomic_writes_refuse_a_device_and_leave_no_temporary(tmp_path):
    from lungedge.io import WriteError, atomic_write_bytes, publish_file, written_together

    fifo = tmp_path / "report.md"
    os.mkfifo(fifo)
    with pytest.raises(WriteError, match="it is a pipe, not a file"):
        atomic_write_bytes(fifo, b"x")
    tmp = tmp_path / ".report.md.1.tmp"
    tmp.write_bytes(b"x")
    with pytest.raises(WriteError, match="it is a pipe"):
        publish_file(tmp, fifo)
    with pytest.raises(WriteError, match="it is a pipe"):
        with written_together():
            atomic_write_bytes(tmp_path / "a.png", b"png")
            atomic_write_bytes(fifo, b"md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


@pytest.mark.parametrize("command", [["mlp", "demo"], ["mlp", "train", "--steps", "2"],
                                     ["mlp", "export", "--out", "x.onnx"]])
def test_mlp_negative_seed_is_refused(tmp_path, capsys, command):
    code, _, err = run_cli([*command, "--seed", "-1"], capsys)  # was numpy's ValueError: exit 3
    one_error(code, err, match=r"--seed must be a whole number from 0 to 4294967295, got -1")
    assert not (tmp_path / "x.onnx").exists()


def test_mlp_steps_are_bounded(capsys):
    code, _, err = run_cli(["mlp", "train", "--steps", str(10 ** 12)], capsys)  # ran for days, a loss per step
    one_error(code, err, match=r"steps must be at most 1,000,000, got 1,000,000,000,000")


@pytest.mark.parametrize("args, pattern", [
    (["--iters", str(10 ** 12)], r"--iters must be from 1 to 1,000,000, got 1000000000000"),
    (["--iters", "0"], r"--iters must be from 1 to 1,000,000, got 0"),
    (["--warmup", str(10 ** 12)], r"--warmup must be from 0 to 10,000, got 1000000000000"),
    (["--warmup", "-1"], r"--warmup must be from 0 to 10,000, got -1"),
    (["--batch-sizes", "1000000"], r"--batch-sizes must be at most 4,096, got '1000000'"),
])
def test_bench_counts_are_bounded(tmp_path, capsys, args, pattern):
    """Each of these ran until killed (10**12 calls; a batch of 10**6 images loaded at once)."""
    code, _, err = run_cli(["bench", tmp_path / "m.onnx", *args, "--out", tmp_path / "res"], capsys)
    one_error(code, err, match=pattern)
    assert not (tmp_path / "res").exists()


def test_bench_measures_a_repeated_batch_size_once(exported, tmp_path, capsys):
    code, _, err = run_cli(["bench", exported["onnx"], "--backend", "onnxruntime", "--batch-sizes", "2,,2",
                            "--iters", "3", "--warmup", "0", "--no-preprocessing", "--out", tmp_path], capsys)
    assert code == 0, err
    rows = [json.loads(line) for f in tmp_path.glob("bench-*.jsonl") for line in f.read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [2]


@pytest.mark.parametrize("args", [
    ["data", "split", "nowhere", "--out", "s.json", "--seed", "-1"],  # was numpy's ValueError: exit 3
    ["train", "smallcnn", "--split", "nowhere.json", "--seed", "-1"],
    ["train", "smallcnn", "--split", "nowhere.json", "--seed", str(2 ** 64)],
    ["cv", "smallcnn", "--data", "nowhere", "--seed", "-1"],
])
def test_seeds_must_be_whole_numbers_numpy_and_torch_take(tmp_path, capsys, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([*args, "--out" if args[0] != "data" else "--json", *(["o"] if args[0] != "data" else [])],
                           capsys)
    one_error(code, err, match=r"--seed must be a whole number from 0 to 4294967295, got ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("threads", ["0", "-1", str(10 ** 12)])
@pytest.mark.parametrize("command", [["bench", "m.onnx"], ["eval", "m.onnx"],
                                     ["train", "smallcnn", "--split", "nowhere.json"],
                                     ["finetune", "nowhere.pth"], ["cv", "smallcnn", "--data", "nowhere"]])
def test_threads_must_be_from_1_to_1024(tmp_path, capsys, monkeypatch, command, threads):
    """0 and -1 were taken silently (each library reads them its own way); 10**12 was an internal error in eval."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([*command, "--threads", threads], capsys)
    one_error(code, err, match=rf"--threads must be a whole number from 1 to 1024, got {threads}")


def test_eval_bootstrap_is_bounded(tmp_path, capsys):
    code, _, err = run_cli(["eval", tmp_path / "m.onnx", "--bootstrap", str(10 ** 8)], capsys)  # ran until killed
    one_error(code, err, match=r"--bootstrap must be from 100 to 100,000, got 100000000")


@pytest.mark.parametrize("args, pattern", [
    (["engine", "build", "m.onnx", "--max-batch", str(10 ** 12)], r"--max-batch must be at most 4,096"),
    (["engine", "build", "m.onnx", "--max-batch", "4", "--opt-batch", "9"],
     r"--opt-batch must be between 1 and --max-batch \(4\), got 9"),
    (["engine", "build", "m.onnx", "--workspace-gib", "nan"], r"--workspace-gib must be a finite number greater"),
    (["engine", "build", "m.onnx", "--workspace-gib", "-1"], r"--workspace-gib must be a finite number greater"),
    (["export", "smallcnn", "--max-batch", str(10 ** 12)], r"--max-batch must be at most 4,096"),
    (["export", "smallcnn", "--calib-size", "-1"], r"--calib-size must be at least 1, got -1"),  # without --int8
    (["export", "smallcnn", "--classes", "A,A,B"], r"--classes names 'A' more than once, got 'A,A,B'"),
    (["export", "smallcnn", "--classes", "A,,B"], r"--classes has an empty name"),
    (["export", "smallcnn", "--input-size", "7"], r"--input-size must be a whole number of pixels from 8 to"),
])
def test_export_and_engine_options_are_checked_first(tmp_path, capsys, monkeypatch, args, pattern):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([*args, "--out", "o"], capsys)
    one_error(code, err, match=pattern)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["--scale", "nan"], ["--classes", "a,b,c"], ["--output", "logits", "--layout", "NHWC"]])
def test_export_of_a_lungedge_checkpoint_refuses_options_for_foreign_files(exported, tmp_path, capsys, args):
    """These were ignored without a word: ``--scale nan`` exported the run's own scale, exit 0."""
    code, _, err = run_cli(["export", "smallcnn", "--runs", exported["runs"], "--out", tmp_path / "e", "--no-engine",
                            *args], capsys)
    one_error(code, err, match=r"runs/smallcnn/r/best\.pth is a lungedge checkpoint and records its own classes")
    assert not (tmp_path / "e" / "smallcnn").exists()


def test_export_of_a_foreign_onnx_refuses_a_nan_mean(exported, tmp_path, capsys):
    """``--mean nan`` reached the model and the error blamed the model's own output."""
    import onnx

    plain = tmp_path / "plain.onnx"
    model = onnx.load(str(exported["onnx"]))
    del model.metadata_props[:]
    onnx.save(model, str(plain))
    code, _, err = run_cli(["export", "mine", "--custom", "--checkpoint", plain, "--classes", ",".join(CLASSES),
                            "--mean", "nan", "--out", tmp_path / "e", "--no-engine", "--data", exported["data"]], capsys)
    one_error(code, err, match=r"--mean values must be finite numbers, got 'nan'")


@pytest.mark.parametrize("args, pattern", [
    (["--backend", "onnxruntime,openvino"], r"predict takes one --backend, got 'onnxruntime,openvino'"),
    (["--precision", "fp32,int8"], r"predict takes one --precision, got 'fp32,int8'"),
    (["--method", "bogus"], r"unknown saliency method 'bogus' \(choose from auto, gradcam, occlusion\)"),
])
def test_predict_refuses_what_it_used_to_drop(exported, capsys, args, pattern):
    """A second backend or precision was dropped (the first used, exit 0); --method was read only with --explain."""
    code, out, err = run_cli(["predict", exported["onnx"], exported["data"] / "benign" / "img000_0.png", *args],
                             capsys)
    one_error(code, err, match=pattern)
    assert out == ""


@pytest.mark.parametrize("env, pattern", [
    ({"RANK": "abc"}, r"RANK \(set by torchrun\) must be a whole number of at least 0, got 'abc'"),  # exit 3
    ({"RANK": "1"}, r"RANK \(set by torchrun\) must be less than WORLD_SIZE \(1\), got 1"),  # exit 3
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE \(set by torchrun\) must be a whole number of at least 1, got '0'"),  # exit 3
    ({"WORLD_SIZE": "abc"}, r"WORLD_SIZE .* got 'abc'"),  # was taken as 1
    ({"LOCAL_RANK": "-1"}, r"LOCAL_RANK .* got '-1'"),
])
def test_torchrun_variables_are_checked(small, tmp_path, capsys, monkeypatch, env, pattern):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(["train", "smallcnn", "--split", small["split"], "--epochs", "1", "--weights", "none",
                            "--image-size", SIZE, "--out", tmp_path / "runs"], capsys)
    one_error(code, err, match=pattern)
    assert not (tmp_path / "runs").exists()


def test_world_size_without_torchrun_is_one_line(small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # torch.distributed's ValueError (no RANK, MASTER_ADDR) was exit 3
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run_cli(["train", "smallcnn", "--split", small["split"], "--epochs", "1", "--weights", "none",
                            "--out", tmp_path / "runs"], capsys)
    one_error(code, err, match=r"WORLD_SIZE=2 without RANK, MASTER_ADDR, MASTER_PORT: start distributed training "
                               r"with torchrun")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, pattern", [
    (["--mode", "finetune", "--unfreeze", "abc"], r"--unfreeze must be a number of blocks or 'all', got 'abc'"),  # 3
    (["--unfreeze", "1.5"], r"--unfreeze must be a number of blocks or 'all', got '1\.5'"),  # was ignored
    (["--epochs", str(10 ** 12)], r"--epochs must be at most 10,000"),  # trained until killed
    (["--batch-size", str(10 ** 12)], r"--batch-size must be at most 4,096"),
    (["--run-name", "a\nb"], r"--run-name must be a plain folder name \(printable"),
    (["--run-name", "x\u202egnp.exe"], r"--run-name must be a plain folder name \(printable"),
    (["--patience", "-1"], r"--patience must be 0 \(off\) or more epochs, got -1"),  # was taken
    (["--group-by", "nearest"], r"unknown --group-by 'nearest' \(choose from"),  # was ignored with --split
])
def test_more_train_options_are_checked(small, tmp_path, capsys, args, pattern):
    code, _, err = run_cli(["train", "smallcnn", "--split", small["split"], "--epochs", "1", "--weights", "none",
                            "--out", tmp_path / "runs", *args], capsys)
    one_error(code, err, match=pattern)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, pattern", [
    (["--lr", "nan"], r"--lr must be a finite number greater than 0, got nan"),  # was exit 3 writing the settings
    (["--lr", "inf"], r"--lr must be a finite number greater than 0, got inf"),
    (["--repeats", str(10 ** 12)], r"--repeats must be from 1 to 100, got 1000000000000"),  # ran until killed
    (["--epochs", "0"], r"--epochs must be a whole number greater than 0"),
])
def test_cv_options_are_checked_before_any_fold(small, tmp_path, capsys, args, pattern):
    code, _, err = run_cli(["cv", "smallcnn", "--data", small["data"], "--folds", "2", "--weights", "none",
                            "--out", tmp_path / "cv", *args], capsys)
    one_error(code, err, match=pattern)
    assert not (tmp_path / "cv").exists()


@pytest.mark.parametrize("args, name", [
    (["report", "--results", "", "--out", "rep"], "--results"),  # read every result under the current folder
    (["demo", "--data", "", "--out", "d"], "--data"),  # trained on the current folder
    (["bench", "m.onnx", "--out="], "--out"),
    (["train", "smallcnn", "--split", ""], "--split"),
    (["data", "inspect", ""], "FOLDER"),
    (["predict", "m.onnx", "a.png", ""], "IMAGES"),
    (["engine", "build", ""], "FILE.onnx"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch, args, name):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(args, capsys)
    one_error(code, err, match=rf"^error: {re.escape(name)} is an empty path \(an unset variable\?\)")
    assert list(tmp_path.iterdir()) == []
