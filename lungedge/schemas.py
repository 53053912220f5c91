"""The shapes of lungedge's own files, checked with pydantic.

Every file lungedge reads back -- split manifests, result rows, ONNX metadata, engine sidecars,
calibration manifests -- is validated here with :func:`check`, which turns the first problem
into one line naming the file and the field (``split.json: items.3.split: Input should be
'train', 'val' or 'test'``). Models allow extra keys (newer writers may add fields); what the
readers rely on is required.

Limits (sizes, memory, numeric options) are in :mod:`lungedge.limits`, which needs no pydantic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .errors import LungedgeError
from .io import relative_inside
from .limits import max_input_size

# -- validation ---------------------------------------------------------------------------------------

def _problem(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = err.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{loc}: {msg}" if loc else msg


def check(model: type[BaseModel], data: Any, where) -> BaseModel:
    """``model`` validated from ``data``; a :class:`LungedgeError` naming ``where`` and the field otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise LungedgeError(f"{where}: {_problem(errors[0])}{more}") from None


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


SHA256 = Field(pattern=r"^[0-9a-f]{64}$")


class _LabelledFile(_Open):
    """One image of a manifest: a path relative to (and inside) the data root, its label and SHA-256."""
    path: str
    label: str
    sha256: str = SHA256

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        why = relative_inside(v)
        if why:
            raise ValueError(f"{v!r} is not inside the data root ({why})")
        return v


# -- split manifests (lungedge data split) -------------------------------------------------------------

class SplitItem(_LabelledFile):
    split: Literal["train", "val", "test"]
    group: int


class SplitParams(_Open):
    """Numbers as numbers (strict: the readers compare them, a string ``"NaN"`` would break them)."""
    val: float = Field(ge=0, lt=1, strict=True)
    test: float = Field(ge=0, lt=1, strict=True)
    seed: int = Field(strict=True)
    group_by: str
    threshold: float | None = Field(default=None, gt=0, le=1, strict=True, allow_inf_nan=False)


class SplitDataset(_Open):
    root: str
    layout: str
    fingerprint: str
    images: int = Field(ge=0)


class SplitManifest(_Open):
    format: Literal["lungedge-split/1"]
    params: SplitParams
    dataset: SplitDataset
    classes: list[str] = Field(min_length=2)
    counts: dict[str, dict[str, int]]
    items: list[SplitItem] = Field(min_length=1)

    @model_validator(mode="after")
    def _labels_known(self):
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: class names repeat")
        known, seen = set(self.classes), {}
        for i, it in enumerate(self.items):
            if it.label not in known:
                raise ValueError(f"items.{i}.label: {it.label!r} is not one of the classes {self.classes}")
            if it.path in seen:
                raise ValueError(f"items.{i}.path: {it.path!r} is listed twice (also items.{seen[it.path]})")
            seen[it.path] = i
        return self


# -- calibration manifests (calibration/<key>/manifest.json) --------------------------------------------

class CalibrationFile(_LabelledFile):
    pass


class CalibrationManifest(_Open):
    format: Literal["lungedge-calibration/1"]
    key: str
    dataset_fingerprint: str
    method: str
    size: int = Field(ge=1)
    files_sha256: str
    preprocessing: dict
    files: list[CalibrationFile]

    @model_validator(mode="after")
    def _size_matches(self):
        if len(self.files) != self.size:
            raise ValueError(f"size: {self.size} but {len(self.files)} files are listed")
        return self


# -- dataclasses lungedge writes as JSON (a run's config.json, read by train --resume) -------------------------

