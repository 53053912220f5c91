"""`lungedge report`: results from several machines merge, labelled, into one self-contained page."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli


def _prov(host, cpu, gpu=None, threads=2):
    return {"host": host, "cpu": cpu, "cpu_logical_cores": 2 if gpu is None else 16, "cpu_physical_cores": 1,
            "gpu": gpu, "gpu_driver": "560.1" if gpu else None, "libraries": {"torch": "2.14.1"}, "threads": threads,
            "date": "2026-11-28T10:00:00+00:00", "os": "Linux", "python": "3.12", "jetson": None}


def _bench(model, backend, variant, p50, prov, device="cpu", bs=1, prep=False, sha="a" * 64):
    return {"format": "lungedge-result/1", "kind": "bench", "model": model, "backend": backend,
            "source_framework": "torch", "device": device, "precision": variant.split("-")[0], "variant": variant,
            "artifact": f"{model}.{variant}", "artifact_sha256": sha, "batch_size": bs, "preprocessing": prep,
            "includes": "model forward only", "warmup": 3, "iters": 10,
            "latency_ms": {"p50": p50, "p90": p50, "p99": p50, "mean": p50, "std": 0.0},
            "throughput_ips": bs / p50 * 1e3, "vs_source": 1.0, "provenance": prov}


def _eval(model, backend, variant, bacc, prov, device="cpu", sha="a" * 64, info=None):
    row = {"format": "lungedge-result/1", "kind": "eval", "model": model, "backend": backend,
           "source_framework": "torch", "device": device, "precision": variant.split("-")[0], "variant": variant,
           "artifact": f"{model}.{variant}", "artifact_sha256": sha, "classes": ["A", "B"], "test_set": "4 images",
           "metrics": {"n": 4, "accuracy": bacc, "balanced_accuracy": bacc, "macro_f1": bacc,
                       "confusion_matrix": [[2, 0], [1, 1]], "sensitivity": {}, "specificity": {}},
           "differs_from_fp32": None if variant == "fp32" else 0.25, "provenance": prov}
    if info:
        row["model_info"] = info
    return row


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def two_machines(tmp_path):
    cpu = _prov("laptop", "Intel Xeon")
    gpu = _prov("gpubox", "AMD EPYC", gpu="NVIDIA H200")
    info = {"total_params": 6_000_000, "trainable_params": 6_000_000, "weight_layers": 58, "epochs": 10,
            "batch_size": 32, "method": "full", "library": "PyTorch 2.14.1"}
    _write(tmp_path / "a" / "bench-laptop.jsonl", [_bench("googlenet", "torch", "fp32", 40.0, cpu),
                                                   _bench("googlenet", "onnxruntime", "int8-cpu", 12.0, cpu, sha="b" * 64)])
    _write(tmp_path / "a" / "eval-laptop.jsonl", [_eval("googlenet", "torch", "fp32", 0.80, cpu, info=info),
                                                  _eval("googlenet", "onnxruntime", "int8-cpu", 0.78, cpu, sha="b" * 64)])
    # the same artifact benchmarked on the GPU machine: must stay a separate, labelled row
    _write(tmp_path / "b" / "gpu.jsonl", [_bench("googlenet", "torch", "fp32", 3.0, gpu, device="cuda"),
                                          _eval("googlenet", "torch", "fp32", 0.80, gpu, device="cuda")])
    return tmp_path


def test_merge_keeps_rows_of_both_machines_labelled(two_machines, capsys):
    out = two_machines / "reports"
    code, stdout, err = run_cli(["report", "--results", two_machines / "a", "--results", two_machines / "b",
                                 "--out", out], capsys)
    assert code == 0, err
    assert "M1: laptop" in stdout and "M2: gpubox" in stdout
    md = (out / "report.md").read_text()
    lat = md.split("## Accuracy and latency")[1].split("##")[0]
    lines = [ln for ln in lat.splitlines() if ln.startswith("| M")]
    assert len(lines) == 3  # laptop torch, laptop int8, gpubox torch: nothing averaged away
    assert any("| M1 | googlenet | torch | cpu |" in ln and "40.00" in ln for ln in lines)
    assert any("| M2 | googlenet | torch | cuda |" in ln and "3.00" in ln for ln in lines)
    assert "6,000,000" in md and "58" in md  # the group's comparison table
    assert "NVIDIA H200" in md and "560.1" in md  # provenance of the machines
    assert (out / "accuracy_latency.png").stat().st_size > 1000


def test_html_is_self_contained_and_lists_every_row(two_machines, capsys):
    out = two_machines / "reports"
    code, _, err = run_cli(["report", "--results", two_machines, "--out", out], capsys)
    assert code == 0, err
    page = (out / "report.html").read_text()
    assert re.search(r"<img[^>]+src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'", page)
    srcs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page)
    assert srcs and all(s.startswith("data:") for s in srcs)  # no external files or URLs
    assert "<link" not in page and "<script" not in page
    prov = page.split("Provenance of every row")[1]
    assert prov.count("<tr>") == 1 + 6  # header + every bench and eval row
    assert "Confusion matrices" in page and page.count("true \\ predicted") == 3


def test_calibration_section_lists_each_measured_row_and_draws_its_diagram(two_machines, capsys):
    import numpy as np

    from lungedge.metrics import calibration
    from lungedge.stats import bootstrap_metrics

    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    y = np.array([0, 0, 1, 1])
    row = _eval("googlenet", "onnxruntime", "fp16", 0.75, _prov("laptop", "Intel Xeon"), sha="c" * 64)
    row["metrics"]["calibration"] = calibration(y, probs)
    row["intervals"] = bootstrap_metrics(y, probs.argmax(1), None, ["A", "B"], n_boot=50, probs=probs)
    _write(two_machines / "a" / "eval-new.jsonl", [row])
    out = two_machines / "reports"
    code, stdout, err = run_cli(["report", "--results", two_machines / "a", "--out", out], capsys)
    assert code == 0, err
    assert str(out / "reliability.png") in stdout  # the "wrote ..." line names every file written
    md = (out / "report.md").read_text()
    section = md.split("## Calibration")[1].split("\n## ")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| M")]
    assert len(lines) == 1  # the two rows written before calibration was measured are not made up
    ece = row["metrics"]["calibration"]["ece"]  # |1 - 0.9| + |0 - 0.6| + |1 - 0.7| + |1 - 0.8|, over 4
    assert ece == pytest.approx(0.3)
    assert "| googlenet | onnxruntime | fp16 | 1.00 | 4 | 0.750 | 0.750 | +0.000 | 0.300 [" in lines[0]
    assert (out / "reliability.png").stat().st_size > 1000 and "![reliability diagrams](reliability.png)" in md


def test_a_failed_write_leaves_the_previous_report_whole(two_machines):
    """The page and its PNGs are published together: a write that fails half way (here: a file size limit
    between the PNGs' and the HTML page's, as a nearly full disk) leaves every earlier file as it was."""
    import subprocess
    import sys

    from conftest import small_file_limit

    out = two_machines / "reports"
    cmd = [sys.executable, "-m", "lungedge", "report", "--results", two_machines, "--out", out]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = int(max(len(b) for name, b in before.items() if name != "report.html") * 1.2)
    assert len(before["report.html"]) > limit * 1.2
    bench = two_machines / "a" / "bench-laptop.jsonl"
    bench.write_text(bench.read_text().replace('"p50": 40.0', '"p50": 41.0'))  # new results, the same shape
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_file_limit(limit))
    assert proc.returncode == 2 and f"cannot write {out / 'report.html'}" in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing new, no temporary file left


def test_a_figure_the_new_report_does_not_draw_goes_with_the_previous_report(two_machines, capsys):
    """A report from eval rows only draws no accuracy-vs-latency plot: the previous report's plot was left beside
    the new page, a figure of other results that nothing in the new report mentions."""
    out = two_machines / "reports"
    code, _, err = run_cli(["report", "--results", two_machines, "--out", out], capsys)
    assert code == 0 and (out / "accuracy_latency.png").is_file(), err
    (out / "notes.png").write_text("mine")
    code, stdout, err = run_cli(["report", "--results", two_machines / "a" / "eval-laptop.jsonl", "--out", out],
                                capsys)
    assert code == 0, err
    assert "accuracy_latency.png" not in stdout and "accuracy_latency.png" not in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["notes.png", "report.html", "report.md"]


def test_pareto_front():
    from lungedge.report import pareto

    pts = [(10, 0.8), (5, 0.7), (20, 0.9), (12, 0.75), (5, 0.6)]
    assert sorted(pareto(pts)) == [0, 1, 2]


def test_report_without_results_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["report", "--results", tmp_path / "empty"], capsys)
    assert code == 2 and err.startswith("error: no bench or eval results")


def test_crowded_scatter_labels_cover_neither_each_other_nor_a_point():
    # 16 rows within 10 % latency and 2 points of accuracy: the former fixed offsets stacked their labels
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lungedge.report import place_labels

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    xy = [(10.0 * (1 + 0.1 * (k % 4) / 3), 0.80 + 0.02 * (k // 4) / 3) for k in range(16)]
    ax.scatter(*zip(*xy))
    ax.set_xscale("log")
    ax.set_xlim(3, 40)
    ax.set_ylim(0.70, 0.90)
    labels = [f"densenet121 ov int8-ov #{k}" for k in range(16)]
    texts = place_labels(ax, xy, labels)
    assert sorted(t.get_text() for t in texts) == sorted(labels)
    from matplotlib.text import Text

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, r) for t in texts]  # the text, without its leader line
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    dots = [ax.transData.transform(p) for p in xy]
    assert not [t for t, e in zip(texts, boxes) for x, y in dots if e.x0 < x < e.x1 and e.y0 < y < e.y1]
    plt.close(fig)


def test_a_killed_reports_temporaries_go_and_a_second_report_at_once_is_refused(two_machines, capsys):
    """A report killed while writing left its page and PNGs under temporary names (megabytes each, one more set
    per kill); two reports into one folder at once each renamed their files into place, mixing the sets."""
    import os
    import signal
    import subprocess
    import sys

    from lungedge.io import FolderLock

    out = two_machines / "reports"
    out.mkdir()
    (out / "notes.tmp.txt").write_text("mine")  # the user's own files stay
    code = ("import os, sys\nimport lungedge.io as io\n"
            "orig = io.atomic_write_bytes\n"
            "def killed(path, data, exclusive=False):\n"
            "    r = orig(path, data, exclusive)\n"
            "    if str(path).endswith('report.md'): os.kill(os.getpid(), 9)\n"
            "    return r\n"
            "io.atomic_write_bytes = killed\n"
            "import lungedge.report as rep\nrep.atomic_write_text = lambda p, t: killed(p, t.encode())\n"
            f"rep.build_report([{str(two_machines)!r}], {str(out)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(".tmp") and n.startswith(".report.md.") for n in left), left  # the kill's litter
    with FolderLock(out, "lungedge report"):
        code, _, err = run_cli(["report", "--results", two_machines, "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "is being written by pid" in err, err
    code, _, err = run_cli(["report", "--results", two_machines, "--out", out], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    assert "notes.tmp.txt" in names and "report.html" in names
    assert not os.path.exists(two_machines / ".reports.lock")


def test_names_with_markup_stay_text_and_every_figure_says_its_test_set(tmp_path, capsys):
    """A model or class called <script>, with a | or a newline, neither injects HTML nor breaks a Markdown
    table row or heading; each accuracy row names its test set, image count and interval method."""
    from lungedge.stats import bootstrap_metrics

    evil_model, evil_class = "m<script>alert(1)</script>|x\n## fake", "B|<img src=x onerror=alert(1)>\n[c](javascript:x)"
    row = _eval(evil_model, "onnxruntime", "int8-cpu", 0.75, _prov("laptop", "Intel Xeon"))
    row["classes"] = ["=cmd|' /C calc'!A0", evil_class]
    row["metrics"]["sensitivity"] = {c: 0.5 for c in row["classes"]}
    row["intervals"] = bootstrap_metrics([0, 0, 1, 1], [0, 1, 1, 0], None, row["classes"], n_boot=100)
    row["test_set"] = "4 test images of split.json"
    _write(tmp_path / "r" / "eval.jsonl", [row])
    out = tmp_path / "reports"
    code, _, err = run_cli(["report", "--results", tmp_path / "r", "--out", out, ], capsys)
    assert code == 0, err
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert "<script" not in text and "<img src=x" not in text
    assert "](javascript" not in md  # a Markdown link; in the HTML it is plain text
    assert "\n## fake" not in md and "\n[c]" not in md
    for line in md.splitlines():  # every table row has as many unescaped | as its table's header
        if line.startswith("|"):
            assert len(re.findall(r"(?<!\\)\|", line)) in {len(h) + 1 for h in
                                                          (report_columns().values())}, line
    lat = md.split("## Accuracy and latency")[1].split("\n## ")[0]
    (line,) = [ln for ln in lat.splitlines() if ln.startswith("| M1")]
    assert "4 test images of split.json (4 images)" in line and "95% image bootstrap (no groups), 4 images" in line


def report_columns():
    from lungedge import report

    return {"lat": report.LAT_COLUMNS, "machines": report.MACHINE_COLUMNS, "prov": report.PROV_COLUMNS,
            "group": report.GROUP_COLUMNS, "gate": report.GATE_COLUMNS, "cal": report.CAL_COLUMNS,
            "confusion": ["true \\ predicted", "c1", "c2"]}


def _stop(signum):
    """Send ``signum`` to this process, as Ctrl-C (SIGINT) or docker stop (SIGTERM) do, and wait for it."""
    import os
    import signal
    import time

    os.kill(os.getpid(), signum)
    time.sleep(30)  # the signal's KeyboardInterrupt arrives here
    raise AssertionError(f"{signal.Signals(signum).name} did not stop the report")


@pytest.mark.parametrize("signum, code, said", [("SIGINT", 130, "interrupted"),
                                                ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_a_stopped_report_says_the_previous_report_stays_and_it_does(two_machines, capsys, monkeypatch, signum,
                                                                     code, said):
    """Stopped while its figures are drawn (the plot already written under a temporary name), report said only
    "interrupted"; the previous report stays whole, and now the line says so."""
    import signal

    from lungedge import report

    out = two_machines / "reports"
    assert run_cli(["report", "--results", two_machines, "--out", out], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bench = two_machines / "a" / "bench-laptop.jsonl"
    bench.write_text(bench.read_text().replace('"p50": 40.0', '"p50": 41.0'))  # new results
    real = report.reliability_png

    def stopped(*args, **kwargs):
        real(*args, **kwargs)
        _stop(getattr(signal, signum))

    monkeypatch.setattr(report, "reliability_png", stopped)
    got, _, err = run_cli(["report", "--results", two_machines, "--out", out], capsys)
    assert got == code and err.splitlines() == [f"{said}; nothing written: {out} holds the previous report as it was"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary left either
    fresh = two_machines / "fresh"
    got, _, err = run_cli(["report", "--results", two_machines, "--out", fresh], capsys)
    assert got == code and err.splitlines() == [f"{said}; nothing written to {fresh}"]
    assert not fresh.exists() or not list(fresh.iterdir())


def test_a_report_stopped_while_it_takes_its_names_says_the_new_report_is_complete(two_machines, capsys,
                                                                                   monkeypatch):
    """A Ctrl-C after the set's journal is written completes the renames: the folder holds the new report, and the
    line says that rather than the previous one."""
    import signal

    import lungedge.io as io

    out = two_machines / "reports"
    assert run_cli(["report", "--results", two_machines, "--out", out], capsys)[0] == 0
    previous = (out / "report.md").read_text()
    bench = two_machines / "a" / "bench-laptop.jsonl"
    bench.write_text(bench.read_text().replace('"p50": 40.0', '"p50": 41.0'))

    def stop_at_second_rename(index, tmp, path):
        if index == 1:
            _stop(signal.SIGINT)

    monkeypatch.setattr(io, "_renaming", stop_at_second_rename)
    code, _, err = run_cli(["report", "--results", two_machines, "--out", out], capsys)
    assert code == 130 and err.splitlines() == [f"interrupted; {out} holds the new report, complete"]
    monkeypatch.undo()
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    assert (out / "report.md").read_text() != previous  # the new results' report, whole


def _shift(differs: bool) -> dict:
    """A ``set_shift`` as eval writes it (:meth:`lungedge.inputcheck.InputCheck.compare_set`)."""
    distance = {"grey_p99": 0.61, "grey_p01": 0.45, "gradient": 0.05} if differs else {"grey_p99": 0.05}
    return {"judged": True, "images": 36, "statistic": max(distance.values()), "threshold": 0.333,
            "differs": differs, "shifted": [d for d in distance if distance[d] > 0.333] if differs else [],
            "distance": distance, "median": {d: [100.0, 120.0] for d in distance}, "method": "Wasserstein-1"}


def test_what_eval_knew_about_its_images_is_beside_the_row_and_an_older_row_still_renders(tmp_path, capsys):
    """Test images unlike the training images, a set that differs from them as a whole and images a viewer shows
    turned are said in the test set cell of report.md and report.html; a row from before eval recorded them
    (no keys) renders as before, and one whose set looks like the training images gets no warning."""
    prov = _prov("laptop", "Intel Xeon")
    shifted = _eval("m", "onnxruntime", "fp32", 0.70, prov)
    shifted.update(unlike_training=0.25, unlike_training_count=1, set_shift=_shift(True), exif_orientation_count=2)
    alike = _eval("m", "onnxruntime", "fp16", 0.80, prov, sha="c" * 64)
    alike.update(unlike_training=0.0, unlike_training_count=0, set_shift=_shift(False), exif_orientation_count=0)
    small = _eval("m", "onnxruntime", "int8-cpu", 0.80, prov, sha="d" * 64)
    small.update(unlike_training=0.0, unlike_training_count=0, exif_orientation_count=0,
                 set_shift={"judged": False, "images": 4,
                            "why": "4 images are too few to judge as a set (at least 20)"})
    old = _eval("m", "torch", "fp32", 0.90, prov, sha="e" * 64)  # no keys
    _write(tmp_path / "r" / "eval.jsonl", [shifted, alike, small, old])
    out = tmp_path / "reports"
    code, _, err = run_cli(["report", "--results", tmp_path / "r", "--out", out], capsys)
    assert code == 0, err
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    lat = md.split("## Accuracy and latency")[1].split("\n## ")[0]
    cell = {("torch" if r is old else r["variant"]): [ln for ln in lat.splitlines()
                                                       if f"| m | {r['backend']} | cpu | {r['variant']} |" in ln][0]
            for r in (shifted, alike, small, old)}
    warning = ("WARNING: these images differ as a set from the training images (grey level at 99 % by 0.61, grey "
               "level at 1 % by 0.45; Wasserstein distance in training spreads, threshold 0.33)")
    assert warning in cell["fp32"] and "1 of 4 test images (25.0%) unlike the training images" in cell["fp32"]
    assert "2 image(s) carry an EXIF orientation" in cell["fp32"]
    assert warning in page and "1 of 4 test images (25.0%) unlike" in page and "2 image(s) carry an EXIF" in page
    for v in ("fp16", "torch"):  # alike, and from before: the test set and its count only
        assert "4 images (4 images) |" in cell[v] and "WARNING" not in cell[v] and "unlike" not in cell[v], cell[v]
        assert "EXIF" not in cell[v] and "set check" not in cell[v]
    assert "4 images (4 images); set check not judged: 4 images are too few to judge as a set |" in cell["int8-cpu"]
    assert md.count("differ as a set") == page.count("differ as a set") == 1
