"""What an ONNX file carries so that, copied alone to a Jetson, it is enough to preprocess,
run and label an image: ``metadata_props`` with the architecture, class names in order,
preprocessing (input size, layout, normalisation), precision, source checkpoint SHA-256 and
the lungedge version. Every model has the same input name (``input``) and output (``logits``).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .errors import LungedgeError
from .preprocess import Preprocessing

FORMAT = "lungedge-onnx/1"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
JSON_KEYS = ("classes", "preprocessing", "input_shape", "extra")


def make_metadata(architecture: str, framework: str, classes: list[str], preprocessing: Preprocessing,
                  precision: str, source_sha256: str, **extra) -> dict:
    return {
        "format": FORMAT,
        "architecture": architecture,
        "framework": framework,
        "classes": list(classes),
        "preprocessing": preprocessing.to_dict(),
        "input_name": INPUT_NAME,
        "input_layout": preprocessing.layout,
        "input_shape": ["batch", *preprocessing.input_shape],
        "precision": precision,
        "source_sha256": source_sha256,
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
        raise LungedgeError(f"{source} carries no lungedge metadata; export it with 'lungedge export'")
    out = {}
    for key, value in props.items():
        out[key] = json.loads(value) if key in JSON_KEYS else value
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
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LungedgeError(f"{path} is not a valid ONNX model (truncated or corrupt?): {first}") from None
    return model


def read(path: str | Path) -> dict:
    """The lungedge metadata of an ONNX file, with ``preprocessing`` as a :class:`Preprocessing`."""
    meta = from_model(load_checked(path), str(path))
    meta["preprocessing"] = Preprocessing.from_dict(meta["preprocessing"])
    return meta
