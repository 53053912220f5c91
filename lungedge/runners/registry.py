"""The table of backends and :func:`open_runner`, the one factory bench, eval and predict use.

A backend joins with one :func:`register` call (see the bottom of this file): its name, the runner
class as a lazy ``"module:Class"`` string (imported only when a runner is opened), the artifact kinds
it runs, the source frameworks of the checkpoints it runs, its devices and (for checkpoints) the
precisions it can run them in.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from ..errors import LungedgeError, check_choice
from .artifact import ArtifactInfo, artifact_info
from .base import Runner

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class Backend:
    name: str
    runner: object  # "package.module:Class" (imported lazily) or the Runner subclass itself
    kinds: tuple[str, ...]  # artifact kinds it runs: checkpoint | onnx | engine
    devices: tuple[str, ...] = ("cpu",)
    frameworks: tuple[str, ...] = ()  # source frameworks of the checkpoints it runs (empty: any)
    # checkpoints only: precisions it runs them in, per device; None: the file's own precision
    precisions: dict | None = None
    default: bool = True  # may be picked when no backend is named
    requires: tuple[str, ...] = ()  # importable modules; plans made without --backend skip it if absent
    extra: dict = field(default_factory=dict)

    def runs(self, info: ArtifactInfo) -> bool:
        return info.kind in self.kinds and (info.kind != "checkpoint" or not self.frameworks
                                            or info.framework in self.frameworks)

    def precisions_on(self, device: str) -> tuple[str, ...] | None:
        return None if self.precisions is None else tuple(self.precisions.get(device, ()))

    def available(self) -> bool:
        from ..models.frameworks import installed

        return all(installed(m) for m in self.requires)

    def runner_class(self) -> type[Runner]:
        if not isinstance(self.runner, str):
            return self.runner
        module, _, cls = self.runner.partition(":")
        return getattr(importlib.import_module(module), cls)

    def resolve_device(self, device: str | None) -> str:
        """None: the backend's first device; a device it lacks: one line naming those it has."""
        if device is None:
            return self.devices[0]
        check_choice(device, DEVICES, "device")
        if device not in self.devices:
            raise LungedgeError(f"backend {self.name} runs on {', '.join(self.devices)} only, not {device}")
        return device

    def resolve_precision(self, info: ArtifactInfo, device: str, precision: str | None) -> str:
        if precision is not None:
            check_choice(precision, PRECISIONS, "precision")
        if info.fixed_precision or self.precisions is None:
            if precision is not None and self.extra.get("onnx_precisions", {}).get(precision) == info.variant:
                return precision  # e.g. OpenVINO computes the fp32 file in bf16: its own precision
            if precision not in (None, info.precision):
                raise LungedgeError(f"{info.path.name} is a {info.precision} model; precision is fixed in the file "
                                    f"(pick the {precision} file instead)")
            return info.precision
        precision = precision or "fp32"
        ok = self.precisions_on(device)
        if precision not in ok:
            elsewhere = [d for d in self.precisions if precision in self.precisions[d]]
            raise LungedgeError(f"backend {self.name} runs {precision} on {' or '.join(elsewhere) or 'no device'} "
                                f"only, not on {device} (on {device}: {', '.join(ok) or 'nothing'})")
        return precision


BACKENDS: dict[str, Backend] = {}


def register(name: str, runner, kinds, devices=("cpu",), frameworks=(), precisions=None, default: bool = True,
             requires=(), **extra) -> Backend:
    """Add (or replace) a backend in the table; returns its entry."""
    entry = Backend(name, runner, tuple(kinds), tuple(devices), tuple(frameworks),
                    dict(precisions) if precisions is not None else None, default, tuple(requires), extra)
    BACKENDS[name] = entry
    return entry


def unregister(name: str) -> None:
    BACKENDS.pop(name, None)


def get_backend(name: str) -> Backend:
    return BACKENDS[check_choice(name, BACKENDS, "backend")]


