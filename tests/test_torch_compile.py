"""The PyTorch fast path (torch-amp, torch-compile): plain logic, the CPU path for real, CUDA parts skipped
without a GPU; and the torch runners put torch's thread count back when they close."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lungedge.errors import LungedgeError
from lungedge.runners import BACKENDS, open_runner
from lungedge.runners.discover import jobs_for_model, resolve
from lungedge.runners.torch_compile import (CUDAGRAPH_MAX_BATCH, autocast_dtype, compile_mode,
                                            compile_unavailable)

CLASSES = ["benign", "malignant", "normal"]


@pytest.fixture(scope="module")
def smallcnn_run(tmp_path_factory):
    """runs/smallcnn/r/best.pth with random weights (no training needed for these checks)."""
    from lungedge.models import checkpoint as ckpt
    from lungedge.models.registry import build_model, get_spec

    runs = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    built = build_model("smallcnn", 3, "none", "full", 64, None)
    meta = ckpt.make_meta(get_spec("smallcnn"), CLASSES, built.preprocessing, "full", None, 0, [], build=built.build)
    path = ckpt.save_torch_checkpoint(runs / "smallcnn" / "r" / "best.pth", built.model, meta)
    return runs, path


def test_plain_logic():
    assert [autocast_dtype(p) for p in ("fp32", "fp16", "bf16")] == [None, "float16", "bfloat16"]
    with pytest.raises(LungedgeError, match="not int8"):
        autocast_dtype("int8")
    assert compile_mode("cuda", 1) == compile_mode("cuda", CUDAGRAPH_MAX_BATCH) == "reduce-overhead"
    assert compile_mode("cuda", CUDAGRAPH_MAX_BATCH + 1) == compile_mode("cpu", 1) == "default"
    assert "cuda only" in compile_unavailable("cpu")
    assert compile_unavailable("cuda", "3.5.0", "/usr/bin/cc") is None


def test_registry_entries():
    amp, comp = BACKENDS["torch-amp"], BACKENDS["torch-compile"]
    assert amp.precisions_on("cpu") == ("fp32", "bf16") and amp.precisions_on("cuda") == ("fp32", "fp16", "bf16")
    assert comp.devices == ("cuda",) and comp.precisions_on("cuda") == ("fp32", "fp16", "bf16")
    assert not amp.default and not comp.default  # a bare .pth still opens with plain torch


def test_default_plans_add_the_fast_path_on_cuda_only(smallcnn_run, tmp_path):
    runs, _ = smallcnn_run
    cpu = jobs_for_model("smallcnn", "cpu", runs=runs, engines=tmp_path)
    assert [(j.backend, j.precision) for j in cpu] == [("torch", "fp32")]  # CPU plans as before
    named = resolve(["smallcnn"], device="cpu", backends=["torch-amp"], runs=runs, engines=tmp_path)
    assert [(j.backend, j.precision) for j in named] == [("torch-amp", "fp32"), ("torch-amp", "bf16")]
    cuda = [(j.backend, j.precision) for j in jobs_for_model("smallcnn", "cuda", runs=runs, engines=tmp_path)]
    assert [b for b in cuda if b[0] == "torch-amp"] == [("torch-amp", p) for p in ("fp32", "fp16", "bf16")]
    assert (("torch-compile", "bf16") in cuda) == BACKENDS["torch-compile"].available()


def test_torch_amp_on_cpu_agrees_with_torch(smallcnn_run):
    _, ckpt = smallcnn_run
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    with open_runner(ckpt, "torch", "cpu") as r:
        ref = r.infer(x)
    with open_runner(ckpt, "torch-amp", "cpu") as r:
        assert r.includes == "forward (FP32, channels_last)"
        np.testing.assert_allclose(r.infer(x), ref, rtol=1e-4, atol=1e-5)
        assert r.timing_facts(4, 3) == {"autocast": None, "memory_format": "channels_last", "compiled": False}
    with open_runner(ckpt, "torch-amp", "cpu", "bf16") as r:
        out = r.infer(x)
        assert out.dtype == np.float32 and r.timing_facts(4, 3)["autocast"] == "bfloat16"
    np.testing.assert_allclose(out, ref, rtol=0.1, atol=0.05 * np.abs(ref).max())  # bf16: ~3 significant digits


def test_fp16_and_compile_are_refused_on_cpu(smallcnn_run):
    _, ckpt = smallcnn_run
    with pytest.raises(LungedgeError, match="runs fp16 on cuda only, not on cpu"):
        open_runner(ckpt, "torch-amp", "cpu", "fp16")
    with pytest.raises(LungedgeError, match="backend torch-compile runs on cuda only, not cpu"):
        open_runner(ckpt, "torch-compile", "cpu")


@pytest.mark.parametrize("backend", ["torch", "torch-amp"])
def test_runner_puts_torch_threads_back(smallcnn_run, backend):
    _, ckpt = smallcnn_run
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    with open_runner(ckpt, backend, "cpu", threads=want) as r:
        assert torch.get_num_threads() == want and r.threads_used() == want
        r.infer(np.zeros((1, 3, 64, 64), np.float32))
    assert torch.get_num_threads() == before


def test_bench_rows_carry_first_call_and_how_it_ran(smallcnn_run, tmp_path):
    from lungedge.bench import run_bench

    runs, _ = smallcnn_run
    jobs = resolve(["smallcnn"], device="cpu", backends=["torch-amp"], precisions=["bf16"], runs=runs,
                   engines=tmp_path)
    rows, path = run_bench(jobs, [2], warmup=0, iters=2, seconds=None, preprocessing=False, out=tmp_path)
    (row,) = rows
    assert row["backend"] == "torch-amp" and row["precision"] == "bf16" and row["first_call_s"] > 0
    assert row["autocast"] == "bfloat16" and row["memory_format"] == "channels_last" and "device_only_ms" not in row
    assert path.is_file()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("backend", ["torch-amp", "torch-compile"])
def test_cuda_fast_path_agrees_with_fp32(smallcnn_run, backend):
    if backend == "torch-compile" and compile_unavailable("cuda"):
        pytest.skip(compile_unavailable("cuda"))
    _, ckpt = smallcnn_run
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    with open_runner(ckpt, "torch", "cuda") as r:
        ref = r.infer(x)
    for precision in ("fp32", "fp16", "bf16"):
        with open_runner(ckpt, backend, "cuda", precision) as r:
            out = r.infer(x)
            np.testing.assert_allclose(r.infer(x), out, rtol=1e-3, atol=1e-3)  # replays give the same answer
            facts = r.timing_facts(4, 3)
            assert facts["device_only_ms"]["p50"] > 0
        tol = 1e-3 if precision == "fp32" else 0.05
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())
