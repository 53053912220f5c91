"""Which artifacts to run for ``bench`` / ``eval`` / ``predict MODEL``: a list of :class:`Job`.

A model's source checkpoint is the best checkpoint of its latest run (``runs/<model>/*/best.*``),
its ONNX files are ``engines/<model>/<model>.{fp32,fp16,int8,int8-cpu}.onnx`` and its engines
``engines/<model>/<model>.<precision>.b<N>.<gpu>.trt<ver>.engine``. Which backend runs which of
them comes from the backend table (:mod:`.registry`), so a new backend appears here by registering.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LungedgeError, check_choice
from .artifact import artifact_info, is_kind
from .registry import BACKENDS, PRECISIONS, default_backend, get_backend


@dataclass(frozen=True)
class Job:
    """One thing to run: an artifact through a backend on a device, in a precision."""

    artifact: Path
    backend: str
    device: str
    precision: str  # fp32 | fp16 | int8
    variant: str  # fp32 | fp16 | int8 | int8-cpu (which file)
    model: str


def parse_list(text: str | None, allowed, what: str) -> list[str] | None:
    """``"a,b"`` -> ["a", "b"], each checked against ``allowed``; None stays None."""
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        check_choice(str(text), allowed, what)
    return [check_choice(t, allowed, what) for t in items]


def source_checkpoint(model: str, runs) -> Path | None:
    from ..export import resolve_checkpoint

    try:
        return resolve_checkpoint(model, None, runs)
    except LungedgeError:
        return None


def _unfinished_only(model: str, runs) -> str:
    """"; the training of ... did not finish ..." when MODEL's runs are all unfinished (else "")."""
    from ..export.source import UnfinishedRun, resolve_checkpoint

    try:
        resolve_checkpoint(model, None, runs)
    except UnfinishedRun as exc:
        run = exc.checkpoint.parent
        return (f"; the training of {run} did not finish (status {exc.status}), so it is not used by default: "
                f"finish it with 'lungedge train {model} --out {runs} --run-name {run.name} --resume', or name "
                f"{exc.checkpoint} instead of {model} to use its best epoch so far")
    except LungedgeError:
        pass
    return ""


_SHA_CACHE: dict = {}


def checkpoint_with_sha(model: str, runs, sha: str | None) -> Path | None:
    """The run checkpoint (best.* of any run of MODEL) whose SHA-256 is ``sha``: the source of an export."""
    from ..io import sha256_file

    if not sha:
        return None
    for p in sorted(Path(runs, model).glob("*/best.*"), key=lambda q: q.stat().st_mtime, reverse=True):
        if not is_kind(p, "checkpoint"):
            continue
        key = (str(p), p.stat().st_mtime_ns, p.stat().st_size)
        if key not in _SHA_CACHE:
            _SHA_CACHE[key] = sha256_file(p)
        if _SHA_CACHE[key] == sha:
            return p
    return None


def export_source(model: str, runs, engines) -> Path | None:
    """The checkpoint MODEL's ONNX files were exported from, if it is still under ``runs``."""
    files = onnx_files(model, engines)
    if not files:
        return None
    first = files.get("fp32") or next(iter(files.values()))
    try:
        sha = artifact_info(first).source_sha256
    except LungedgeError:
        return None
    return checkpoint_with_sha(model, runs, sha)


def onnx_files(model: str, engines) -> dict[str, Path]:
    folder = Path(engines) / model
    out = {}
    for variant in ("fp32", "fp16", "int8-cpu", "int8", "int8-ov"):
        p = folder / f"{model}.{variant}.onnx"
        if p.is_file():
            out[variant] = p
    return out


def engine_files(model: str, engines) -> dict[str, Path]:
    out = {}
    for p in sorted(Path(engines, model).glob(f"{model}.*.engine"), key=lambda q: q.stat().st_mtime):
        precision = p.name[len(model) + 1 :].split(".")[0]
        out[precision] = p  # the newest of each precision
    return out


def has_artifacts(model: str, runs, engines) -> bool:
    return bool(onnx_files(model, engines) or source_checkpoint(model, runs))


def exported_model(model: str, engines) -> bool:
    """True when ``engines/<model>/`` holds ONNX files lungedge exported under that name (a ``--custom``
    model's, or a registry model's): its lungedge metadata present and naming ``model``."""
    files = onnx_files(model, engines)
    if not files or Path(model).name != model:
        return False
    try:
        return artifact_info(files.get("fp32") or next(iter(files.values()))).architecture == model
    except LungedgeError:
        return False


def model_names(engines) -> list[str]:
    """The registry models, then the names of other models exported under ``engines`` (``--custom``)."""
    from ..models.registry import names

    folder = Path(engines)
    custom = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in names()
                    and exported_model(p.name, engines)) if folder.is_dir() else []
    return names() + custom


def models_with_artifacts(runs, engines) -> list[str]:
    return [m for m in model_names(engines) if has_artifacts(m, runs, engines)]


def onnx_variants(precision: str, device: str, include_trt_int8: bool = False) -> list[str]:
    """Which ONNX file serves a precision on a device: INT8 is the U8S8 int8-cpu file on the CPU (plus
    the S8S8 int8 file if asked), the S8S8 int8 file on CUDA."""
    if precision != "int8":
        return [precision]
    return (["int8-cpu"] + (["int8"] if include_trt_int8 else [])) if device == "cpu" else ["int8"]


