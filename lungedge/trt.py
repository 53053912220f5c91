"""TensorRT engines: the thin last step, done on the GPU or Jetson that will run them.

Precision is decided in the ONNX (an FP16 ONNX, or an INT8 ONNX with explicit symmetric
Q/DQ nodes). This module only turns such an ONNX into an engine:

* TensorRT 11 and newer: a strongly-typed network (the ONNX's types are the precision;
  11.x removed the FP16/INT8 builder flags);
* TensorRT 10.x (JetPack 6): the same ONNX plus the FP16 / INT8 builder flags.

Everything around the build — names, the JSON sidecar, the decision whether an engine may
load here — is plain Python, testable without TensorRT. ``tensorrt`` is imported only
inside :func:`build_engine` and :func:`load_engine`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .errors import LungedgeError
from .io import atomic_write_bytes, sha256_file, write_json

PRECISIONS = ("fp32", "fp16", "int8")
SIDECAR_FORMAT = "lungedge-engine/1"


@dataclass(frozen=True)
class Target:
    """The GPU and TensorRT an engine is built for (or that wants to load one)."""

    gpu: str  # e.g. "NVIDIA H200", "Orin (nvgpu)"
    compute_capability: str  # e.g. "9.0", "8.7"
    trt_version: str  # e.g. "10.3.0"


def slug(text: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'nvidia-geforce-rtx-4090' (safe in a file name)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def version_tuple(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", version)
    if not parts:
        raise LungedgeError(f"cannot read a TensorRT version from {version!r}")
    return tuple(int(p) for p in parts)


def same_release(a: str, b: str) -> bool:
    """Engines load only on the TensorRT release (major.minor.patch) that built them."""
    return version_tuple(a)[:3] == version_tuple(b)[:3]


def build_mode(trt_version: str, precision: str) -> str:
    """'strongly-typed' on TensorRT >= 11, 'builder-flags' on 10.x; older releases are refused."""
    if precision not in PRECISIONS:
        raise LungedgeError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    major = version_tuple(trt_version)[0]
    if major < 10:
        raise LungedgeError(f"TensorRT {trt_version} is too old: lungedge builds engines with TensorRT 10 or newer")
    return "strongly-typed" if major >= 11 else "builder-flags"


def engine_path(out_dir: str | Path, model: str, precision: str, max_batch: int, target: Target) -> Path:
    """engines/<model>/<model>.<precision>.b<max>.<gpu>.trt<version>.engine"""
    if precision not in PRECISIONS:
        raise LungedgeError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if max_batch < 1:
        raise LungedgeError(f"--max-batch must be at least 1, got {max_batch}")
    version = ".".join(str(v) for v in version_tuple(target.trt_version)[:3])
    name = f"{model}.{precision}.b{max_batch}.{slug(target.gpu)}.trt{version}.engine"
    return Path(out_dir) / model / name


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def timing_cache_path(out_dir: str | Path, target: Target) -> Path:
    version = ".".join(str(v) for v in version_tuple(target.trt_version)[:3])
    return Path(out_dir) / f"timing.{slug(target.gpu)}.trt{version}.cache"


def make_sidecar(onnx_path: str | Path, model: str, precision: str, max_batch: int, target: Target,
                 build_seconds: float, mode: str) -> dict:
    return {
        "format": SIDECAR_FORMAT,
        "model": model,
        "precision": precision,
        "max_batch": max_batch,
        "onnx": Path(onnx_path).name,
        "onnx_sha256": sha256_file(onnx_path),
        **asdict(target),
        "build_mode": mode,
        "build_seconds": round(build_seconds, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "lungedge_version": __version__,
    }


def read_sidecar(engine: str | Path) -> dict:
    path = sidecar_path(engine)
    if not path.is_file():
        raise LungedgeError(f"{engine}: its sidecar {path.name} is missing; rebuild the engine on this machine")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LungedgeError(f"{path} is corrupt; rebuild the engine on this machine") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise LungedgeError(f"{path} is not a lungedge engine sidecar")
    return meta


def rebuild_hint(meta: dict) -> str:
    model = meta.get("model", "MODEL")
    return f"rebuild it here: lungedge engine build engines/{model}/{meta.get('onnx', 'MODEL.onnx')} " \
           f"--max-batch {meta.get('max_batch', 1)}"


def check_compatible(meta: dict, here: Target) -> None:
    """Refuse an engine built for another GPU or TensorRT release, saying how to rebuild it."""
    built = f"{meta['gpu']} (sm {meta['compute_capability']}) with TensorRT {meta['trt_version']}"
    if slug(meta["gpu"]) != slug(here.gpu) or meta["compute_capability"] != here.compute_capability:
        raise LungedgeError(f"engine built for {built}, but this is {here.gpu} (sm {here.compute_capability}); "
                            f"{rebuild_hint(meta)}")
    if not same_release(meta["trt_version"], here.trt_version):
        raise LungedgeError(f"engine built for {built}, but TensorRT here is {here.trt_version}; {rebuild_hint(meta)}")


# -- the parts that need TensorRT and a CUDA GPU -----------------------------------------------

def _tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise LungedgeError(
            "TensorRT is not installed here; build the engine on the target GPU or Jetson "
            "(pip install tensorrt from NVIDIA's index, or use JetPack's)"
        ) from None
    return tensorrt


def detect_target() -> Target:
    """The CUDA GPU and TensorRT release of this machine (needs both)."""
    trt = _tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise LungedgeError("no CUDA GPU is visible here; TensorRT engines are built on the GPU that runs them")
    major, minor = torch.cuda.get_device_capability(0)
    return Target(torch.cuda.get_device_name(0), f"{major}.{minor}", trt.__version__)


def build_engine(onnx_path: str | Path, model: str, precision: str, max_batch: int, out_dir: str | Path,
                 opt_batch: int | None = None, workspace_gib: float = 4.0) -> Path:
    """Build an engine from an FP16/INT8/FP32 ONNX with a batch profile 1..max_batch."""
    trt = _tensorrt()
    target = detect_target()
    mode = build_mode(target.trt_version, precision)
    out = engine_path(out_dir, model, precision, max_batch, target)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if mode == "strongly-typed":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LungedgeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if mode == "builder-flags":
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # the Q/DQ nodes carry the scales: no calibrator
    cache_file = timing_cache_path(out_dir, target)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)[1:]
        opt = min(max_batch, opt_batch or max_batch)
        profile.set_shape(tensor.name, [1, *dims], [opt, *dims], [max_batch, *dims])
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LungedgeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    seconds = time.perf_counter() - started
    atomic_write_bytes(out, bytes(serialized))
    atomic_write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))
    write_json(sidecar_path(out), make_sidecar(onnx_path, model, precision, max_batch, target, seconds, mode))
    return out


def load_engine(path: str | Path):
    """Deserialize an engine after checking that it was built for this GPU and TensorRT."""
    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"engine not found: {path}")
    meta = read_sidecar(path)
    check_compatible(meta, detect_target())
    trt = _tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise LungedgeError(f"{path} is corrupt or truncated; {rebuild_hint(meta)}")
    return engine, meta
