"""Training each architecture for one epoch on tiny images, reloading, resume, finetune, bad splits."""

from __future__ import annotations

import json
from pathlib import Path

import torch  # torch and torchvision before anything imports tensorflow
import torchvision  # noqa: F401
import numpy as np
import pytest

from conftest import TRAIN_CLASSES as CLASSES, TRAIN_SIZES as SIZES, one_error, run_cli, write_dataset
from lungedge.models.checkpoint import load_checkpoint, read_meta
from lungedge.preprocess import Preprocessing

# keras.fit on NumPy arrays, numpy 2: noise, not our code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tiny") / "data", CLASSES, per_class=12, size=64, colour=True)


def _logits(model, meta, x):
    if meta["framework"] == "keras":
        return np.asarray(model.predict(x, verbose=0))
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _cross_entropy(logits, y):
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["googlenet", "densenet121", "inception_v3", "resnet50"])
def test_one_epoch_then_reload(name, trained_run):
    run = trained_run(name)  # lungedge train NAME --epochs 1 --json on tiny images (shared with the export tests)
    out, err = trained_run.output(name)
    summary = json.loads(out)
    ext = ".h5" if name == "resnet50" else ".pth"
    for f in (f"best{ext}", f"last{ext}", "metrics.json", "split.json", "config.json"):
        assert (run / f).is_file(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["history"]) == 1
    assert np.asarray(metrics["test"]["confusion_matrix"]).shape == (3, 3)
    assert "epoch 1:" in err  # one line per epoch on stderr

    model, meta = load_checkpoint(run / f"best{ext}")
    assert meta["architecture"] == name and meta["classes"] == CLASSES and meta["epoch"] == 1
    assert meta["input_size"] == SIZES[name] and meta["split_fingerprint"] == summary["split"]["fingerprint"]
    assert len(meta["history"]) == 1 and meta["versions"]["lungedge"]
    # the checkpoint plus its own preprocessing metadata reproduce the training-time validation outputs
    prep = Preprocessing.from_dict(meta["preprocessing"])
    split = json.loads((run / "split.json").read_text())
    root = Path(split["dataset"]["root"])
    val = [it for it in split["items"] if it["split"] == "val"]
    x = prep.load_batch([root / it["path"] for it in val])
    y = np.array([CLASSES.index(it["label"]) for it in val])
    logits = _logits(model, meta, x)
    again, _ = load_checkpoint(run / f"best{ext}")
    assert np.array_equal(logits, _logits(again, meta, x))
    assert _cross_entropy(logits, y) == pytest.approx(metrics["history"][0]["val_loss"], rel=1e-4, abs=1e-5)
    if name == "resnet50":
        assert prep.layout == "NHWC" and prep.channel_order == "BGR"


def test_resume_ends_where_an_uninterrupted_run_ends(tiny, tmp_path):
    from lungedge.train import TrainConfig, train

    base = dict(model="smallcnn", data=str(tiny), epochs=3, batch_size=8, image_size=32, weights="none",
                out=str(tmp_path), seed=3, threads=2)
    full = train(TrainConfig(**base, run_name="a"))
    part = train(TrainConfig(**base, run_name="b"), stop_after=1)
    assert part["status"] == "interrupted" and len(part["history"]) == 1
    resumed = train(TrainConfig(**base, run_name="b"), resume=True)
    assert resumed["status"] == "finished" and len(resumed["history"]) == 3
    a = torch.load(tmp_path / "smallcnn" / "a" / "last.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "smallcnn" / "b" / "last.pth", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6)
    assert [h["val_loss"] for h in full["history"]] == pytest.approx([h["val_loss"] for h in resumed["history"]], rel=1e-5)


def test_config_json_is_checked_against_the_one_list_of_training_fields(tmp_path):
    """TrainConfig is the only list of a run's fields: the check of a stored config.json takes each field's
    type, default and constraints from it, so an option added to the dataclass alone is checked too."""
    import dataclasses
    import re

    from lungedge.errors import LungedgeError
    from lungedge.train import common
    from lungedge.validation import validate

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"format": common.RUN_FORMAT, "model": "smallcnn", "someday": 1}))
    assert common.load_config(tmp_path) == common.TrainConfig(model="smallcnn")  # the defaults; extra keys pass
    for field, value, problem in [("threads", 0, "greater than or equal to 1"),
                                  ("warmup_epochs", -1, "greater than or equal to 0"),
                                  ("augment", "yes", "a valid boolean"), ("val", float("nan"), "a finite number")]:
        path.write_text(json.dumps({"model": "smallcnn", field: value}))
        with pytest.raises(LungedgeError, match=rf"^{re.escape(str(path))}: {field}: Input should be {problem}"):
            common.load_config(tmp_path)

    @dataclasses.dataclass
    class Newer(common.TrainConfig):  # a training option added in one place only
        crop: float = common._checked(0.875, gt=0, le=1, strict=True, allow_inf_nan=False)

    validate(Newer, {"model": "smallcnn", "crop": 0.5}, path)
    with pytest.raises(LungedgeError, match=r"config\.json: crop: Input should be less than or equal to 1$"):
        validate(Newer, {"model": "smallcnn", "crop": 2}, path)
    with pytest.raises(LungedgeError, match=r"config\.json: epochs: Input should be a valid integer"):
        validate(Newer, {"model": "smallcnn", "epochs": "many"}, path)