def cpu_computes_bf16() -> bool:
    """True where this CPU has BF16 arithmetic (AMX or AVX-512 BF16): only there do plans hold BF16 rows."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def jobs_for_model(model: str, device: str = "cpu", backends=None, precisions=None, runs="runs",
                   engines="engines", include_trt_int8: bool = False) -> list[Job]:
    """Default jobs: every registered backend that runs on ``device`` (without ``backends``: those
    whose library is installed), over the artifacts of the kinds it runs: the source checkpoint (in
    each precision the backend runs on that device), each ONNX precision file, each engine."""
    from ..models.registry import REGISTRY

    files, engine = onnx_files(model, engines), engine_files(model, engines)
    if model in REGISTRY:
        framework = REGISTRY[model].framework
    else:  # a --custom model: known by its exported files alone
        framework = artifact_info(files.get("fp32") or next(iter(files.values()))).framework
    precisions = precisions or list(PRECISIONS)
    # the checkpoint the ONNX files came from, so that source and ONNX rows compare the same weights
    ckpt = export_source(model, runs, engines) or source_checkpoint(model, runs)
    out: list[Job] = []
    for entry in (get_backend(b) for b in backends) if backends else BACKENDS.values():
        if device not in entry.devices or (not backends and not entry.available()):
            continue
        if not backends and device not in entry.extra.get("plan_devices", entry.devices):
            continue  # runs there when named (--backend), but is not in the default plan
        if "checkpoint" in entry.kinds and ckpt is not None and (not entry.frameworks or framework in entry.frameworks):
            out += [Job(ckpt, entry.name, device, p, p, model) for p in precisions
                    if p in (entry.precisions_on(device) or ("fp32",))]
        if "onnx" in entry.kinds:
            # a backend may run more INT8 files on the CPU (OpenVINO: the S8S8 file is its fastest on DenseNet121)
            out += [Job(files[v], entry.name, device, p, v, model) for p in precisions
                    for v in (entry.extra.get("cpu_int8_variants") if p == "int8" and device == "cpu" else None)
                    or onnx_variants(p, device, include_trt_int8) if v in files]
            # precisions a backend computes from another file (OpenVINO: bf16 from the fp32 file)
            out += [Job(files[v], entry.name, device, p, p, model) for p, v in entry.extra.get("onnx_precisions",
                    {}).items() if p in precisions and v in files and (p != "bf16" or cpu_computes_bf16())]
        if "engine" in entry.kinds:
            out += [Job(path, entry.name, device, p, p, model) for p, path in engine.items() if p in precisions]
    return out


def jobs_for_artifact(path, backend=None, device=None, precision=None) -> list[Job]:
    """The one job for an artifact file; the backend, device and precision are resolved here."""
    info = artifact_info(path)
    entry = get_backend(backend) if backend else default_backend(info, device)
    if not entry.runs(info):
        raise LungedgeError(f"backend {entry.name} does not run {info.path.name}")
    device = entry.resolve_device(device)
    p = entry.resolve_precision(info, device, precision)
    return [Job(info.path, entry.name, device, p, info.variant if info.fixed_precision else p, info.architecture)]


def fp32_reference(job: Job) -> Job | None:
    """What a reduced-precision job is compared with: the same checkpoint in FP32, or the FP32 ONNX next
    to an ONNX file or engine, run by its default backend on the CPU (the portable reference)."""
    info = artifact_info(job.artifact)
    if not info.fixed_precision:
        return Job(job.artifact, job.backend, job.device, "fp32", "fp32", job.model)
    sibling = job.artifact.parent / f"{job.model}.fp32.onnx"
    if not sibling.is_file():
        return None
    return jobs_for_artifact(sibling, device="cpu")[0]


def resolve(specs, all_models: bool = False, device: str | None = None, backends=None, precisions=None,
            runs="runs", engines="engines", include_trt_int8: bool = False) -> list[Job]:
    """MODEL names and/or artifact paths (or --all) -> the jobs to run. ``device`` None: cpu for
    models, the backend's own device for an artifact file (an engine runs on cuda)."""
    specs = list(specs or [])
    optional: set[str] = set()
    known = model_names(engines)
    if all_models:
        optional = {m for m in models_with_artifacts(runs, engines) if m not in specs}
        specs += sorted(optional, key=known.index)
        if not specs:
            raise LungedgeError(f"--all: no model has artifacts under {runs}/ or {engines}/; "
                                "train and export one first")
    if not specs:
        raise LungedgeError("name a MODEL or an artifact path, or pass --all")
    out: list[Job] = []
    for s in specs:
        if Path(s).is_file():
            for b in (backends or [None]):
                for p in (precisions or [None]):
                    try:
                        out += jobs_for_artifact(s, b, device, p)
                    except LungedgeError:
                        if backends or precisions:
                            continue  # this backend/precision does not apply to this artifact
                        raise
            continue
        if s not in known:
            raise LungedgeError(f"{s!r} is neither a file nor a model (models: {', '.join(known)})")
        found = jobs_for_model(s, device or "cpu", backends, precisions, runs, engines, include_trt_int8)
        if not found and s in optional:
            continue  # --all: this model has no artifact for the asked backends/precisions
        if not found:
            raise LungedgeError(f"no artifacts for {s} match (looked in {Path(runs, s)} and {Path(engines, s)}; "
                                f"backends {','.join(backends or BACKENDS)}, "
                                f"precisions {','.join(precisions or PRECISIONS)})" + _unfinished_only(s, runs))
        out += found
    if not out:
        raise LungedgeError(f"no artifacts match backends {','.join(backends or BACKENDS)} and precisions "
                            f"{','.join(precisions or PRECISIONS)} on {device or 'cpu'}")
    return out
