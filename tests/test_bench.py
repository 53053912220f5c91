"""`lungedge bench`: percentiles after warm-up, ratios against the source framework, provenance."""

from __future__ import annotations

import json

import torch  # noqa: F401
import torchvision  # noqa: F401
import pytest

from conftest import run_cli
from lungedge.timing import alternate, latency_stats, time_calls

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_stats_and_timing_loop():
    lat, ips = latency_stats([0.001, 0.002, 0.003, 0.004], batch=8)
    assert lat["p50"] == pytest.approx(2.5) and lat["mean"] == pytest.approx(2.5)
    assert ips == pytest.approx(8 / 0.0025)
    calls = []
    times = time_calls(lambda: calls.append(1), warmup=2, iters=5, seconds=None)
    assert len(times) == 5 and len(calls) == 7  # warm-up calls are not timed
    order = []
    rounds = alternate([lambda: order.append("a"), lambda: order.append("b")], repeats=3, warmup=1)
    assert [len(t) for t in rounds] == [3, 3] and order == ["a", "b"] * 4  # contenders take turns


def test_time_in_turns_times_stretches_of_each_round_after_round():
    import time

    from lungedge.timing import time_in_turns

    order = []
    times = time_in_turns([lambda: order.append("a"), lambda: order.append("b")], warmup=1, iters=6, seconds=None,
                          turns=3)
    assert [len(t) for t in times] == [6, 6]
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up once each, then stretches of 2 in turn
    order.clear()
    times = time_in_turns([lambda: order.append("a"), lambda: order.append("b")], warmup=0, iters=5, seconds=None,
                          turns=2)
    assert [len(t) for t in times] == [5, 5] and order == list("aaabbbaabb")
    order.clear()
    slow, fast = (lambda: (order.append("s"), time.sleep(0.004))), (lambda: order.append("f"))
    times = time_in_turns([slow, fast], warmup=0, iters=None, seconds=0.04, turns=4)
    assert sum(times[0]) >= 0.04 and sum(times[1]) >= 0.04 and len(times[0]) >= 3
    switches = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert switches >= 2 * 4 - 1  # at least four rounds of both, not one long stretch each


def test_provenance_is_cheap_and_complete():
    from lungedge import provenance

    p = provenance.collect(threads=3)
    assert p["host"] and p["cpu_logical_cores"] and p["date"] and p["threads"] == 3
    assert "torch" in p["libraries"] and "gpu" in p and "gpu_driver" in p
    assert p["host"] in provenance.machine_label(p)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    from lungedge.cli import main

    trained_run("googlenet")
    tmp = tmp_path_factory.mktemp("bench")
    assert main(["export", "googlenet", "--runs", str(trained_run.runs), "--out", str(tmp / "engines"),
                 "--calibration", str(tmp / "c"), "--fp16", "--no-engine"]) == 0
    return {"runs": trained_run.runs, "engines": tmp / "engines", "tmp": tmp}


def test_bench_all_cpu(exported, capsys):
    out = exported["tmp"] / "results"
    out.mkdir()
    left = out / ".bench-vm-20260101T000000Z.jsonl.k3j_x9a2.tmp"  # what a bench killed (-9) while writing left
    left.write_text('{"format": "lungedge-result/1"')
    # --all: every model with artifacts (other tests of the session may have trained more models: only
    # googlenet has ONNX files here, and the Keras backend is left out to keep this quick)
    code, stdout, err = run_cli(["bench", "--all", "--backend", "torch,onnxruntime", "--runs", exported["runs"],
                                 "--engines", exported["engines"],
                                 "--batch-sizes", "1,2", "--warmup", "1", "--iters", "3", "--threads", "1",
                                 "--out", out], capsys)
    assert code == 0, err
    assert "googlenet" in stdout and "× source" in stdout and "wrote" in stdout
    files = list(out.glob("bench-*.jsonl"))
    assert sorted(p.name for p in out.iterdir()) == [files[0].name]  # the killed one's temporary went
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    rows = [r for r in rows if r["model"] == "googlenet"]
    # torch fp32, onnxruntime fp32 and fp16; 2 batch sizes; with and without preprocessing
    assert len(rows) == 3 * 2 * 2
    for r in rows:
        assert r["iters"] == 3 and r["warmup"] == 1 and r["includes"]
        assert r["timed_in_turns_with"] == ["model only" if r["preprocessing"] else "+prep"]
        assert set(r["latency_ms"]) >= {"p50", "p90", "p99", "mean", "std"} and r["throughput_ips"] > 0
        p = r["provenance"]
        assert p["threads"] == 1 and p["host"] and p["cpu"] and p["libraries"] and p["date"]
        assert len(r["artifact_sha256"]) == 64
        assert r["vs_source"] is not None
    # vs_source = the torch FP32 p50 / this row's p50, same batch size and preprocessing
    src = {(r["batch_size"], r["preprocessing"]): r["latency_ms"]["p50"] for r in rows if r["backend"] == "torch"}
    assert len(src) == 4
    for r in rows:
        assert r["vs_source"] == pytest.approx(src[(r["batch_size"], r["preprocessing"])] / r["latency_ms"]["p50"])
    assert any("decode" in r["includes"] for r in rows if r["preprocessing"])


