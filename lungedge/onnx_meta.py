"""What an ONNX file carries so that, copied alone to a Jetson, it is enough to preprocess,
run and label an image: ``metadata_props`` with the architecture, class names in order,
preprocessing (input size, layout, normalisation), precision, how the model was built
(``build``: the checkpoint's recorded constructor arguments and weights meta), source checkpoint
SHA-256 and the lungedge version. Every model has the same input name (``input``) and output
(``logits``).

Variants: an exported model's files are ``<model>.<variant>.onnx``. :data:`VARIANTS` is the one
mapping between a variant (the file-name part) and what the file holds; in particular ``int8``
is the symmetric S8S8 Q/DQ form for TensorRT and ``int8-cpu`` the U8S8 form for ONNX Runtime
on x86 CPUs, ``int8-ov`` NNCF's placement for OpenVINO (written where NNCF is installed). All have
precision ``int8``; ``extra.int8_target`` (``trt`` | ``cpu`` | ``ov``) tells them apart.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import __version__
from .errors import LungedgeError, check_choice
from .preprocess import Preprocessing

FORMAT = "lungedge-onnx/1"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
JSON_KEYS = ("classes", "preprocessing", "input_shape", "extra", "build")

# variant (file-name part) -> (precision, int8 target); the only place this mapping is written
VARIANTS = {
    "fp32": ("fp32", None),
    "fp16": ("fp16", None),
    "int8": ("int8", "trt"),  # S8S8, symmetric Q/DQ: what TensorRT builds engines from
    "int8-cpu": ("int8", "cpu"),  # U8S8: what ONNX Runtime runs fastest on x86 CPUs
    "int8-ov": ("int8", "ov"),  # NNCF's Q/DQ placement from the same calibration set: for OpenVINO on CPUs
}


def variant_of(precision: str, int8_target: str | None = None) -> str:
    """('int8', 'cpu') -> 'int8-cpu'; ('int8', 'trt') -> 'int8'; ('fp16', None) -> 'fp16'."""
    if precision == "int8" and int8_target is None:
        int8_target = "trt"
    for variant, facts in VARIANTS.items():
        if facts == (precision, int8_target if precision == "int8" else None):
            return variant
    raise LungedgeError(f"no ONNX variant holds precision {precision!r} for {int8_target!r}")


def variant_facts(variant: str) -> tuple[str, str | None]:
    """'int8-cpu' -> ('int8', 'cpu'): the precision and INT8 target a variant's file holds."""
    return VARIANTS[check_choice(variant, VARIANTS, "variant")]


def variant_of_meta(meta: dict) -> str:
    """The variant of an ONNX file from its lungedge metadata."""
    return variant_of(meta.get("precision"), (meta.get("extra") or {}).get("int8_target"))


def make_metadata(architecture: str, framework: str, classes: list[str], preprocessing: Preprocessing,
                  precision: str, source_sha256: str, build: dict | None = None, output: str = "logits",
                  **extra) -> dict:
    """``build``: how the source model was built (the checkpoint's recorded build arguments);
    ``output``: what the model outputs, logits | probabilities | sigmoid (files without it: logits)."""
    return {
        "format": FORMAT,
        "architecture": architecture,
        "framework": framework,
        "classes": list(classes),
        "preprocessing": preprocessing.to_dict(),
        "input_name": INPUT_NAME,
        "input_layout": preprocessing.input_layout,
        "input_shape": ["batch", *preprocessing.input_shape],
        "precision": precision,
        "source_sha256": source_sha256,
        "build": build or {},
        "output": output,
        "lungedge_version": __version__,
        "extra": extra,
    }


