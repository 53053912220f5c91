"""TensorRT engines: the thin last step, done on the GPU or Jetson that will run them.

Precision is decided in the ONNX (an FP16 ONNX, or an INT8 ONNX with explicit symmetric
Q/DQ nodes). This module only turns such an ONNX into an engine:

* TensorRT 11 and newer: a strongly-typed network (the ONNX's types are the precision;
  11.x removed the FP16/INT8 builder flags);
* TensorRT 10.x (JetPack 6): the same ONNX plus the FP16 / INT8 builder flags.

This is the only module that builds engines: :func:`build_from_onnx` (what ``lungedge engine
build`` and ``lungedge export --engine`` call) reads the model name and precision from the ONNX's
own metadata and records the Jetson's settings in the sidecar when on one; :func:`build_engine`
is the TensorRT build itself.

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

import numpy as np

from . import __version__
from .errors import LungedgeError, check_choice
from .io import (FolderLock, atomic_write_bytes, clean_temp_files, settle, sha256_bytes, sha256_file, write_json,
                 written_together)
from .limits import check_batch as check_batch_size, check_positive

PRECISIONS = ("fp32", "fp16", "int8")
SIDECAR_FORMAT = "lungedge-engine/1"


@dataclass(frozen=True)
class EngineTarget:
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
    check_choice(precision, PRECISIONS, "precision")
    major = version_tuple(trt_version)[0]
    if major < 10:
        raise LungedgeError(f"TensorRT {trt_version} is too old: lungedge builds engines with TensorRT 10 or newer")
    return "strongly-typed" if major >= 11 else "builder-flags"


def engine_path(out_dir: str | Path, model: str, precision: str, max_batch: int, target: EngineTarget) -> Path:
    """engines/<model>/<model>.<precision>.b<max>.<gpu>.trt<version>.engine"""
    check_choice(precision, PRECISIONS, "precision")
    check_batch_size(max_batch, "--max-batch")
    version = ".".join(str(v) for v in version_tuple(target.trt_version)[:3])
    name = f"{model}.{precision}.b{max_batch}.{slug(target.gpu)}.trt{version}.engine"
    return Path(out_dir) / model / name


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def timing_cache_path(out_dir: str | Path, target: EngineTarget) -> Path:
    version = ".".join(str(v) for v in version_tuple(target.trt_version)[:3])
    return Path(out_dir) / f"timing.{slug(target.gpu)}.trt{version}.cache"


def builder_flags(mode: str, precision: str) -> list[str]:
    """The precision flags a build sets: none when strongly typed (TensorRT 11 removed them), on 10.x
    FP16 for FP16 engines and FP16 + INT8 for INT8 ones (the Q/DQ nodes carry the scales)."""
    check_choice(precision, PRECISIONS, "precision")
    if mode == "strongly-typed":
        return []
    return {"fp32": [], "fp16": ["FP16"], "int8": ["FP16", "INT8"]}[precision]


def non_qdq_layers(mode: str, precision: str) -> str:
    """How the layers outside Q/DQ pairs run, recorded in the sidecar so that INT8 rows built with
    TensorRT 10 (flags: TensorRT may pick FP16) and 11 (strongly typed: the ONNX's types) are not
    compared blindly."""
    if mode == "strongly-typed":
        return "as typed in the ONNX (strongly typed): FP32 tensors stay FP32, FP16 tensors FP16"
    if precision == "fp32":
        return "FP32 (no precision flags, TF32 cleared)"
    return "FP16 or FP32, TensorRT's choice per layer (FP16 flag)"


def profile_shapes(dims, max_batch: int, opt_batch: int | None = None) -> tuple[list, list, list]:
    """(min, opt, max) shapes of a batch profile for an input whose other dims are ``dims``; the opt
    batch is the batch that will be measured (default: max_batch)."""
    check_batch_size(max_batch, "--max-batch")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise LungedgeError(f"--opt-batch must be between 1 and --max-batch ({max_batch}), got {opt}")
    dims = [int(d) for d in dims]
    if any(d < 1 for d in dims):
        raise LungedgeError(f"the ONNX input has dynamic dimensions besides the batch ({dims}); export it with a "
                            "fixed image size")
    return [1, *dims], [opt, *dims], [max_batch, *dims]


def check_batch(batch: int, profile_max: int, engine_name: str = "the engine") -> None:
    """A batch above the profile's maximum is refused (never split silently)."""
    if batch > profile_max:
        raise LungedgeError(f"batch of {batch} is above {engine_name}'s profile maximum ({profile_max}); "
                            f"rebuild it with --max-batch {batch} or use smaller batches")


def check_onnx_matches(meta: dict, engine: str | Path) -> Path:
    """The ONNX next to an engine is the one it was built from (SHA-256 in the sidecar); returns its path."""
    onnx_path = Path(engine).parent / str(meta.get("onnx", ""))
    if not meta.get("onnx") or not onnx_path.is_file():
        raise LungedgeError(f"{Path(engine).name}: the ONNX it was built from ({meta.get('onnx')}) must lie next to it")
    if meta.get("onnx_sha256") and sha256_file(onnx_path) != meta["onnx_sha256"]:
        raise LungedgeError(f"{Path(engine).name} was built from another {onnx_path.name} (SHA-256 differs); "
                            f"{rebuild_hint(meta)}")
    return onnx_path


# TensorRT DataType member name -> NumPy dtype name (BF16/FP8/INT4 have no NumPy type)
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
              "BOOL": "bool", "UINT8": "uint8"}


