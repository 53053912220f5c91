"""``--weights PATH``: a local weights file loaded into a freshly built model.

A lungedge checkpoint must be of the same architecture, and the new model is built with the
constructor arguments its ``build`` records. A plain state dict in torchvision's layout (e.g.
torchvision's ImageNet file, 1,000 classes, aux heads included) is built with the builder's
``foreign_kwargs`` (what torchvision sets for pretrained weights: ``transform_input=True`` for
GoogLeNet and Inception v3) and loads every tensor whose name and shape match; the head is skipped
when its class count differs; a ``.safetensors`` file is always such a plain state dict. A Keras ``.h5``
is a lungedge checkpoint or backbone weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LungedgeError
from ..io import sha256_file
from . import files


@dataclass
class WeightsFile:
    """A weights file, read once: what it is, the constructor arguments it implies, its tensors."""

    path: Path
    kind: str  # "lungedge" | "plain" | "keras-lungedge" | "keras-backbone"
    kwargs: dict = field(default_factory=dict)
    state: dict | None = None
    sha256: str = ""

    def record(self) -> dict:
        r = {"name": "file", "file": self.path.name, "sha256": self.sha256, "layout": self.kind}
        if self.kind == "plain" and self.kwargs:
            r["assumed"] = dict(self.kwargs)  # the foreign-file defaults applied
        return r


def read_weights_file(spec, path) -> WeightsFile:
    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"weights file not found: {path}")
    from .sniff import check_model_file

    fmt = check_model_file(path)  # a Git LFS pointer, an empty download, an HTML page: one line
    sha = sha256_file(path)
    if spec.framework == "keras":
        if files.has_keras_meta(path):
            meta = files.read_keras_meta(path)
            _same_architecture(spec, meta, path)
            return WeightsFile(path, "keras-lungedge", {}, sha256=sha)
        return WeightsFile(path, "keras-backbone", {}, sha256=sha)
    from .statedict import as_float32, describe_payload, normalise_keys, unwrap

    if fmt == "safetensors":  # tensors only, never lungedge's metadata: a plain state dict
        state = normalise_keys(files.read_safetensors(path), spec.head, path.name, [])
        return WeightsFile(path, "plain", dict(getattr(spec.builder, "foreign_kwargs", {})),
                           as_float32(state, path.name, []), sha)
    if fmt not in ("torch-zip", "torch-pickle") and path.suffix.lower() not in files.TORCH_SUFFIXES:
        raise LungedgeError(f"{path}: {spec.name} is a torch model; expected a .pth or .safetensors weights file")
    payload = files.read_pth(path)
    if files.is_lungedge_payload(payload):
        meta = payload.get("meta", {})
        _same_architecture(spec, meta, path)
        kwargs = (meta.get("build") or {}).get("kwargs", {})
        return WeightsFile(path, "lungedge", dict(kwargs), payload["state_dict"], sha)
    state, _ = unwrap(payload, path.name)  # a training checkpoint: the weights under its "state_dict" (or ...) key
    if state is None:
        raise LungedgeError(f"{path} is not a plain state dict of tensors (it holds {describe_payload(payload)})")
    state = normalise_keys(state, spec.head, path.name, [])  # wrapper prefixes, old DenseNet names, Sequential head
    return WeightsFile(path, "plain", dict(getattr(spec.builder, "foreign_kwargs", {})),
                       as_float32(state, path.name, []), sha)


def _same_architecture(spec, meta: dict, path: Path) -> None:
    arch = meta.get("architecture")
    if arch != spec.name:
        raise LungedgeError(f"{path} is a checkpoint of {arch}, not {spec.name}")


def load_state(spec, model, state: dict, source) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LungedgeError(f"{source} does not fit {spec.name} ({str(exc).splitlines()[0][:160]})") from None


def load_into(spec, model, wf: WeightsFile) -> None:
    """Load ``wf`` into ``model`` (built with ``wf.kwargs``)."""
    if wf.kind == "keras-lungedge":
        other = files.load_keras_file(wf.path)
        try:
            model.set_weights(other.get_weights())
        except ValueError as exc:
            raise LungedgeError(f"{wf.path} does not fit this {spec.name} ({exc})") from None
    elif wf.kind == "keras-backbone":
        _load_keras_backbone(spec, model, wf.path)
    elif wf.kind == "lungedge":
        load_state(spec, model, wf.state, wf.path)
    else:
        _load_matching(spec, model, wf)


_SKIPPED = re.compile(r"skipping|could not be loaded|freshly.initiali[sz]ed|mismatch", re.IGNORECASE)


def _load_keras_backbone(spec, model, path: Path) -> None:
    """Keras' ``load_weights`` into the model's base, all or nothing: what Keras only warns about (a layer
    skipped, left with its fresh initialisation) is refused like what it raises, in one line without the warning."""
    import warnings

    backbone = next(layer for layer in model.layers if hasattr(layer, "layers"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backbone.load_weights(str(path))
            problem = next((str(w.message) for w in caught if _SKIPPED.search(str(w.message))), None)
        except Exception as exc:  # noqa: BLE001 - keras raises many kinds
            problem = str(exc)
    if problem:
        raise LungedgeError(f"{path} does not hold {spec.name} backbone weights "
                            f"({(problem.strip().splitlines() or [''])[0][:160]})")


def _load_matching(spec, model, wf: WeightsFile) -> None:
    own = model.state_dict()
    usable = {k: v for k, v in wf.state.items() if k in own and own[k].shape == v.shape}
    backbone = [k for k in own if not k.startswith(spec.head + ".")]
    if sum(k in usable for k in backbone) < 0.9 * len(backbone):
        raise LungedgeError(f"{wf.path} does not hold {spec.name} weights "
                            f"({len(usable)} of {len(own)} tensors match by name and shape)")
    model.load_state_dict(usable, strict=False)