def test_ctrl_c_in_a_long_bench_keeps_the_rows_already_measured(exported, capsys, monkeypatch):
    """Stopped during its second job (Ctrl-C or SIGTERM, which lungedge turns into the same stop), bench writes
    the first job's rows, whole, and says where; before, a long --all run lost every measurement."""
    from lungedge import bench

    out = exported["tmp"] / "stopped"
    real, calls = bench.bench_job, []

    def stop_in_second_job(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "bench_job", stop_in_second_job)
    code, _, err = run_cli(["bench", "googlenet", "--backend", "torch,onnxruntime", "--runs", exported["runs"],
                            "--engines", exported["engines"], "--batch-sizes", "1", "--warmup", "0", "--iters", "2",
                            "--threads", "1", "--out", out], capsys)
    assert code == 130 and len(calls) == 2, err
    written = list(out.glob("bench-*.jsonl"))
    assert len(written) == 1, err
    written = written[0]
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert len(rows) == 2 and {r["backend"] for r in rows} == {calls[0].backend}  # model only and +prep
    assert all(r["iters"] == 2 and r["latency_ms"]["p50"] > 0 for r in rows)
    assert err.strip().splitlines()[-1] == f"interrupted; {written} keeps the 2 rows measured before the stop"


def test_bench_cuda_without_gpu_is_one_line(exported, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    code, _, err = run_cli(["bench", "googlenet", "--device", "cuda", "--runs", exported["runs"], "--engines",
                            exported["engines"]], capsys)
    assert code == 2 and err.startswith("error: --device cuda") and len(err.strip().splitlines()) == 1


def test_bench_bad_options(exported, capsys):
    code, _, err = run_cli(["bench", "googlenet", "--batch-sizes", "1,x"], capsys)
    assert code == 2 and "--batch-sizes" in err
    code, _, err = run_cli(["bench", "googlenet", "--backend", "nosuch", "--runs", exported["runs"]], capsys)
    assert code == 2 and "unknown backend" in err
    code, _, err = run_cli(["bench"], capsys)
    assert code == 2 and "--all" in err
    code, _, err = run_cli(["bench", "googlenet", "--seconds", "nan", "--runs", exported["runs"], "--engines",
                            exported["engines"]], capsys)
    assert code == 2 and "--seconds" in err and len(err.strip().splitlines()) == 1


def test_spread_is_the_interquartile_range_over_the_median():
    from lungedge.timing import spread

    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0 / 3.0)
    assert spread([7.0] * 9) == 0.0


def test_installed_says_no_for_a_missing_or_blocked_module(monkeypatch):
    import sys
    import types

    from lungedge.models.frameworks import installed

    assert installed("numpy") and not installed("no_such_module_lungedge")
    assert not installed("no_such_module_lungedge.child")  # find_spec would raise: its parent is missing
    monkeypatch.setitem(sys.modules, "numpy", None)  # blocked on purpose
    assert not installed("numpy")
    monkeypatch.setitem(sys.modules, "made_here", types.ModuleType("made_here"))  # no __spec__: find_spec raises
    assert installed("made_here")