def numpy_dtype(trt_dtype) -> np.dtype:
    """A TensorRT DataType (or its member name, e.g. 'HALF') -> NumPy dtype; one line for types NumPy lacks."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TRT_DTYPES:
        raise LungedgeError(f"engine tensor type {name} has no NumPy equivalent (supported: {', '.join(TRT_DTYPES)})")
    return np.dtype(TRT_DTYPES[name])


@dataclass(frozen=True)
class TensorIO:
    """One input or output of an engine, as the engine itself declares it."""

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple  # -1 where dynamic (the batch)


def split_io(tensors: list[TensorIO], engine_name: str = "engine") -> tuple[TensorIO, TensorIO]:
    """(the input, the output) of a classifier engine; one line when it has another number of either."""
    ins = [t for t in tensors if t.is_input]
    outs = [t for t in tensors if not t.is_input]
    if len(ins) != 1 or len(outs) != 1:
        raise LungedgeError(f"{engine_name} has {len(ins)} inputs and {len(outs)} outputs "
                            f"({', '.join(t.name for t in tensors)}); a lungedge classifier has one of each")
    if len(ins[0].shape) != 4:
        raise LungedgeError(f"{engine_name}: input {ins[0].name} has shape {ins[0].shape}, expected (N, C, H, W)")
    return ins[0], outs[0]


def engine_io(engine) -> list[TensorIO]:
    """Names, directions, dtypes and shapes of an engine's IO tensors, read from the engine (TensorRT 10+)."""
    trt = _tensorrt()
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        out.append(TensorIO(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                            numpy_dtype(engine.get_tensor_dtype(name)), tuple(engine.get_tensor_shape(name))))
    return out


def make_sidecar(onnx_path: str | Path, model: str, precision: str, max_batch: int, target: EngineTarget,
                 build_seconds: float, mode: str, **extra) -> dict:
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
        **extra,
    }


def read_sidecar(engine: str | Path) -> dict:
    path = sidecar_path(engine)
    settle(path.parent)  # an engine and sidecar a killed build left half renamed are completed first
    if not path.is_file():
        raise LungedgeError(f"{engine}: its sidecar {path.name} is missing; rebuild the engine on this machine")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LungedgeError(f"{path} is corrupt; rebuild the engine on this machine") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise LungedgeError(f"{path} is not a lungedge engine sidecar")
    from .validation import validate

    validate("EngineSidecar", meta, path)
    return meta


def rebuild_hint(meta: dict) -> str:
    model = meta.get("model", "MODEL")
    return f"rebuild it here: lungedge engine build engines/{model}/{meta.get('onnx', 'MODEL.onnx')} " \
           f"--max-batch {meta.get('max_batch', 1)}"


def check_compatible(meta: dict, here: EngineTarget) -> None:
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


def detect_target() -> EngineTarget:
    """The CUDA GPU and TensorRT release of this machine (needs both)."""
    trt = _tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise LungedgeError("no CUDA GPU is visible here; TensorRT engines are built on the GPU that runs them")
    major, minor = torch.cuda.get_device_capability(0)
    return EngineTarget(torch.cuda.get_device_name(0), f"{major}.{minor}", trt.__version__)