def attach(model, metadata: dict) -> None:
    """Write ``metadata`` into ``model.metadata_props`` (non-string values as JSON)."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        prop = model.metadata_props.add()
        prop.key = f"lungedge.{key}"
        prop.value = value if isinstance(value, str) else json.dumps(value)


def from_model(model, source: str = "model") -> dict:
    props = {p.key[len("lungedge."):]: p.value for p in model.metadata_props if p.key.startswith("lungedge.")}
    if props.get("format") != FORMAT:
        raise LungedgeError(f"{source} carries no lungedge metadata; export it with 'lungedge export'"
                            f" (an ONNX from elsewhere: 'lungedge export NAME --checkpoint {source} --custom "
                            "--classes A,B,C')")
    out = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value) if key in JSON_KEYS else value
        except ValueError as exc:
            raise LungedgeError(f"{source}: metadata lungedge.{key} is not valid JSON ({exc})") from None
    from .validation import validate

    validate("OnnxMetadata", out, f"{source} metadata")  # classes, preprocessing (size within the cap), precision
    return out


def load_checked(path: str | Path):
    """onnx.load with one clear line for a missing, truncated or corrupt file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError, ...  # noqa: BLE001
        _check_external_data(path)  # a missing or short model.onnx.data beside it, named
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        newer = re.search(r"ir_version (\d+) is higher than the checker's \((\d+)\)", first)
        if newer:  # not damaged: saved by a newer onnx
            raise LungedgeError(f"{path} has ONNX IR version {newer[1]}, newer than onnx {onnx.__version__} here "
                                f"reads (up to {newer[2]}): save it with an older onnx package") from None
        raise LungedgeError(f"{path} is not a valid ONNX model (truncated or corrupt?): {first}") from None
    return model


def _check_external_data(path: Path) -> None:
    """One line naming the external data file (``torch.onnx.export``'s ``model.onnx.data``) the graph keeps its
    weights in, where it is not beside ``path`` or is shorter than the graph says."""
    import onnx
    from onnx import external_data_helper as ext

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a corrupt file is said by load_checked's own message
        return
    tensors = getattr(ext, "_get_all_tensors", lambda m: m.graph.initializer)(model)  # every subgraph's too
    needed: dict[str, int] = {}
    for tensor in tensors:
        if ext.uses_external_data(tensor):
            info = ext.ExternalDataInfo(tensor)
            end = (info.offset or 0) + (info.length or 0)
            needed[info.location] = max(needed.get(info.location, 0), end)
    for location, end in needed.items():
        data = path.parent / location
        if not data.is_file():
            raise LungedgeError(f"{path} keeps its weights in the external data file {location!r}, which is missing: "
                                f"it must sit beside the .onnx, as {data}")
        if data.stat().st_size < end:
            raise LungedgeError(f"{path}: its external data file {data} is {data.stat().st_size:,} bytes, shorter "
                                f"than the {end:,} the graph needs (an interrupted copy? copy it again)")


def read(path: str | Path) -> dict:
    """The lungedge metadata of an ONNX file, with ``preprocessing`` as a :class:`Preprocessing`."""
    meta = from_model(load_checked(path), str(path))
    meta["preprocessing"] = Preprocessing.from_dict(meta["preprocessing"])
    return meta


def ort_problem(exc: BaseException) -> str:
    """What ONNX Runtime says when it cannot load or run a graph, in one short line: the version it needs
    where that is the cause (a file from a newer onnx: IR version, opset), else its own message without
    its C++ source location and function signature."""
    import onnxruntime as ort

    text = str(exc)
    ir = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", text)
    if ir:
        return (f"its ONNX IR version is {ir[1]}, newer than onnxruntime {ort.__version__} reads (up to {ir[2]}): "
                "save it with an older onnx package or use a newer onnxruntime")
    opset = re.search(r"Opset (\d+) is under development.*?till opset (\d+)", text, re.S)
    if opset:
        return (f"its opset {opset[1]} is newer than onnxruntime {ort.__version__} supports (up to {opset[2]}): "
                f"export it with opset_version={opset[2]} or lower")
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text.strip())
    text = re.sub(r"^Load model from .*? failed:", "", text)
    where = re.match(r"\s*/\S+:\d+ ", text)  # "/onnxruntime_src/...cc:256 Type fn(args...) message"
    if where:
        rest, depth, start = text[where.end():], 0, None
        for i, ch in enumerate(rest):  # skip the function signature: up to its outermost closing parenthesis
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    start = i + 1
                    break
        text = rest[start:] if start is not None else rest
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:240]
