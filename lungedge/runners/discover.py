"""Which artifacts to run for ``bench`` / ``eval`` / ``predict MODEL``: found the way export finds them.

A model's source checkpoint is the best checkpoint of its latest run (``runs/<model>/*/best.*``),
its ONNX files are ``engines/<model>/<model>.{fp32,fp16,int8,int8-cpu}.onnx`` and its engines
``engines/<model>/<model>.<precision>.b<N>.<gpu>.trt<ver>.engine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LungedgeError
from .base import BACKENDS, PRECISIONS, artifact_info


@dataclass(frozen=True)
class Target:
    artifact: Path
    backend: str
    device: str
    precision: str  # fp32 | fp16 | int8
    variant: str  # fp32 | fp16 | int8 | int8-cpu (which file)
    model: str


def parse_list(text: str | None, allowed, what: str) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise LungedgeError(f"unknown {what} {', '.join(bad) or repr(text)} (choose from {', '.join(allowed)})")
    return items


def source_checkpoint(model: str, runs) -> Path | None:
    from ..export import resolve_checkpoint

    try:
        return resolve_checkpoint(model, None, runs)
    except LungedgeError:
        return None


_SHA_CACHE: dict = {}


def checkpoint_with_sha(model: str, runs, sha: str | None) -> Path | None:
    """The run checkpoint (best.* of any run of MODEL) whose SHA-256 is ``sha``: the source of an export."""
    from ..io import sha256_file

    if not sha:
        return None
    for p in sorted(Path(runs, model).glob("*/best.*"), key=lambda q: q.stat().st_mtime, reverse=True):
        if p.suffix.lower() not in (".pth", ".pt", ".h5", ".hdf5"):
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
    for variant in ("fp32", "fp16", "int8-cpu", "int8"):
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


def models_with_artifacts(runs, engines) -> list[str]:
    from ..models.registry import names

    return [m for m in names() if has_artifacts(m, runs, engines)]


def targets_for_model(model: str, device: str = "cpu", backends=None, precisions=None, runs="runs",
                      engines="engines", include_trt_int8: bool = False) -> list[Target]:
    """Default targets: the source framework (fp32; fp16 too on CUDA for torch), ONNX Runtime for
    each precision file present (INT8: the int8-cpu file on CPU, the S8S8 int8 file on CUDA/TensorRT),
    TensorRT engines on CUDA."""
    from ..models.registry import get_spec

    spec = get_spec(model)
    precisions = precisions or list(PRECISIONS)
    backends = backends or list(BACKENDS)
    out: list[Target] = []
    # the checkpoint the ONNX files came from, so that source and ONNX rows compare the same weights
    ckpt = export_source(model, runs, engines) or source_checkpoint(model, runs)
    if ckpt is not None and spec.framework in backends:
        for p in ("fp32", "fp16"):
            if p in precisions and (p == "fp32" or (device == "cuda" and spec.framework == "torch")):
                out.append(Target(ckpt, spec.framework, device, p, p, model))
    files = onnx_files(model, engines)
    if "onnxruntime" in backends:
        for p in precisions:
            variants = [p] if p != "int8" else (["int8-cpu"] + (["int8"] if include_trt_int8 else []) if device == "cpu"
                                                 else ["int8"])
            for v in variants:
                if v in files:
                    out.append(Target(files[v], "onnxruntime", device, p, v, model))
    if device == "cuda" and "onnxruntime-trt" in backends:
        for p in precisions:
            if p in files:
                out.append(Target(files[p], "onnxruntime-trt", device, p, p, model))
    if device == "cuda" and "tensorrt" in backends:
        for p, path in engine_files(model, engines).items():
            if p in precisions:
                out.append(Target(path, "tensorrt", device, p, p, model))
    return out


def targets_for_artifact(path, backend=None, device="cpu", precision=None) -> list[Target]:
    info = artifact_info(path)
    from .base import default_backend

    backend = backend or default_backend(info)
    p = precision or info.precision
    return [Target(info.path, backend, device, p, info.variant if info.kind != "checkpoint" else p,
                   info.architecture)]


def resolve(specs, all_models: bool = False, device: str = "cpu", backends=None, precisions=None,
            runs="runs", engines="engines", include_trt_int8: bool = False) -> list[Target]:
    """MODEL names and/or artifact paths (or --all) -> the list of targets to run."""
    from ..models.registry import names

    specs = list(specs or [])
    optional: set[str] = set()
    if all_models:
        optional = {m for m in models_with_artifacts(runs, engines) if m not in specs}
        specs += sorted(optional, key=names().index)
        if not specs:
            raise LungedgeError(f"--all: no model has artifacts under {runs}/ or {engines}/; "
                                "train and export one first")
    if not specs:
        raise LungedgeError("name a MODEL or an artifact path, or pass --all")
    out: list[Target] = []
    for s in specs:
        if Path(s).is_file():
            for b in (backends or [None]):
                for p in (precisions or [None]):
                    try:
                        out += targets_for_artifact(s, b, device, p)
                    except LungedgeError:
                        if backends or precisions:
                            continue  # this backend/precision does not apply to this artifact
                        raise
            continue
        if s not in names():
            raise LungedgeError(f"{s!r} is neither a file nor a model (models: {', '.join(names())})")
        found = targets_for_model(s, device, backends, precisions, runs, engines, include_trt_int8)
        if not found and s in optional:
            continue  # --all: this model has no artifact for the asked backends/precisions
        if not found:
            raise LungedgeError(f"no artifacts for {s} match (looked in {Path(runs, s)} and {Path(engines, s)}; "
                                f"backends {','.join(backends or BACKENDS)}, precisions {','.join(precisions or PRECISIONS)})")
        out += found
    if not out:
        raise LungedgeError(f"no artifacts match backends {','.join(backends or BACKENDS)} and precisions "
                            f"{','.join(precisions or PRECISIONS)} on {device}")
    return out
