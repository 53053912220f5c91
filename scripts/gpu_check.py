"""The GPU check (issue #15): one command for a bare GPU machine, run as ``bash scripts/gpu_check.sh``.

It needs the source checkout and a ``python3`` with torch, torchvision, onnx, onnxruntime, numpy,
pillow, scikit-learn, matplotlib, typer and rich -- no TensorFlow, no TensorRT, no pip install,
no network, nothing carried. Everything else it makes on the spot, in a work folder:

1. facts: ``nvidia-smi`` (GPU, driver, memory, clocks, power), library versions, which backends run
   on cuda here and, for each one that does not, why;
2. data: synthetic CT-like slices (``lungedge.synthetic``) -- a training set and a separate test set;
3. models: smallcnn trained for a few epochs on the GPU (``lungedge train --device cuda``; random
   init if that fails), GoogLeNet, Inception v3 and DenseNet121 with random weights (their accuracy
   is chance: only latency and FP16/BF16 agreement with FP32 mean anything for them);
4. ONNX files (``lungedge export``), only when something here runs ONNX on cuda (onnxruntime-gpu or
   TensorRT), plus TensorRT engines when TensorRT is installed;
5. ``lungedge eval --device cuda`` and ``lungedge bench --device cuda`` per model: eager PyTorch
   (torch FP32/FP16, torch-amp FP32/FP16/BF16 with channels_last) over batch sizes up to 256, then
   the compiled backend (torch-compile) while the time budget lasts.

Results are the JSON-lines files of ``lungedge bench``/``eval`` under ``--out`` (plus ``steps.json``:
the facts and every step's outcome, and ``logs/``, one log per step); ``lungedge report --results
results --results OUT`` merges them with CPU rows. Exit codes: 0 every step ran or was skipped with a reason; 1 a step failed;
2 bad arguments; 4 no NVIDIA GPU here (``--dry-run`` prints the plan without one).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 4
MODELS = ("googlenet", "inception_v3", "densenet121", "smallcnn")
SMI_FIELDS = ("name", "driver_version", "memory.total", "compute_cap", "clocks.max.sm", "power.limit",
              "pcie.link.gen.max", "pcie.link.width.max")


class UsageError(Exception):
    """Bad arguments: one line, exit 2."""


@dataclass
class Step:
    """One thing the check does: a ``lungedge`` command (or an in-process action) with its outcome."""

    name: str
    argv: list = field(default_factory=list)  # lungedge arguments ([] for in-process steps)
    kind: str = "cli"  # cli | prepare
    optional: bool = False  # runs only while the time budget lasts (the compiled backend)
    status: str = "planned"  # planned | ok | failed | skipped
    reason: str = ""
    seconds: float = 0.0


# --- arguments ---------------------------------------------------------------------------------------

def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{what} must be positive integers, got {text!r}")
    return vals


def _names(text: str, allowed, what: str) -> list[str]:
    vals = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [v for v in vals if v not in allowed]
    if not vals or bad:
        raise UsageError(f"{what}: unknown {', '.join(bad) or repr(text)} (choose from {', '.join(allowed)})")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="results folder (default: $OUT, else results/gpu-<host>-<UTC time>)")
    p.add_argument("--work", default=None, help="work folder for data, runs and ONNX files (default: a temporary "
                   "folder, removed at the end)")
    p.add_argument("--models", default=",".join(MODELS), help="comma list (default: %(default)s)")
    p.add_argument("--batch-sizes", default="1,8,32,128,256", help="eager bench batch sizes (default: %(default)s)")
    p.add_argument("--compile-batch-sizes", default="1,256", help="torch-compile bench batch sizes; each one "
                   "compiles once (default: %(default)s)")
    p.add_argument("--compile-precisions", default="fp16,bf16", help="torch-compile precisions (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch-compile backend")
    p.add_argument("--seconds", type=float, default=0.5, help="time each measurement this long (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (default: %(default)s)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check; optional steps that "
                   "would start later are skipped, running ones stopped (default: %(default)s)")
    p.add_argument("--train-epochs", type=int, default=6, help="smallcnn training epochs (default: %(default)s)")
    p.add_argument("--train-images", type=int, default=60, help="synthetic training images per class "
                   "(default: %(default)s)")
    p.add_argument("--test-images", type=int, default=48, help="synthetic test images in all (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=200, help="eval bootstrap replicates (default: %(default)s)")
    p.add_argument("--device", default="cuda", help="cuda; 'cpu' rehearses the same flow on the CPU (tests)")
    p.add_argument("--dry-run", action="store_true", help="print the facts and the plan, run nothing")
    p.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.models = _names(a.models, MODELS, "--models")
    a.batch_sizes = _ints(a.batch_sizes, "--batch-sizes")
    a.compile_batch_sizes = _ints(a.compile_batch_sizes, "--compile-batch-sizes")
    a.compile_precisions = _names(a.compile_precisions, ("fp32", "fp16", "bf16"), "--compile-precisions")
    if a.device not in ("cuda", "cpu"):
        raise UsageError(f"--device must be cuda or cpu, got {a.device!r}")
    if a.device == "cpu":  # the CPU runs fp32 and bf16 only
        a.compile_precisions = [p for p in a.compile_precisions if p != "fp16"] or ["fp32"]
    for name in ("seconds", "budget"):
        if not getattr(a, name) >= 0:
            raise UsageError(f"--{name} must be 0 or more, got {getattr(a, name)}")
    for name in ("train_epochs", "train_images", "bootstrap"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.test_images < 3:
        raise UsageError(f"--test-images must be at least 3 (one per class), got {a.test_images}")
    if a.bootstrap < 100:
        raise UsageError(f"--bootstrap must be at least 100, got {a.bootstrap}")
    return a


# --- facts ------------------------------------------------------------------------------------------------

def nvidia_smi() -> tuple[list[dict] | None, str]:
    """(one dict per GPU from nvidia-smi, "") or (None, why there is no NVIDIA GPU here)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "nvidia-smi is not on PATH"
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nvidia-smi did not answer ({exc})"
    if out.returncode != 0:
        return None, f"nvidia-smi failed: {(out.stdout + out.stderr).strip().splitlines()[-1:] or ['?']}"
    gpus = [dict(zip(SMI_FIELDS, (c.strip() for c in line.split(","))))
            for line in out.stdout.splitlines() if line.strip()]
    return (gpus, "") if gpus else (None, "nvidia-smi lists no GPU")