def _disk_full_at(monkeypatch, name: str, nth: int) -> None:
    """The disk fills up at the ``nth`` write of ``name``: ``os.fsync``, which every atomic write of lungedge.io
    calls on its temporary file (``.NAME.*``) before naming it, fails there with ENOSPC."""
    import errno
    import os

    real, seen = os.fsync, []

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            seen.append(fd)
            if len(seen) == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_restarted_run_removes_a_killed_keras_writes_temporaries_only(tiny, tmp_path, capsys):
    """A run killed while the Keras trainer wrote best.h5/last.h5 leaves .best.XXXXXXXX.h5 temporaries; the
    next run in that folder removes them, and no file of another name."""
    run = tmp_path / "smallcnn" / "again"
    run.mkdir(parents=True)
    leftovers = [".best.k3j_x9a2.h5", ".last.00ab_zz9.h5", ".metrics.json.abc123.tmp"]
    kept = ["notes.h5", ".best.mine.h5"]
    for name in leftovers + kept:
        (run / name).write_text("x")
    code, out, err = run_cli(["train", "smallcnn", "--data", tiny, "--epochs", 1, "--batch-size", 8, "--image-size",
                              32, "--weights", "none", "--threads", 2, "--out", tmp_path, "--run-name", "again",
                              "--json"], capsys)
    assert code == 0, err
    assert not any((run / name).exists() for name in leftovers)
    assert all((run / name).read_text() == "x" for name in kept)
    assert (run / "best.pth").is_file()


def test_runs_started_in_the_same_second_get_their_own_default_names(tiny, tmp_path, capsys, monkeypatch):
    """Without --run-name the name is the start time; a second run started in that second (the clock held
    still here) gets "-2" instead of a refusal, and names claimed at once by many are all different."""
    import threading

    from lungedge.train import common

    monkeypatch.setattr(common, "default_run_name", lambda cfg: f"20250101-120000-s{cfg.seed}")
    args = ["train", "smallcnn", "--data", tiny, "--epochs", 1, "--batch-size", 8, "--image-size", 32, "--weights",
            "none", "--threads", 2, "--out", tmp_path, "--json"]
    for name in ("20250101-120000-s0", "20250101-120000-s0-2"):
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        assert (tmp_path / "smallcnn" / name / "best.pth").is_file()
    names, start = [], threading.Barrier(8)

    def claim():
        start.wait()
        names.append(common.claim_run_name(common.TrainConfig(model="smallcnn", out=str(tmp_path), seed=1)))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == sorted(["20250101-120000-s1"] + [f"20250101-120000-s1-{n}" for n in range(2, 9)])
    assert all((tmp_path / "smallcnn" / n).is_dir() for n in names)


