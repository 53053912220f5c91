"""Checkpoint files: ``.pth`` (torch) and ``.h5`` (Keras), each carrying its own metadata.

A ``.pth`` is a plain dictionary of tensors and JSON-like values::

    {"format": "lungedge-checkpoint/1", "meta": {...}, "state_dict": {...}, "train_state": {...}?}

and is only ever read with ``torch.load(weights_only=True)``: a file that needs
arbitrary unpickling (code execution) is refused. A Keras checkpoint is the model
saved as HDF5 with the same metadata as a JSON string in the file's ``lungedge_meta``
attribute. ``load_checkpoint(path)`` rebuilds the model from the file alone; the
file's SHA-256 is computed by the reader (``meta["checkpoint_sha256"]``).
"""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
from pathlib import Path

from .. import __version__
from ..errors import LungedgeError
from ..io import atomic_write_bytes, sha256_file
from ..preprocess import Preprocessing

FORMAT = "lungedge-checkpoint/1"
TORCH_SUFFIXES = (".pth", ".pt")
KERAS_SUFFIXES = (".h5", ".hdf5")


def versions(framework: str) -> dict:
    import numpy

    v = {"lungedge": __version__, "python": platform.python_version(), "numpy": numpy.__version__}
    import torch
    import torchvision

    v.update(torch=torch.__version__, torchvision=torchvision.__version__)
    if framework == "keras":
        import keras
        import tensorflow as tf

        v.update(keras=keras.__version__, tensorflow=tf.__version__)
    return v


def make_meta(spec, classes, preprocessing: Preprocessing, mode: str, split_fingerprint: str | None,
              epoch: int, history: list, **extra) -> dict:
    """The metadata every checkpoint carries (JSON-serialisable)."""
    meta = {
        "format": FORMAT,
        "architecture": spec.name,
        "framework": spec.framework,
        "classes": list(classes),
        "num_classes": len(classes),
        "input_size": preprocessing.size,
        "preprocessing": preprocessing.to_dict(),
        "mode": mode,
        "split_fingerprint": split_fingerprint,
        "epoch": int(epoch),
        "history": history,
        "versions": versions(spec.framework),
    }
    meta.update(extra)
    # a JSON round trip: plain dict/list/str/float only (torch.load(weights_only=True) reads nothing else)
    return json.loads(json.dumps(meta, allow_nan=False))


# -- torch ------------------------------------------------------------------------------------------

def _read_pth(path: Path):
    """torch.load with weights_only=True; anything that needs arbitrary unpickling is refused."""
    import pickle
    import zipfile

    import torch

    if not path.is_file():
        raise LungedgeError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LungedgeError(f"{path} is not a plain state-dict checkpoint; refusing to unpickle it "
                            "(it holds objects that would run code when loaded)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise LungedgeError(f"{path} is not a readable torch checkpoint ({str(exc).splitlines()[0][:160]})") from None


def _is_tensor_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_torch_checkpoint(path) -> dict:
    """The payload of a lungedge ``.pth`` (format, meta, state_dict, optional train_state)."""
    path = Path(path)
    payload = _read_pth(path)
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT and isinstance(payload.get("meta"), dict)
            and _is_tensor_dict(payload.get("state_dict"))):
        raise LungedgeError(f"{path} is not a lungedge checkpoint (format {FORMAT!r} expected)")
    return payload