def module_version(name: str) -> str | None:
    from importlib import metadata

    for dist in (name, name.replace("_", "-")):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def library_facts() -> dict:
    """Versions and capabilities, read without importing the heavy libraries where possible."""
    facts = {"python": platform.python_version(), "executable": sys.executable, "host": platform.node(),
             "cpu_cores": os.cpu_count(), "c_compiler": shutil.which("cc") or shutil.which("gcc")}
    for name in ("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "triton", "tensorrt",
                 "tensorflow", "keras", "numpy"):
        facts[name] = module_version(name)
    facts["ort_providers"] = []
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        facts["ort_providers"] = list(onnxruntime.get_available_providers())
    if importlib.util.find_spec("torch") is not None:
        import torch

        facts["torch_cuda"] = torch.version.cuda
        facts["cuda_available"] = bool(torch.cuda.is_available())
        facts["cudnn"] = torch.backends.cudnn.version() if facts["cuda_available"] else None
        if facts["cuda_available"]:
            facts["cuda_device"] = torch.cuda.get_device_name(0)
            facts["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return facts


def backend_plan(facts: dict, device: str, compile_wanted: bool = True) -> tuple[list[str], dict[str, str]]:
    """(backends to run on ``device``, {backend: why it is skipped}) from the facts alone."""
    run, skip = ["torch", "torch-amp"], {}
    if compile_wanted:
        from lungedge.runners.torch_compile import compile_unavailable

        why = compile_unavailable(device, facts.get("triton"), facts.get("c_compiler"))
        if why:
            skip["torch-compile"] = why
        else:
            run.append("torch-compile")
    else:
        skip["torch-compile"] = "--no-compile"
    providers = facts.get("ort_providers") or []
    if device == "cuda":
        if "CUDAExecutionProvider" in providers:
            run.append("onnxruntime")
        else:
            skip["onnxruntime"] = (f"onnxruntime {facts.get('onnxruntime') or '(absent)'} has no CUDAExecutionProvider "
                                   "(only onnxruntime-gpu has it)")
        if "TensorrtExecutionProvider" in providers:
            run.append("onnxruntime-trt")
        else:
            skip["onnxruntime-trt"] = "onnxruntime has no TensorrtExecutionProvider"
        if facts.get("tensorrt"):
            run.append("tensorrt")
        else:
            skip["tensorrt"] = "TensorRT is not installed (no 'tensorrt' Python package)"
    if not facts.get("keras"):
        skip["keras"] = "keras/TensorFlow are not installed: Keras models (resnet50) are not part of this check"
    return run, skip


# --- the plan ---------------------------------------------------------------------------------------------

def plan(a: argparse.Namespace, backends: list[str], work: Path, out: Path) -> list[Step]:
    """The steps, in order: prepare, exports (when something runs ONNX here), eval, eager bench, compiled bench."""
    common = ["--runs", str(work / "runs"), "--engines", str(work / "engines"), "--out", str(out)]
    steps = [Step("prepare data and checkpoints", kind="prepare")]
    onnx_backends = [b for b in backends if b in ("onnxruntime", "onnxruntime-trt", "tensorrt")]
    if onnx_backends:
        for m in a.models:
            argv = ["export", m, "--runs", str(work / "runs"), "--out", str(work / "engines"), "--fp16",
                    "--data", str(work / "test")]
            if "tensorrt" in backends:
                argv += ["--engine", "--max-batch", str(max(a.batch_sizes))]
            steps.append(Step(f"export {m}", argv))
    eager = [b for b in backends if b != "torch-compile"]
    for m in a.models:
        steps.append(Step(f"eval {m}", ["eval", m, "--device", a.device, "--backend", ",".join(eager),
                                        "--data", str(work / "test"), "--bootstrap", str(a.bootstrap), *common]))
    bench = ["--seconds", str(a.seconds), "--warmup", str(a.warmup), "--no-preprocessing"]
    for m in a.models:
        steps.append(Step(f"bench {m}", ["bench", m, "--device", a.device, "--backend", ",".join(eager),
                                         "--batch-sizes", ",".join(map(str, a.batch_sizes)), *bench, *common]))
    if "torch-compile" in backends:
        # cheapest first: each (model, precision) is its own process, so a stop at the budget loses one
        order = sorted(a.models, key=lambda m: ("smallcnn", "googlenet", "densenet121", "inception_v3").index(m))
        for m in order:
            for p in a.compile_precisions:
                steps.append(Step(f"bench {m} torch-compile {p}",
                                  ["bench", m, "--device", a.device, "--backend", "torch-compile", "--precision", p,
                                   "--batch-sizes", ",".join(map(str, a.compile_batch_sizes)), *bench, *common],
                                  optional=True))
        steps.append(Step(f"eval {order[0]} torch-compile",
                          ["eval", order[0], "--device", a.device, "--backend", "torch-compile",
                           "--data", str(work / "test"), "--bootstrap", str(a.bootstrap), *common], optional=True))
    return steps


# --- doing it ---------------------------------------------------------------------------------------------

def prepare(a: argparse.Namespace, work: Path, out: Path, log) -> None:
    """Synthetic train/test images, smallcnn trained here (random init if that fails), the others random."""
    from lungedge import synthetic

    per_class_test = max(1, a.test_images // len(synthetic.CLASSES))
    synthetic.generate(work / "train", per_class=a.train_images, size=128, seed=1)
    synthetic.generate(work / "test", per_class=per_class_test, size=256, seed=2)
    log(f"data: {a.train_images} training and {per_class_test} test images per class (synthetic, "
        f"classes {', '.join(synthetic.CLASSES)}) in {work}")
    for m in a.models:
        if m == "smallcnn":
            argv = ["train", "smallcnn", "--data", str(work / "train"), "--device", a.device, "--weights", "none",
                    "--epochs", str(a.train_epochs), "--out", str(work / "runs"), "--run-name", "gpucheck"]
            t0 = time.perf_counter()
            rc, tail = run_lungedge(a.python, argv, out / "logs" / "00-train-smallcnn.log", timeout=240)
            if rc == 0:
                log(f"smallcnn: trained {a.train_epochs} epochs on {a.device} in {time.perf_counter() - t0:.0f} s "
                    f"({tail[-1] if tail else ''})")
                continue
            log(f"note: training smallcnn on {a.device} failed (exit {rc}: {tail[-1] if tail else '?'}); "
                "using random weights")
        path = random_checkpoint(m, work / "runs")
        log(f"{m}: random-init checkpoint {path.name} ({path.stat().st_size / 2**20:.1f} MiB)")


def random_checkpoint(model: str, runs: Path) -> Path:
    """A lungedge checkpoint of MODEL with random weights, as a training run would lay it out."""
    from lungedge import synthetic
    from lungedge.models import checkpoint as ckpt
    from lungedge.models.registry import build_model, get_spec

    spec = get_spec(model)
    built = build_model(model, len(synthetic.CLASSES), "none", "full", None, None)
    meta = ckpt.make_meta(spec, synthetic.CLASSES, built.preprocessing, "full", None, 0, [], build=built.build,
                          note="random weights made by scripts/gpu_check.py: accuracy is chance")
    return ckpt.save_torch_checkpoint(runs / model / "random" / "best.pth", built.model, meta)


def run_lungedge(python: str, argv: list, logfile: Path, timeout: float | None) -> tuple[int, list[str]]:
    """Run ``python -m lungedge ARGV`` from the checkout, output into ``logfile``; (exit code, last lines)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                                    if os.environ.get("PYTHONPATH") else ""))
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w", encoding="utf-8") as fh:
        fh.write("$ lungedge " + " ".join(argv) + "\n")
        fh.flush()
        proc = subprocess.Popen([python, "-m", "lungedge", *argv], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = 124
    lines = [ln.rstrip() for ln in logfile.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return rc, lines[-6:]


def execute(steps: list[Step], a: argparse.Namespace, work: Path, out: Path, started: float, log) -> None:
    for i, s in enumerate(steps):
        left = a.budget - (time.monotonic() - started)
        if s.optional and left < 30:
            s.status, s.reason = "skipped", f"time budget ({a.budget:.0f} s) spent"
            log(f"skip {s.name}: {s.reason}")
            continue
        log(f"== {s.name}")
        t0 = time.monotonic()
        if s.kind == "prepare":
            try:
                prepare(a, work, out, log)
                s.status = "ok"
            except Exception as exc:  # noqa: BLE001 - said in one line; nothing else can run
                s.status, s.reason = "failed", f"{type(exc).__name__}: {exc}"
        else:
            rc, tail = run_lungedge(a.python, s.argv, out / "logs" / f"{i:02d}-{s.name.replace(' ', '-')}.log",
                                    timeout=max(30.0, left) if s.optional else max(60.0, left + 60))
            if rc == 0:
                s.status, s.reason = "ok", next((t for t in reversed(tail) if t.startswith("wrote")), "")
            elif rc == 124:
                s.status = "skipped" if s.optional else "failed"
                s.reason = f"stopped at the time budget ({a.budget:.0f} s)"
            else:
                s.status, s.reason = "failed", f"exit {rc}: " + " | ".join(tail[-3:])
        s.seconds = round(time.monotonic() - t0, 1)
        log(f"   {s.status} ({s.seconds:.0f} s){': ' + s.reason if s.reason else ''}")
        if s.kind == "prepare" and s.status != "ok":
            for rest in steps[i + 1:]:
                rest.status, rest.reason = "skipped", "preparation failed"
            return


def summary(out: Path) -> list[str]:
    """Per model, backend and precision: batch-1 p50/p99 (with and without copies) and the best throughput."""
    rows = []
    for f in sorted(out.glob("bench-*.jsonl")):
        rows += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["backend"], r["variant"]), []).append(r)
    lines = [f"{'model':13} {'backend':14} {'prec':5} {'b1 p50 ms':>9} {'b1 p99':>8} {'b1 dev p50':>10} "
             f"{'best img/s':>10} {'at b':>5} {'1st call s':>10}"]
    for (m, b, v), rs in groups.items():
        one = next((r for r in rs if r["batch_size"] == 1), None)
        best = max(rs, key=lambda r: r.get("throughput_ips") or 0)
        dev = ((one or {}).get("device_only_ms") or {}).get("p50")
        comp = max((r.get("first_call_s") or 0) for r in rs) if any("first_call_s" in r for r in rs) else None
        lines.append(f"{m:13} {b:14} {v:5} {one['latency_ms']['p50'] if one else float('nan'):9.2f} "
                     f"{one['latency_ms']['p99'] if one else float('nan'):8.2f} "
                     f"{dev if dev is not None else float('nan'):10.3f} {best.get('throughput_ips') or 0:10.0f} "
                     f"{best['batch_size']:5d} {comp if comp is not None else float('nan'):10.1f}")
    return lines


def main(argv=None) -> int:
    started = time.monotonic()
    try:
        a = parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def log(line: str) -> None:
        print(line, flush=True)

    gpus, why = nvidia_smi()
    if a.device == "cuda" and gpus is None and not a.dry_run:
        print(f"error: no NVIDIA GPU here ({why}); run this on the GPU machine, or --dry-run to see the plan",
              file=sys.stderr)
        return EXIT_NO_GPU
    facts = library_facts()
    for g in gpus or []:
        log("gpu: " + ", ".join(f"{k} {v}" for k, v in g.items()))
    if gpus is None:
        log(f"gpu: none ({why})")
    log("versions: " + ", ".join(f"{k} {facts[k]}" for k in ("python", "torch", "torch_cuda", "cudnn", "torchvision",
                                                              "onnx", "onnxruntime", "triton", "tensorrt")
                                 if k in facts))
    log(f"onnxruntime providers: {', '.join(facts['ort_providers']) or 'none'}; C compiler: "
        f"{facts['c_compiler'] or 'none'}; {facts['cpu_cores']} CPU cores")
    if a.device == "cuda" and not facts.get("cuda_available") and not a.dry_run:
        print(f"error: no NVIDIA GPU here (nvidia-smi sees {len(gpus or [])}, but PyTorch {facts.get('torch')} "
              f"has no CUDA: built for CUDA {facts.get('torch_cuda')})", file=sys.stderr)
        return EXIT_NO_GPU
    backends, skipped = backend_plan(facts, a.device, not a.no_compile)
    log(f"backends on {a.device}: {', '.join(backends)}")
    for b, reason in skipped.items():
        log(f"skip {b}: {reason}")
    out = Path(a.out) if a.out else ROOT / "results" / f"gpu-{platform.node() or 'host'}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="lungedge-gpucheck-"))
    steps = plan(a, backends, work, out)
    if a.dry_run:
        log(f"plan ({len(steps)} steps, budget {a.budget:.0f} s; optional steps run while it lasts):")
        for s in steps:
            log(f"  {'(optional) ' if s.optional else ''}{s.name}" + (f": lungedge {' '.join(s.argv)}" if s.argv else ""))
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
        return EXIT_OK
    out.mkdir(parents=True, exist_ok=True)
    try:
        execute(steps, a, work, out, started, log)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    record = {"format": "lungedge-gpu-check/1", "gpus": gpus, "facts": facts, "backends": backends,
              "skipped_backends": skipped, "args": {k: v for k, v in vars(a).items() if k != "python"},
              "steps": [asdict(s) for s in steps], "seconds": round(time.monotonic() - started, 1)}
    (out / "steps.json").write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    log("")
    for line in summary(out):
        log(line)
    failed = [s for s in steps if s.status == "failed"]
    log(f"\n{sum(s.status == 'ok' for s in steps)} steps ok, {len(failed)} failed, "
        f"{sum(s.status == 'skipped' for s in steps)} skipped, in {record['seconds']:.0f} s; results in {out}")
    log(f"merge with the CPU rows: PYTHONPATH=. python3 -m lungedge report --results results --results {out}")
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
