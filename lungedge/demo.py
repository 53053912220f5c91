"""`lungedge demo`: the whole job, each stage one lungedge command, resumable.

inspect -> grouped split -> train (short schedule) -> export FP32/FP16/INT8 -> eval on every
CPU backend -> bench -> report. Every stage runs the same command a user would type, in this
process, through ``run_command`` (the CLI passes its own ``main``, so this module never imports
the CLI), with its outputs under one folder; a stage that finished leaves a marker in
``<out>/.done/``, so an interrupted demo re-run picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import LungedgeError, check_choice
from .io import FolderLock, atomic_write_text

DEFAULT_MODELS = ("smallcnn", "googlenet")


@dataclass(frozen=True)
class Schedule:
    epochs: int
    image_size: int
    batch_size: int


# short schedules that fit the 2-core CPU; the real-data ones train longer
SYNTHETIC = {"smallcnn": Schedule(15, 64, 16), "googlenet": Schedule(12, 64, 16), "densenet121": Schedule(2, 64, 16),
             "inception_v3": Schedule(2, 75, 16), "resnet50": Schedule(2, 64, 16)}
REAL = {"smallcnn": Schedule(20, 96, 32), "googlenet": Schedule(12, 96, 32), "densenet121": Schedule(6, 96, 32),
        "inception_v3": Schedule(6, 96, 32), "resnet50": Schedule(6, 96, 32)}


RunCommand = Callable[[list[str]], int]  # runs one lungedge command line (no program name): exit code


class Stages:
    def __init__(self, out: Path, log, run_command: RunCommand):
        self.done_dir = out / ".done"
        self.log = log
        self.run_command = run_command
        self.timings: dict[str, float] = {}

    def run(self, name: str, argv_list: list[list[str]]) -> None:
        marker = self.done_dir / name
        if marker.is_file():
            self.log(f"[demo] {name}: already done, reused")
            return
        self.log(f"[demo] {name} ...")
        t0 = time.perf_counter()
        for argv in argv_list:
            argv = [str(a) for a in argv]
            self.log("[demo] $ lungedge " + " ".join(argv))
            code = self.run_command(argv)
            if code != 0:
                raise LungedgeError(f"demo stopped: 'lungedge {' '.join(argv[:2])} ...' failed (exit {code})")
        self.timings[name] = time.perf_counter() - t0
        atomic_write_text(marker, f"{self.timings[name]:.1f} s\n")


def demo(run_command: RunCommand, data: str | Path | None = None, out: str | Path = "demo",
         models: list[str] | None = None, per_class: int = 40, log=print) -> Path:
    """Run the chain, each stage through ``run_command``; return the path of report.html."""
    from .models.registry import names

    models = list(models or DEFAULT_MODELS)
    for m in models:
        check_choice(m, names(), "model")
    out = Path(out)
    # one demo at a time in OUT: a second one would generate the same images, redo the same stages and be
    # refused half way by the first one's training
    with FolderLock(out, "lungedge demo"):
        return _demo(run_command, data, out, models, per_class, log)


def _demo(run_command: RunCommand, data, out: Path, models: list[str], per_class: int, log) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    options = {"models": models, "data": str(Path(data).absolute()) if data is not None else None,
               "per_class": per_class if data is None else None}
    _check_same_options(out, options)
    if data is None:
        from .synthetic import generate

        data = generate(out / "data-synthetic", per_class=per_class)
        log(f"[demo] data: SYNTHETIC CT-like drawings in {data} (not patient images; pass --data DIR for real data)")
        schedules = SYNTHETIC
    else:
        schedules = REAL
    data = Path(data)
    split = out / "split.json"
    runs, engines, calib, results = out / "runs", out / "engines", out / "calibration", out / "results"
    st = Stages(out, log, run_command)
    st.run("inspect", [["data", "inspect", data]])
    st.run("split", [["data", "split", data, "--out", split]])
    for m in models:
        s = schedules[m]
        train = ["train", m, "--data", data, "--split", split, "--weights", "none", "--epochs", s.epochs,
                 "--image-size", s.image_size, "--batch-size", s.batch_size, "--out", runs, "--run-name", "demo"]
        if (runs / m / "demo" / "config.json").is_file():
            train = ["train", m, "--out", runs, "--run-name", "demo", "--resume"]  # interrupted earlier
        st.run(f"train-{m}", [train])
        st.run(f"export-{m}", [["export", m, "--runs", runs, "--out", engines, "--calibration", calib, "--fp16",
                                "--int8", "--calib-size", 60, "--no-engine"]])
        st.run(f"eval-{m}", [["eval", m, "--data", data, "--split", split, "--runs", runs, "--engines", engines,
                              "--out", results]])
    st.run("bench", [["bench", *models, "--device", "cpu", "--batch-sizes", "1,8", "--seconds", "0.5",
                      "--runs", runs, "--engines", engines, "--out", results]])
    st.run("report", [["report", "--results", results, "--out", out / "reports"]])
    report = out / "reports" / "report.html"
    if not report.is_file():
        raise LungedgeError(f"the report stage wrote no {report}")
    atomic_write_text(out / "demo.json", json.dumps({**options, "timings": st.timings}, indent=1))
    return report


def _check_same_options(out: Path, options: dict) -> None:
    """A demo folder continues the demo it holds: its finished stages are reused by name, so a rerun with other
    --models, --data or --per-class would mix that demo's results with this one's (a report without the new
    model, a split of other images). Refused in one line; the options are recorded for the next run."""
    record = out / "demo.json"
    try:
        was = json.loads(record.read_text())
    except FileNotFoundError:
        was = None
    except (OSError, ValueError):
        was = {}  # unreadable: nothing to compare with
    if isinstance(was, dict) and was:
        names = {"models": "--models", "data": "--data", "per_class": "--per-class"}
        shown = {"models": lambda v: ",".join(v), "data": lambda v: v or "(synthetic)",
                 "per_class": lambda v: v}
        differ = [f"{names[k]} {shown[k](options[k])} (started with {shown[k](was[k])})" for k in names
                  if k in was and k != "data" and was[k] != options[k]]
        if "data" in was and "per_class" in was and was["data"] != options["data"]:  # recorded by this version
            differ.insert(0, f"--data {shown['data'](options['data'])} (started with {shown['data'](was['data'])})")
        if differ:
            raise LungedgeError(f"{out} holds a demo started with other options: {'; '.join(differ)}; "
                                "give another --out, or remove that folder to start again")
        return
    if was is None and (out / ".done").is_dir():
        return  # stages of a demo whose options were never recorded: reused as before
    atomic_write_text(record, json.dumps({**options, "timings": {}}, indent=1))
