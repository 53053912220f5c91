"""Start-up time of the CLI: `lungedge --help` and `lungedge data --help`.

Measured as wall time of a fresh interpreter, median of N runs, printed next to the
time of a bare `python -c pass` and of `python -c "import torch"` measured in the same
run (so the ratio shows what lazy imports save).

    .venv/bin/python benchmarks/bench_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def timed(argv: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    py = sys.executable
    cli = [py, "-c", "from lungedge.cli import run; run()"]
    rows = [
        ("python -c pass", timed([py, "-c", "pass"], args.runs)),
        ("lungedge --help", timed(cli + ["--help"], args.runs)),
        ("lungedge data --help", timed(cli + ["data", "--help"], args.runs)),
        ("python -c 'import torch'", timed([py, "-c", "import torch"], max(3, args.runs // 5))),
    ]
    torch_time = rows[-1][1]
    print(f"{'command':28s} {'median s':>9s} {'vs import torch':>16s}")
    for name, t in rows:
        print(f"{name:28s} {t:9.3f} {t / torch_time:15.2f}x")
    ok = rows[1][1] < 0.5 and rows[2][1] < 0.5
    print(f"target: --help under 0.5 s: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
