"""Time one forward + backward pass of the NumPy MLP kernel against PyTorch autograd on the CPU.

    .venv/bin/python benchmarks/bench_mlp.py [--batches 4 1024 1048576] [--threads N] [--json]

Both sides compute ŷ, L = ½ Σ (ŷ − y)² and all six batch gradients for the 3-4-4-1 network
(NumPy: ``lungedge.mlp.forward`` + ``backward``; torch: the same graph built with
``lungedge.mlp_backends.torch_forward`` + ``L.backward()``, gradients reset with
``grad = None`` each time). Inputs are uniform in [-3, 3], weights from seed 0.

Threads: NumPy's matrix products run on OpenBLAS with its default thread count (the
number of cores, unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS say otherwise; read
with threadpoolctl when it is installed); its element-wise ops are single-threaded.
torch.set_num_threads is set to that same number. ``--threads N`` sets both to N
(NumPy's through threadpoolctl); ``--threads 1`` is the fair choice on a busy machine,
where a descheduled worker thread stalls a parallel region for a whole time slice. Each case is warmed up, then NumPy and
torch take turns ``repeats`` times (timed with time.perf_counter, so a burst of load
hits both alike); the table gives each median, and the ratio numpy/torch is from the
same run (< 1: NumPy is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from lungedge import mlp  # noqa: E402

REPEATS = {4: 500, 1024: 300, 1 << 20: 15}


def numpy_threads() -> tuple[int, str]:
    try:
        from threadpoolctl import threadpool_info

        blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if blas:
            return int(blas[0]["num_threads"]), f"{blas[0].get('internal_api', 'blas')} via threadpoolctl"
    except ImportError:
        pass
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            return int(os.environ[var]), var
    return os.cpu_count() or 1, "os.cpu_count()"


def median_seconds(fns, repeats: int, warmup: int = 3) -> list[float]:
    """Median wall time of each function; they take turns, so a burst of load hits both alike."""
    from lungedge.timing import alternate

    return [statistics.median(ts) for ts in alternate(fns, repeats, warmup)]


def bench_case(dtype: str, n: int, repeats: int) -> dict:
    import torch

    from lungedge import mlp_backends

    rng = np.random.default_rng(1)
    p = mlp.init_params(0, dtype)
    X = rng.uniform(-3, 3, size=(n, 3)).astype(dtype)
    y = rng.uniform(-1, 1, size=n).astype(dtype)

    def numpy_step():
        _, cache = mlp.forward(p, X)
        mlp.backward(p, cache, y)

    t = {k: torch.tensor(p[k], requires_grad=True) for k in mlp.NAMES}
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def torch_step():
        for v in t.values():
            v.grad = None
        mlp_backends.torch_loss(mlp_backends.torch_forward(t, Xt), yt).backward()

    # Same answer before timing anything.
    _, g = mlp.gradients(p, X, y)
    torch_step()
    tol = 1e-3 if dtype == "float32" else 1e-8
    scale = max(float(np.abs(g[k]).max()) for k in mlp.NAMES)
    diff = max(float(np.abs(g[k] - t[k].grad.numpy()).max()) for k in mlp.NAMES)
    assert diff <= tol * max(1.0, scale), (dtype, n, diff, scale)

    tn, tt = median_seconds([numpy_step, torch_step], repeats)
    return {"dtype": dtype, "batch": n, "repeats": repeats, "numpy_s": tn, "torch_s": tt, "ratio": tn / tt}


def fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=list(REPEATS))
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both NumPy's BLAS (via threadpoolctl) and torch [default: NumPy's own BLAS count]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    nthreads, how = numpy_threads()
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads, user_api="blas")
        nthreads, how = args.threads, "--threads"
    torch.set_num_threads(nthreads)
    rows = [bench_case(dt, n, REPEATS.get(n, 50)) for dt in ("float64", "float32") for n in args.batches]
    info = {"numpy": np.__version__, "torch": torch.__version__, "numpy_blas_threads": nthreads,
            "numpy_threads_from": how, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps({"info": info, "rows": rows}, indent=1))
        return 0
    print(f"numpy {info['numpy']} (BLAS threads {nthreads}, from {how}), torch {info['torch']} "
          f"(threads {info['torch_threads']}), {info['cpus']} CPUs; forward + backward, median")
    print()
    print("| dtype | batch | repeats | NumPy | PyTorch | NumPy / PyTorch |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['batch']:,} | {r['repeats']} | {fmt_time(r['numpy_s'])} | "
              f"{fmt_time(r['torch_s'])} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