@functools.cache
def dataclass_model(cls) -> type[BaseModel]:
    """The pydantic model of the dataclass ``cls`` (e.g. :class:`lungedge.train.common.TrainConfig`), made
    from its own fields: each field's type and default, plus the ``Field`` constraints in its
    ``metadata["schema"]`` (strict types: a hand-edited ``"epochs": "many"`` is named). Extra keys are
    allowed. The dataclass stays the one list of fields; nothing here repeats it."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = {"default": f.default}
        elif f.default_factory is not dataclasses.MISSING:
            default = {"default_factory": f.default_factory}
        else:
            default = {}  # required
        fields[f.name] = (hints[f.name], Field(**default, **f.metadata.get("schema", {})))
    return create_model(cls.__name__, __base__=_Open, __module__=cls.__module__, **fields)


# -- ONNX metadata (metadata_props "lungedge.*") ----------------------------------------------------------

class PreprocessingFields(_Open):
    size: int
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    scale: float = Field(gt=0)
    channel_order: Literal["RGB", "BGR", "GRAY"]
    layout: Literal["NCHW", "NHWC"]
    resize: Literal["center-crop-bilinear", "stretch-bilinear"] = "center-crop-bilinear"

    @field_validator("size")
    @classmethod
    def _size(cls, v: int) -> int:
        cap = max_input_size()
        if not 8 <= v <= cap:
            raise ValueError(f"input size {v} is outside 8..{cap} pixels (LUNGEDGE_MAX_INPUT_SIZE)")
        return v

    @field_validator("std")
    @classmethod
    def _std(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(s) or s <= 0 for s in v):
            raise ValueError("every std must be finite and greater than 0")
        return v


class OnnxMetadata(_Open):
    format: Literal["lungedge-onnx/1"]
    architecture: str
    framework: str
    classes: list[str] = Field(min_length=1)
    preprocessing: PreprocessingFields
    precision: Literal["fp32", "fp16", "int8"]
    source_sha256: str
    build: dict = Field(default_factory=dict)
    output: Literal["logits", "probabilities", "sigmoid"] = "logits"  # what the model outputs (#12)
    extra: dict = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("class names repeat")
        return v


class SetReference(_Open):
    """``extra.input_check.set_reference``: each descriptor's quantiles over the reference images, and their
    spread, that eval compares a whole test set with (optional: files written before it have none)."""
    levels: list[float] = Field(min_length=3)
    quantiles: dict[str, list[float]]
    spread: dict[str, float]

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(x) and 0 <= x <= 100 for x in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("must be increasing percentiles in 0-100")
        return v

    @field_validator("spread")
    @classmethod
    def _spread(cls, v: dict) -> dict:
        for name, x in v.items():
            if not (math.isfinite(x) and x > 0):
                raise ValueError(f"{name}: {x!r} is not a positive finite number")
        return v

    @field_validator("quantiles")
    @classmethod
    def _one_per_level(cls, v: dict, info) -> dict:
        n = len(info.data.get("levels") or [])
        for name, q in v.items():
            if len(q) != n or not all(math.isfinite(x) for x in q) or any(b < a for a, b in zip(q, q[1:])):
                raise ValueError(f"{name}: not {n} non-decreasing finite numbers, one per level")
        return v


class InputCheckFields(_Open):
    """``extra.input_check`` (:mod:`lungedge.inputcheck`): the envelope predict and eval flag images with."""
    format: Literal["lungedge-input-check/1"]
    descriptors: list[str] = Field(min_length=1)
    training_range: dict[str, list[float]]
    envelope: dict[str, list[float]]
    fitted_on: str
    images: int = Field(ge=1, strict=True)
    validation_flag_rate: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    validation_images: int | None = Field(default=None, ge=0)
    set_reference: SetReference | None = None

    @field_validator("descriptors")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from .inputcheck import DESCRIPTORS

        for name in v:
            if name not in DESCRIPTORS:
                raise ValueError(f"{name!r} is not a descriptor ({', '.join(DESCRIPTORS)})")
        return v

    @field_validator("training_range", "envelope")
    @classmethod
    def _ranges(cls, v: dict) -> dict:
        for name, r in v.items():
            if len(r) != 2 or not all(math.isfinite(b) for b in r) or r[0] > r[1]:
                raise ValueError(f"{name}: {r!r} is not a range (two finite numbers, low <= high)")
        return v

    @model_validator(mode="after")
    def _every_descriptor_bounded(self):
        for field in ("training_range", "envelope"):
            missing = [n for n in self.descriptors if n not in getattr(self, field)]
            if missing:
                raise ValueError(f"{field}: no range for {missing[0]!r}")
        ref = self.set_reference
        for field in ("quantiles", "spread"):
            missing = [n for n in self.descriptors if ref is not None and n not in getattr(ref, field)]
            if missing:
                raise ValueError(f"set_reference.{field}: none for {missing[0]!r}")
        return self


# -- TensorRT engine sidecars (<engine>.json) --------------------------------------------------------------

class EngineSidecar(_Open):
    format: str
    model: str
    precision: Literal["fp32", "fp16", "int8"]
    max_batch: int = Field(ge=1)
    onnx: str
    onnx_sha256: str = SHA256
    engine_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # sidecars before it: absent
    gpu: str
    compute_capability: str
    trt_version: str


# -- result rows (results/*.jsonl from bench and eval) ------------------------------------------------------



class _Row(_Open):
    format: str | None = None
    model: str
    backend: str
    device: str
    variant: str
    artifact_sha256: str
    provenance: dict = Field(default_factory=dict)


    @field_validator("format")
    @classmethod
    def _known_format(cls, v):
        from .results import FORMAT

        if v is not None and v != FORMAT:
            raise ValueError(f"{v!r} is not {FORMAT!r}, the format this lungedge reads (written by another version?)")
        return v


class Latency(_Open):
    p50: float = Field(gt=0, allow_inf_nan=False)
    p90: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    p99: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    mean: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    std: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class BenchRow(_Row):
    kind: Literal["bench"]
    batch_size: int = Field(ge=1)
    preprocessing: bool
    latency_ms: Latency
    throughput_ips: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    vs_source: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class ReliabilityBin(_Open):
    range: list[float] = Field(min_length=2, max_length=2)
    n: int = Field(ge=1)
    confidence: float
    accuracy: float


class Calibration(_Open):
    brier: float | None = None
    ece: float | None = None
    mean_confidence: float | None = None
    top1_accuracy: float | None = None
    reliability: list[ReliabilityBin] = Field(default_factory=list)


def _fraction(v):
    if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
        raise ValueError(f"{v!r} is not a number from 0 to 1")
    return v


class EvalMetrics(_Open):
    confusion_matrix: list[list[int]]
    n: int = Field(ge=0)
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    macro_auroc: float | None = None
    sensitivity: dict[str, float | None] = Field(default_factory=dict)
    specificity: dict[str, float | None] = Field(default_factory=dict)
    calibration: Calibration | None = None  # rows written before calibration was measured have none

    @field_validator("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")
    @classmethod
    def _share(cls, v):
        return _fraction(v)

    @field_validator("sensitivity", "specificity")
    @classmethod
    def _shares(cls, v):
        for x in v.values():
            _fraction(x)
        return v


class EvalRow(_Row):
    kind: Literal["eval"]
    classes: list[str] = Field(min_length=1)
    metrics: EvalMetrics
    temperature: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # rows before temperature scaling: 1
    unlike_training: float | None = None  # share of test images the input check flags (absent: no check)
    exif_orientation_count: int | None = Field(default=None, ge=0)  # test images a viewer shows turned (older: none)

    @field_validator("unlike_training")
    @classmethod
    def _flag_share(cls, v):
        return _fraction(v)

    @model_validator(mode="after")
    def _matrix_matches(self):
        cm = self.metrics.confusion_matrix
        n = len(self.classes)
        if len(cm) != n or any(len(r) != n for r in cm):
            raise ValueError(f"metrics.confusion_matrix: not {n}x{n} for {n} classes")
        return self


def check_row(row: Any, where) -> dict:
    """A bench or eval row, validated; returned as the same dict."""
    kind = row.get("kind") if isinstance(row, dict) else None
    model = {"bench": BenchRow, "eval": EvalRow}.get(kind)
    if model is None:
        raise LungedgeError(f"{where}: kind: must be 'bench' or 'eval', got {kind!r}")
    check(model, row, where)
    return row