def build_engine(onnx_path: str | Path, model: str, precision: str, max_batch: int, out_dir: str | Path,
                 opt_batch: int | None = None, workspace_gib: float = 4.0, extra: dict | None = None) -> Path:
    """Build an engine from an FP16/INT8/FP32 ONNX with a batch profile 1..opt..max_batch (opt: the batch
    that will be measured; default max_batch). FP32 engines clear TF32 (as Polygraphy does), so an FP32
    row computes in FP32; the sidecar says how layers outside Q/DQ pairs run (``extra``: more of its
    fields, e.g. the Jetson's settings)."""
    trt = _tensorrt()
    target = detect_target()
    mode = build_mode(target.trt_version, precision)
    profile_shapes([1], max_batch, opt_batch)  # the batch settings, checked before any work
    out = engine_path(out_dir, model, precision, max_batch, target)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # 11.x: always strongly typed
    if mode == "strongly-typed" and strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LungedgeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for flag in builder_flags(mode, precision):  # INT8: the Q/DQ nodes carry the scales, no calibrator
        config.set_flag(getattr(trt.BuilderFlag, flag))
    tf32 = precision != "fp32"
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_file = timing_cache_path(out_dir, target)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, *profile_shapes(list(tensor.shape)[1:], max_batch, opt_batch))
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LungedgeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    seconds = time.perf_counter() - started
    atomic_write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))  # a cache: any complete one serves
    return publish_engine(out, bytes(serialized),
                          make_sidecar(onnx_path, model, precision, max_batch, target, seconds, mode,
                                       opt_batch=opt_batch or max_batch, builder_flags=builder_flags(mode, precision),
                                       tf32=tf32, non_qdq_layers=non_qdq_layers(mode, precision), **(extra or {})))


def publish_engine(out: Path, engine: bytes, sidecar: dict) -> Path:
    """Write an engine and its sidecar as one set: both new, or (a failed write) both as they were. The
    model's folder is locked meanwhile, so another build or an export replacing that folder is refused in
    one line instead of leaving one build's engine beside the other's sidecar. A build killed between the two
    renames is completed (its journal rolled forward) by the next lock or read of the folder. The sidecar
    records the engine's SHA-256: a pair that still does not belong together (files copied by hand) is named
    by :func:`check_engine_bytes` when the engine is loaded."""
    sidecar = {**sidecar, "engine_sha256": sha256_bytes(engine)}
    with FolderLock(out.parent, "lungedge engine build"):
        clean_temp_files(out.parent, [out.name, sidecar_path(out).name])  # what a build killed mid-write left
        with written_together():
            atomic_write_bytes(out, engine)
            write_json(sidecar_path(out), sidecar)
    return out


def check_engine_bytes(meta: dict, data: bytes, path: str | Path) -> None:
    """The engine file is the one its sidecar describes (sidecars before lungedge recorded the hash pass)."""
    want = meta.get("engine_sha256")
    if want is not None and sha256_bytes(data) != want:
        raise LungedgeError(f"{path} is not the engine its sidecar {sidecar_path(path).name} describes (a build "
                            f"was stopped or replaced half way); {rebuild_hint(meta)}")


def check_buildable(meta: dict, onnx_path: str | Path) -> str:
    """The precision to build an engine of, from an ONNX's metadata; refuses the CPU INT8 form."""
    from . import onnx_meta

    precision = meta.get("precision")
    if precision not in PRECISIONS:
        raise LungedgeError(f"{onnx_path} has precision {precision!r}; TensorRT engines are built from "
                            f"{', '.join(PRECISIONS)} ONNX files")
    variant = onnx_meta.variant_of_meta(meta)
    trt_variant = onnx_meta.variant_of("int8", "trt")
    if precision == "int8" and variant != trt_variant:
        raise LungedgeError(f"{onnx_path} is the CPU form of the INT8 model (U8S8 for ONNX Runtime); build the "
                            f"engine from {meta['architecture']}.{trt_variant}.onnx (S8S8) instead")
    return precision


def build_from_onnx(onnx_path: str | Path, max_batch: int = 8, opt_batch: int | None = None,
                    workspace_gib: float = 4.0, out: str | Path = "engines") -> tuple[Path, dict]:
    """Build the engine of an exported ONNX here, model name and precision read from its metadata;
    the sidecar also records this Jetson's settings (when on one). Returns (engine, sidecar)."""
    from . import onnx_meta
    from .jetson import jetson_info

    profile_shapes([1], max_batch, opt_batch)  # the batch settings, checked before any work
    check_positive(workspace_gib, "--workspace-gib", upper=1024)  # nan, inf or -1 GiB: TensorRT's own error
    meta = onnx_meta.read(onnx_path)
    precision = check_buildable(meta, onnx_path)
    info = jetson_info()
    engine = build_engine(onnx_path, meta["architecture"], precision, max_batch, out, opt_batch=opt_batch,
                          workspace_gib=workspace_gib, extra={"jetson": info} if info is not None else None)
    return engine, read_sidecar(engine)


def load_engine(path: str | Path):
    """Deserialize an engine after checking that it was built for this GPU and TensorRT."""
    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"engine not found: {path}")
    meta = read_sidecar(path)
    check_onnx_matches(meta, path)
    check_compatible(meta, detect_target())
    trt = _tensorrt()
    data = path.read_bytes()
    check_engine_bytes(meta, data, path)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
    if engine is None:
        raise LungedgeError(f"{path} is corrupt or truncated; {rebuild_hint(meta)}")
    return engine, meta