def short_name(name: str) -> str:
    """A backend's short label for plots (its ``short=`` entry; else its name, also for unknown names)."""
    entry = BACKENDS.get(name)
    return entry.extra.get("short", name) if entry is not None else name


def default_backend(info: ArtifactInfo, device: str | None = None) -> Backend:
    """The first registered default backend that runs this artifact (on ``device``, if given)."""
    runs = [e for e in BACKENDS.values() if e.default and e.runs(info)]
    for entry in runs:
        if device is None or device in entry.devices:
            return entry
    if runs:
        return runs[0]  # on another device only: resolve_device says so in one line
    raise LungedgeError(f"no backend runs {info.path.name} (a {info.framework} {info.kind}); "
                        f"backends: {', '.join(BACKENDS)}")


def open_runner(artifact, backend: str | None = None, device: str | None = None, precision: str | None = None,
                threads: int | None = None) -> Runner:
    """A runner for ``artifact`` (a path or an :class:`ArtifactInfo`); use it in a ``with`` block.

    ``backend``: a name from :data:`BACKENDS` (default: the first that runs the artifact);
    ``device``: cpu or cuda (default: the backend's first device); ``precision``: for a checkpoint,
    what to run it in (default fp32), for ONNX/engines the file's own (anything else is refused).
    """
    if device is not None:
        check_choice(device, DEVICES, "device")
    info = artifact_info(artifact)
    entry = get_backend(backend) if backend else default_backend(info, device)
    if not entry.runs(info):
        what = f"{info.framework} checkpoint" if info.kind == "checkpoint" else info.kind
        raise LungedgeError(f"backend {entry.name} does not run a {what} ({info.path.name})")
    device = entry.resolve_device(device)
    precision = entry.resolve_precision(info, device, precision)
    return entry.runner_class().from_artifact(info, backend=entry.name, device=device, precision=precision,
                                              threads=threads)


# --- the table: one line per backend ------------------------------------------------------------------
register("torch", "lungedge.runners.torch:TorchRunner", kinds=("checkpoint",), frameworks=("torch",),
         devices=("cpu", "cuda"), precisions={"cpu": ("fp32",), "cuda": ("fp32", "fp16")}, requires=("torch",))
register("keras", "lungedge.runners.keras:KerasRunner", kinds=("checkpoint",), frameworks=("keras",),
         devices=("cpu", "cuda"), precisions={"cpu": ("fp32",), "cuda": ("fp32",)}, requires=("keras",))
register("onnxruntime", "lungedge.runners.onnxrt:OnnxRuntimeRunner", kinds=("onnx",), devices=("cpu", "cuda"),
         requires=("onnxruntime",), short="ort")
register("onnxruntime-trt", "lungedge.runners.onnxrt_trt:OnnxRuntimeTrtRunner", kinds=("onnx",), devices=("cuda",),
         default=False, requires=("onnxruntime",), short="ort-trt")
register("tensorrt", "lungedge.runners.trt:TensorRTRunner", kinds=("engine",), devices=("cuda",),
         requires=("tensorrt",), short="trt")
register("openvino", "lungedge.runners.openvino:OpenVinoRunner", kinds=("onnx",), devices=("cpu",), default=False,
         requires=("openvino",), onnx_precisions={"bf16": "fp32"},  # bf16: the fp32 file computed in BF16 (AMX)
         # every INT8 file: which is fastest depends on the model; int8-ov (NNCF) where export wrote it (#14)
         cpu_int8_variants=("int8-ov", "int8-cpu", "int8"))
register("torch-amp", "lungedge.runners.torch_compile:TorchAmpRunner", kinds=("checkpoint",), frameworks=("torch",),
         devices=("cpu", "cuda"), precisions={"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")},
         default=False, requires=("torch",), plan_devices=("cuda",))
register("torch-compile", "lungedge.runners.torch_compile:TorchCompileRunner", kinds=("checkpoint",),
         frameworks=("torch",), devices=("cuda",), precisions={"cuda": ("fp32", "fp16", "bf16")}, default=False,
         requires=("torch", "triton"))