def save_torch_checkpoint(path, model, meta: dict, train_state: dict | None = None) -> Path:
    """Atomically write a ``.pth``: state dict (CPU tensors) + metadata (+ optimizer/RNG state to resume)."""
    import torch

    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {"format": FORMAT, "meta": meta,
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    if train_state is not None:
        payload["train_state"] = train_state
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _load_state(spec, model, state: dict, source) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LungedgeError(f"{source} does not fit {spec.name} ({str(exc).splitlines()[0][:160]})") from None


def load_weights_file(spec, model, path) -> None:
    """Load a local weights file into a freshly built ``model`` (``--weights PATH``).

    A lungedge checkpoint must be of the same architecture. A plain state dict (e.g.
    torchvision's ImageNet file) loads every tensor whose name and shape match; the
    head is skipped when its class count differs.
    """
    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"weights file not found: {path}")
    if spec.framework == "keras":
        _load_keras_weights(spec, model, path)
        return
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise LungedgeError(f"{path}: {spec.name} is a torch model; expected a .pth weights file")
    payload = _read_pth(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        arch = payload.get("meta", {}).get("architecture")
        if arch != spec.name:
            raise LungedgeError(f"{path} is a checkpoint of {arch}, not {spec.name}")
        _load_state(spec, model, payload["state_dict"], path)
        return
    if not _is_tensor_dict(payload):
        raise LungedgeError(f"{path} is not a plain state dict of tensors")
    own = model.state_dict()
    usable = {k: v for k, v in payload.items() if k in own and own[k].shape == v.shape}
    backbone = [k for k in own if not k.startswith(spec.head + ".")]
    if sum(k in usable for k in backbone) < 0.9 * len(backbone):
        raise LungedgeError(f"{path} does not hold {spec.name} weights "
                            f"({len(usable)} of {len(own)} tensors match by name and shape)")
    model.load_state_dict(usable, strict=False)


# -- keras ------------------------------------------------------------------------------------------

META_ATTR = "lungedge_meta"


def save_keras_checkpoint(path, model, meta: dict) -> Path:
    """Atomically write the Keras model as HDF5 with the metadata JSON in its attributes."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".h5", dir=path.parent)
    os.close(fd)
    try:
        model.save(tmp, include_optimizer=False) if _accepts_include_optimizer(model) else model.save(tmp)
        with h5py.File(tmp, "a") as fh:
            fh.attrs[META_ATTR] = json.dumps(meta, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _accepts_include_optimizer(model) -> bool:
    import inspect

    return "include_optimizer" in inspect.signature(model.save).parameters


def read_keras_meta(path) -> dict:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"checkpoint not found: {path}")
    try:
        with h5py.File(path, "r") as fh:
            raw = fh.attrs.get(META_ATTR)
    except OSError:
        raise LungedgeError(f"{path} is not an HDF5 file") from None
    if raw is None:
        raise LungedgeError(f"{path} is not a lungedge checkpoint (no {META_ATTR} attribute)")
    meta = json.loads(raw if isinstance(raw, str) else raw.decode("utf-8"))
    if meta.get("format") != FORMAT:
        raise LungedgeError(f"{path} is not a lungedge checkpoint (format {FORMAT!r} expected)")
    return meta


def _load_keras_weights(spec, model, path: Path) -> None:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            is_ours = META_ATTR in fh.attrs
    except OSError:
        raise LungedgeError(f"{path} is not an HDF5 weights file") from None
    if is_ours:
        meta = read_keras_meta(path)
        if meta["architecture"] != spec.name:
            raise LungedgeError(f"{path} is a checkpoint of {meta['architecture']}, not {spec.name}")
        other, _ = load_checkpoint(path)
        try:
            model.set_weights(other.get_weights())
        except ValueError as exc:
            raise LungedgeError(f"{path} does not fit this {spec.name} ({exc})") from None
        return
    backbone = next(layer for layer in model.layers if hasattr(layer, "layers"))
    try:
        backbone.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - keras raises many kinds
        raise LungedgeError(f"{path} does not hold {spec.name} backbone weights ({str(exc).splitlines()[0][:160]})") from None


# -- any checkpoint -------------------------------------------------------------------------------

def read_meta(path) -> dict:
    """Metadata of a checkpoint without building the model."""
    path = Path(path)
    if path.suffix.lower() in KERAS_SUFFIXES:
        meta = read_keras_meta(path)
    elif path.suffix.lower() in TORCH_SUFFIXES:
        meta = read_torch_checkpoint(path)["meta"]
    else:
        raise LungedgeError(f"{path}: unknown checkpoint type (expected .pth or .h5)")
    meta = dict(meta)
    meta["checkpoint_sha256"] = sha256_file(path)
    meta["checkpoint_path"] = str(path)
    return meta


def load_checkpoint(path, device: str = "cpu", mode: str | None = None, unfreeze=None):
    """Rebuild the model saved in ``path``: (model, meta). Torch models come back in eval mode."""
    from .registry import apply_mode, create, get_spec

    path = Path(path)
    meta = read_meta(path)
    spec = get_spec(meta["architecture"])
    if spec.framework == "keras":
        from .registry import import_keras

        keras = import_keras()

        try:
            model = keras.models.load_model(str(path), compile=False)
        except Exception as exc:  # noqa: BLE001
            raise LungedgeError(f"{path}: cannot load the Keras model ({str(exc).splitlines()[0][:160]})") from None
        if mode is not None:
            apply_mode(spec, model, mode, unfreeze)
        return model, meta
    payload = read_torch_checkpoint(path)
    model = create(spec.name, num_classes=meta["num_classes"], weights="none", mode=mode or meta.get("mode"),
                   image_size=meta["input_size"], unfreeze=unfreeze)
    _load_state(spec, model, payload["state_dict"], path)
    model.to(device).eval()
    return model, meta
