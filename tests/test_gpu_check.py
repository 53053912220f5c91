"""scripts/gpu_check.sh: argument handling, the no-GPU exit, the plan and its skip reasons (on CPU), and
a CPU rehearsal of the whole flow (slow). The GPU run itself happens on the GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gpu_check = _module()


def run(*args, timeout=120):
    env = dict(os.environ, PY=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_no_gpu_gives_one_line_and_exit_4(tmp_path):
    out = tmp_path / "results"
    r = run("--out", str(out))
    assert r.returncode == gpu_check.EXIT_NO_GPU == 4
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no NVIDIA GPU here (nvidia-smi is not on PATH)")
    assert "Traceback" not in r.stdout + r.stderr and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--models", "googlenet,resnet50"], "--models: unknown resnet50"),
    (["--batch-sizes", "1,0"], "--batch-sizes must be positive integers"),
    (["--batch-sizes", "a"], "--batch-sizes must be comma-separated integers"),
    (["--compile-precisions", "int8"], "--compile-precisions: unknown int8"),
    (["--device", "tpu"], "--device must be cuda or cpu"),
    (["--test-images", "2"], "--test-images must be at least 3"),
    (["--seconds", "-1"], "--seconds must be 0 or more"),
    (["--bootstrap", "50"], "--bootstrap must be at least 100"),
])
def test_bad_arguments_exit_2_with_one_line(args, message):
    r = run(*args, "--dry-run")
    assert r.returncode == gpu_check.EXIT_USAGE == 2
    assert r.stderr.strip() == f"error: {message}" or r.stderr.strip().startswith(f"error: {message}")
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_dry_run_prints_facts_plan_and_skip_reasons(tmp_path):
    out = tmp_path / "results"
    r = run("--dry-run", "--out", str(out), "--models", "googlenet,smallcnn")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "versions: python" in text and "onnxruntime providers:" in text
    if shutil.which("nvidia-smi") is None:
        assert "gpu: none (nvidia-smi is not on PATH)" in text
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "skip onnxruntime: onnxruntime" in text and "has no CUDAExecutionProvider" in text
    if importlib.util.find_spec("tensorrt") is None:
        assert "skip tensorrt: TensorRT is not installed" in text
    assert "prepare data and checkpoints" in text
    assert "eval googlenet: lungedge eval googlenet --device cuda --backend torch,torch-amp" in text
    assert "bench smallcnn: lungedge bench smallcnn --device cuda" in text and "--batch-sizes 1,8,32,128,256" in text
    assert not out.exists()  # a dry run writes nothing


FACTS = {"onnxruntime": "1.30.0", "ort_providers": ["CPUExecutionProvider"], "tensorrt": None, "keras": None,
         "triton": "3.5.0", "c_compiler": "/usr/bin/cc"}


def test_backend_plan_follows_the_facts():
    run_, skip = gpu_check.backend_plan(FACTS, "cuda")
    assert run_ == ["torch", "torch-amp", "torch-compile"]
    assert set(skip) == {"onnxruntime", "onnxruntime-trt", "tensorrt", "keras"}
    assert "only onnxruntime-gpu has it" in skip["onnxruntime"] and "resnet50" in skip["keras"]
    gpu = dict(FACTS, ort_providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
               tensorrt="10.13.0")
    run_, skip = gpu_check.backend_plan(gpu, "cuda")
    assert run_ == ["torch", "torch-amp", "torch-compile", "onnxruntime", "onnxruntime-trt", "tensorrt"]
    assert set(skip) == {"keras"}
    run_, skip = gpu_check.backend_plan(FACTS, "cuda", compile_wanted=False)
    assert "torch-compile" not in run_ and skip["torch-compile"] == "--no-compile"
    run_, skip = gpu_check.backend_plan(dict(FACTS, c_compiler=None), "cuda")
    # the C compiler is looked up when the facts have none; here (CI, dev machines) cc exists
    assert ("torch-compile" in run_) == bool(shutil.which("cc") or shutil.which("gcc"))
    run_, skip = gpu_check.backend_plan(FACTS, "cpu")
    assert run_ == ["torch", "torch-amp"] and "cuda only" in skip["torch-compile"]


def test_plan_exports_onnx_only_for_a_backend_that_runs_it(tmp_path):
    a = gpu_check.parse_args(["--models", "smallcnn,densenet121", "--batch-sizes", "1,64"])
    steps = gpu_check.plan(a, ["torch", "torch-amp", "torch-compile"], tmp_path / "w", tmp_path / "o")
    names = [s.name for s in steps]
    assert not any(n.startswith("export") for n in names)
    assert names[:5] == ["prepare data and checkpoints", "eval smallcnn", "eval densenet121", "bench smallcnn",
                         "bench densenet121"]
    compiled = [s for s in steps if "torch-compile" in s.name]
    assert all(s.optional for s in compiled) and not any(s.optional for s in steps if s not in compiled)
    assert [s.name for s in compiled[:2]] == ["bench smallcnn torch-compile fp16", "bench smallcnn torch-compile bf16"]
    steps = gpu_check.plan(a, ["torch", "onnxruntime", "tensorrt"], tmp_path / "w", tmp_path / "o")
    exports = [s for s in steps if s.name.startswith("export")]
    assert [s.name for s in exports] == ["export smallcnn", "export densenet121"]
    assert exports[0].argv[-3:] == ["--engine", "--max-batch", "64"]


def test_summary_reads_bench_rows(tmp_path):
    row = {"model": "smallcnn", "backend": "torch-amp", "variant": "bf16", "batch_size": 1, "throughput_ips": 50.0,
           "latency_ms": {"p50": 20.0, "p99": 30.0}, "device_only_ms": {"p50": 1.5}, "first_call_s": 0.25}
    big = dict(row, batch_size=256, throughput_ips=9000.0, latency_ms={"p50": 28.0, "p99": 31.0})
    (tmp_path / "bench-x.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(big) + "\n")
    lines = gpu_check.summary(tmp_path)
    assert lines[1].split() == ["smallcnn", "torch-amp", "bf16", "20.00", "30.00", "1.500", "9000", "256", "0.2"]


@pytest.mark.slow
def test_cpu_rehearsal_runs_the_whole_flow(tmp_path):
    """The same flow on the CPU, tiny: data, a trained smallcnn, eval and bench rows the report reads."""
    out = tmp_path / "results"
    r = run("--device", "cpu", "--models", "smallcnn", "--batch-sizes", "1,2", "--seconds", "0", "--warmup", "1",
            "--train-epochs", "1", "--train-images", "4", "--test-images", "6", "--bootstrap", "100",
            "--out", str(out), "--work", str(tmp_path / "work"), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "skip torch-compile: torch-compile runs on cuda only" in r.stdout
    record = json.loads((out / "steps.json").read_text())
    assert [s["status"] for s in record["steps"]] == ["ok", "ok", "ok"]
    from lungedge.report import load_results

    rows = load_results([out])  # validated as the report reads them
    bench = [x for x in rows if x["kind"] == "bench"]
    assert {(x["backend"], x["variant"], x["batch_size"]) for x in bench} == {
        (b, p, n) for b, p in [("torch", "fp32"), ("torch-amp", "fp32"), ("torch-amp", "bf16")] for n in (1, 2)}
    amp = [x for x in bench if x["backend"] == "torch-amp"]
    assert all(x["memory_format"] == "channels_last" and x["first_call_s"] > 0 for x in amp)
    assert {x["autocast"] for x in amp} == {None, "bfloat16"}
    evals = [x for x in rows if x["kind"] == "eval"]
    assert {(x["backend"], x["variant"]) for x in evals} == {("torch", "fp32"), ("torch-amp", "fp32"),
                                                             ("torch-amp", "bf16")}
    assert all(x["images"] == 6 or len(x.get("labels", [])) == 6 for x in evals)