def test_a_failed_write_at_an_epoch_end_keeps_the_previous_epoch_whole(tiny, tmp_path, capsys, monkeypatch):
    """Full disk while epoch 2's files are written (last.pth, after best.pth): none of epoch 2's files replaces
    epoch 1's; one line names the file and says how to go on; --resume then ends where an uninterrupted run ends."""
    import re

    args = ["train", "smallcnn", "--data", tiny, "--epochs", 2, "--batch-size", 8, "--image-size", 32, "--weights",
            "none", "--seed", 3, "--threads", 2, "--out", tmp_path, "--json"]
    code, out, err = run_cli([*args, "--run-name", "full"], capsys)
    assert code == 0, err
    full = json.loads(out)
    assert full["history"][1]["best"]  # epoch 2 is the best: it writes best.pth before last.pth
    run = tmp_path / "smallcnn" / "cut"
    with monkeypatch.context() as m:
        _disk_full_at(m, "last.pth", 2)
        code, out, err = run_cli([*args, "--run-name", "cut"], capsys)
    one_error(code, err, rf"^error: cannot write {re.escape(str(run / 'last.pth'))}: No space left on device; "
                          rf"{re.escape(str(run))} keeps its last finished epoch; continue with 'lungedge train "
                          rf"smallcnn --out .* --run-name cut --resume'$")
    last = torch.load(run / "last.pth", weights_only=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert last["train_state"]["epoch"] == 1 and last["train_state"]["best"]["epoch"] == 1
    assert read_meta(run / "best.pth")["epoch"] == 1  # not epoch 2's, which last.pth and metrics.json do not know
    assert metrics["status"] == "running" and len(metrics["history"]) == 1 and metrics["best"]["epoch"] == 1
    assert not list(run.glob(".*.tmp"))

    code, out, err = run_cli(["train", "smallcnn", "--out", tmp_path, "--run-name", "cut", "--resume", "--json"],
                             capsys)
    assert code == 0, err
    resumed = json.loads(out)
    assert resumed["status"] == "finished" and resumed["best"] == full["best"]
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx([h["val_loss"] for h in full["history"]],
                                                                       rel=1e-5)
    a = torch.load(tmp_path / "smallcnn" / "full" / "best.pth", weights_only=True)["state_dict"]
    b = torch.load(run / "best.pth", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6)


def test_a_run_killed_between_its_epoch_files_renames_resumes_from_the_new_epoch(tiny, tmp_path):
    """SIGKILL while epoch 2's best.pth/last.pth/metrics.json take their names (after the first rename): the
    folder is half epoch 2, half epoch 1. --resume completes epoch 2's set from its journal first: it does not
    train epoch 2 again, best.pth is the model metrics.json names, and no temporary or journal is left."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    from lungedge.train import train
    from lungedge.train.common import TrainConfig

    run = tmp_path / "smallcnn" / "killed"
    cfg = dict(model="smallcnn", data=str(tiny), epochs=2, batch_size=8, image_size=32, weights="none", seed=3,
               threads=1, out=str(tmp_path), run_name="killed")
    code = textwrap.dedent(f"""
        import os, signal
        import torch
        import lungedge.io as io
        from lungedge.train import train
        from lungedge.train.common import TrainConfig

        commits = []
        def stop(index, tmp, path):  # the renaming loop's hook: the kill lands between two renames
            if index == 0:
                commits.append(path)
            if len(commits) == 2 and index == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        io._renaming = stop
        train(TrainConfig(**{cfg!r}), show_progress=False)
    """)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / ".lungedge-publish.json").is_file() and list(run.glob(".*.tmp"))  # half renamed, as a kill leaves it
    assert json.loads((run / "metrics.json").read_text())["history"][-1]["epoch"] == 1  # still epoch 1's

    retrained = []
    summary = train(TrainConfig(**{**cfg, "data": None}), resume=True, show_progress=False,
                    on_epoch=retrained.append)
    assert retrained == []  # epoch 2's set was completed, not trained again
    metrics = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == metrics["status"] == "finished" and len(metrics["history"]) == 2
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["train_state"]["epoch"] == 2 and last["train_state"]["best"] == metrics["best"]
    assert read_meta(run / "best.pth")["epoch"] == metrics["best"]["epoch"]
    assert not list(run.glob(".*.tmp")) and not (run / ".lungedge-publish.json").exists()


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    code, _, err = run_cli(["train", "smallcnn", "--resume", "--out", tmp_path], capsys)
    assert code == 2 and "no interrupted run of smallcnn" in err
    code, _, err = run_cli(["train", "smallcnn", "--resume", "--out", tmp_path, "--run-name", "typo"], capsys)
    assert code == 2 and f"cannot resume --run-name typo: {tmp_path / 'smallcnn' / 'typo'} does not exist" in err
    (tmp_path / "smallcnn" / "empty").mkdir(parents=True)
    code, _, err = run_cli(["train", "smallcnn", "--resume", "--out", tmp_path, "--run-name", "empty"], capsys)
    assert code == 2 and "empty has no finished epoch to resume from" in err


def test_finetune_unfreezes_more_at_a_lower_rate(tiny, tmp_path, capsys):
    code, out, err = run_cli(["train", "smallcnn", "--data", tiny, "--epochs", 1, "--batch-size", 8, "--image-size", 32,
                              "--weights", "none", "--mode", "transfer", "--out", tmp_path, "--run-name", "t", "--lr", 0.01,
                              "--json"], capsys)
    assert code == 0, err
    best = tmp_path / "smallcnn" / "t" / "best.pth"
    code, out, err = run_cli(["finetune", best, "--unfreeze", 1, "--epochs", 1, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["config"]["mode"] == "finetune" and summary["config"]["lr"] == pytest.approx(1e-4)
    assert Path(summary["run_dir"]) != best.parent
    meta = read_meta(Path(summary["run_dir"]) / "best.pth")
    assert meta["mode"] == "finetune" and meta["config"]["init_checkpoint"] == str(best)
    code, _, err = run_cli(["finetune", best, "--unfreeze", "some"], capsys)
    assert code == 2 and "--unfreeze" in err


def test_early_stopping(tiny, tmp_path):
    from lungedge.train import TrainConfig, train

    s = train(TrainConfig(model="smallcnn", data=str(tiny), epochs=5, batch_size=8, image_size=32, weights="none",
                          mode="transfer", lr=1e-12, patience=1, out=str(tmp_path), augment=False))
    assert len(s["history"]) == 2 and s["status"] == "finished" and s["early_stopped"]


def test_split_of_another_data_set_is_refused(tiny, tmp_path, capsys):
    other = write_dataset(tmp_path / "other", CLASSES, per_class=5, size=48, seed=7)
    code, _, err = run_cli(["data", "split", other, "--out", tmp_path / "other.json"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["train", "smallcnn", "--data", tiny, "--split", tmp_path / "other.json", "--weights", "none",
                            "--out", tmp_path / "runs"], capsys)
    assert code == 2 and "another data set" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_keras_accepts_a_distribute_strategy(tiny, tmp_path):
    from lungedge.models.registry import import_keras

    import_keras()
    import tensorflow as tf

    from lungedge.train import TrainConfig, train

    s = train(TrainConfig(model="resnet50", data=str(tiny), epochs=1, batch_size=8, image_size=32, weights="none",
                          out=str(tmp_path)), strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
    assert s["status"] == "finished" and (Path(s["run_dir"]) / "best.h5").is_file()


@pytest.mark.slow
def test_keras_resume_ends_where_an_uninterrupted_run_ends(tiny, tmp_path):
    from lungedge.train import TrainConfig, train

    base = dict(model="resnet50", data=str(tiny), epochs=2, batch_size=8, image_size=32, weights="none",
                mode="transfer", out=str(tmp_path), seed=1, warmup_epochs=0.5, weight_decay=1e-3)
    full = train(TrainConfig(**base, run_name="a"))
    part = train(TrainConfig(**base, run_name="b"), stop_after=1)
    assert part["status"] == "interrupted" and len(part["history"]) == 1
    resumed = train(TrainConfig(**base, run_name="b"), resume=True)
    assert resumed["status"] == "finished" and len(resumed["history"]) == 2
    a, _ = load_checkpoint(tmp_path / "resnet50" / "a" / "last.h5")
    b, meta = load_checkpoint(tmp_path / "resnet50" / "b" / "last.h5")
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    assert [h["val_loss"] for h in full["history"]] == pytest.approx([h["val_loss"] for h in resumed["history"]], rel=1e-5)
    assert meta["build"]["constructor"] == "keras.applications.ResNet50" and meta["build"]["kwargs"]["pooling"] == "avg"


@pytest.mark.slow
def test_keras_a_failed_write_at_an_epoch_end_keeps_the_previous_epoch_whole(tiny, tmp_path, capsys, monkeypatch):
    """The Keras trainer's epoch set (best.h5, last.h5, last.optimizer.npz, metrics.json) is written as one: the
    disk fills up at epoch 2's optimizer state, after its .h5 files; epoch 1's set stays, and --resume goes on."""
    import re

    from lungedge.models.checkpoint import read_keras_meta

    run = tmp_path / "resnet50" / "cut"
    with monkeypatch.context() as m:
        _disk_full_at(m, "last.optimizer.npz", 2)
        code, _, err = run_cli(["train", "resnet50", "--data", tiny, "--epochs", 2, "--batch-size", 8, "--image-size",
                                32, "--weights", "none", "--mode", "transfer", "--lr", 3e-4, "--seed", 1,
                                "--out", tmp_path, "--run-name", "cut"], capsys)
    one_error(code, err, rf"^error: cannot write {re.escape(str(run / 'last.optimizer.npz'))}: No space left on "
                         rf"device; {re.escape(str(run))} keeps its last finished epoch; continue with ")
    assert read_keras_meta(run / "best.h5")["epoch"] == read_keras_meta(run / "last.h5")["epoch"] == 1
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 1
    assert sorted(p.name for p in run.iterdir()) == ["best.h5", "config.json", "last.h5", "last.optimizer.npz",
                                                     "metrics.json", "split.json"]  # no temporary file left
    code, out, err = run_cli(["train", "resnet50", "--out", tmp_path, "--run-name", "cut", "--resume", "--json"],
                             capsys)
    assert code == 0, err
    resumed = json.loads(out)
    assert resumed["status"] == "finished" and len(resumed["history"]) == 2
    assert resumed["history"][1]["best"]  # epoch 2 was the best: its best.h5 had been written when the disk filled
    assert read_keras_meta(run / "best.h5")["epoch"] == read_keras_meta(run / "last.h5")["epoch"] == 2


KERAS_CTRL_C = """
import os, signal, sys

import torch  # noqa: F401  (torch before tensorflow)

import lungedge.models.files as files
from lungedge.cli import main

publish, seen = files.publish_file, []


def ctrl_c(tmp, path):  # Ctrl-C while epoch 2's checkpoints are written: best.h5 done, last.h5 complete
    named = publish(tmp, path)
    seen.append(path.name)
    if seen.count("last.h5") == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return named


files.publish_file = ctrl_c
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_keras_ctrl_c_while_an_epoch_is_written_keeps_the_last_whole_epoch_and_resumes(tiny, tmp_path, capsys):
    """The Keras trainer interrupted as a user does (SIGINT) while epoch 2's best.h5/last.h5 are being written:
    exit 130 with one line saying what was kept, no traceback; epoch 1's set stays whole with no temporary
    beside it; --resume trains epoch 2 and ends with metrics.json, last.h5 and best.h5 telling one story."""
    import os
    import re
    import subprocess
    import sys

    from lungedge.models.checkpoint import read_keras_meta

    run = tmp_path / "resnet50" / "int"
    args = ["train", "resnet50", "--data", tiny, "--epochs", 2, "--batch-size", 8, "--image-size", 32, "--weights",
            "none", "--mode", "transfer", "--lr", 3e-4, "--seed", 1, "--threads", 1, "--out", tmp_path,
            "--run-name", "int"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KERAS_CTRL_C, *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=root, env=env)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("epoch ")]
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and re.fullmatch(rf"interrupted; {re.escape(str(run))} keeps its last finished epoch; "
                                            rf"continue with 'lungedge train resnet50 .*--run-name int --resume'",
                                            lines[0]), proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "running" and len(metrics["history"]) == 1
    kept = metrics["history"][0]
    assert read_keras_meta(run / "last.h5")["epoch"] == read_keras_meta(run / "best.h5")["epoch"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["best.h5", "config.json", "last.h5", "last.optimizer.npz",
                                                     "metrics.json", "split.json"]  # no temporary, no journal

    code, out, err = run_cli(["train", "resnet50", "--out", tmp_path, "--run-name", "int", "--resume", "--json"],
                             capsys)
    assert code == 0, err
    resumed = json.loads(out)
    metrics = json.loads((run / "metrics.json").read_text())
    assert resumed["status"] == metrics["status"] == "finished" and len(metrics["history"]) == 2
    assert metrics["history"][0] == resumed["history"][0] == kept  # epoch 1 kept, not trained again
    last, best = read_keras_meta(run / "last.h5"), read_keras_meta(run / "best.h5")
    assert last["epoch"] == 2 and last["best"] == metrics["best"] and best["epoch"] == metrics["best"]["epoch"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


KERAS_SAVE = """
import sys

import torch  # noqa: F401  (torch before tensorflow)

from lungedge.io import WriteError
from lungedge.models.files import save_keras_checkpoint
from lungedge.models.registry import import_keras

keras = import_keras()
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(512)])  # 130 kB of weights
try:
    save_keras_checkpoint(sys.argv[1], model, {})
except WriteError as exc:
    print(exc)
"""


def test_keras_checkpoint_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """h5py reports a failed write as a RuntimeError: a WriteError naming the file, the temporary file removed."""
    import os
    import subprocess
    import sys

    from conftest import small_file_limit

    out = tmp_path / "run" / "best.h5"
    proc = subprocess.run([sys.executable, "-c", KERAS_SAVE, str(out)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], preexec_fn=small_file_limit(64_000),
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"cannot write {out}: ") and len(proc.stdout.splitlines()) == 1, proc.stdout
    assert list((tmp_path / "run").iterdir()) == []


def test_keras_optimizer_honours_weight_decay_and_warmup():
    from lungedge.models.registry import import_keras
    from lungedge.train.common import TrainConfig, lr_factor
    from lungedge.train.keras_trainer import make_optimizer

    keras = import_keras()
    cfg = TrainConfig(model="resnet50", epochs=4, lr=1e-3, weight_decay=0.02, warmup_epochs=1.0)
    opt = make_optimizer(keras, cfg, steps_per_epoch=10)
    assert opt.weight_decay == pytest.approx(0.02)
    rates = [float(keras.ops.convert_to_numpy(opt._learning_rate(s))) for s in (0, 5, 10, 25, 40)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3, rel=1e-5)  # linear warm-up over one epoch
    assert rates[3] == pytest.approx(1e-3 * lr_factor(25, 40, 10), rel=1e-4) and rates[4] == pytest.approx(0, abs=1e-9)


def test_keras_and_torch_augment_alike():
    from lungedge.models.registry import get_spec
    from lungedge.train.common import augment
    from lungedge.train.keras_trainer import augment_nhwc

    prep = get_spec("resnet50").preprocessing_for(32)
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32) * 50
    out = augment_nhwc(x, 7, prep)
    ref = augment(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.Generator().manual_seed(7), prep)
    np.testing.assert_array_equal(out, ref.numpy().transpose(0, 2, 3, 1))
    assert not np.allclose(out, x)


@pytest.mark.slow
def test_keras_resnet50_takes_keras_backbone_weights_files_whole_or_not_at_all(tmp_path):
    """`train resnet50 --weights FILE` with Keras' own backbone weights (the legacy `_notop.h5` that
    `weights="imagenet"` downloads, and Keras 3's `.weights.h5`): every base weight is the file's; a file
    of another network is one LungedgeError, with no Keras warning left on the way out."""
    import warnings

    import h5py

    from lungedge.errors import LungedgeError
    from lungedge.models.registry import build_model, import_keras

    keras = import_keras()
    from keras.src.legacy.saving import legacy_h5_format  # the layout of Keras' downloaded weight files

    source = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3))
    legacy, modern = tmp_path / "resnet50_notop.h5", tmp_path / "resnet50_notop.weights.h5"
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    source.save_weights(modern)
    for path in (legacy, modern):
        built = build_model("resnet50", 3, str(path), image_size=32)
        base = next(layer for layer in built.model.layers if hasattr(layer, "layers"))
        for name in ("conv1_conv", "conv5_block3_3_conv", "conv5_block3_3_bn"):
            for got, want in zip(base.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
                np.testing.assert_array_equal(got, want)
        assert built.build["weights"]["layout"] == "keras-backbone"

    other = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNet(weights=None, include_top=False, input_shape=(32, 32, 3)).save_weights(other)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(LungedgeError, match=r"mobilenet\.weights\.h5 does not hold resnet50 backbone weights"):
            build_model("resnet50", 3, str(other), image_size=32)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []  # Keras' "Skipping ..."
