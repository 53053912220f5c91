"""Checkpoint files on disk: ``.pth`` (torch) and ``.h5`` (Keras), each carrying its own metadata; and
``.safetensors`` files from outside, which are always a bare state dict (:func:`read_safetensors`).

A ``.pth`` is a plain dictionary of tensors and JSON-like values::

    {"format": "lungedge-checkpoint/1", "meta": {...}, "state_dict": {...}, "train_state": {...}?}

and is only ever read with ``torch.load(weights_only=True)``: a file that needs
arbitrary unpickling (code execution) is refused. A Keras checkpoint is the model
saved as HDF5 with the same metadata as a JSON string in the file's ``lungedge_meta``
attribute. This module only reads and writes; rebuilding a model is
:func:`lungedge.models.checkpoint.load_checkpoint`.
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
from ..io import WriteError, atomic_write_bytes, publish_file, settle, sha256_file, write_error

FORMAT = "lungedge-checkpoint/1"
TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIXES = (".safetensors",)
KERAS_SUFFIXES = (".h5", ".hdf5")
META_ATTR = "lungedge_meta"


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


# -- torch ------------------------------------------------------------------------------------------

def read_pth(path: Path):
    """torch.load with weights_only=True; anything that needs arbitrary unpickling is refused."""
    import pickle
    import zipfile

    import torch

    from .sniff import check_model_file

    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"checkpoint not found: {path}")
    check_model_file(path)  # LFS pointer, empty, HTML page, random bytes: said in one line
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LungedgeError(f"{path} is not a plain state-dict checkpoint; refusing to unpickle it "
                            "(it holds objects that would run code when loaded)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise LungedgeError(f"{path} is not a readable torch checkpoint ({torch_load_problem(exc)})") from None


def torch_load_problem(exc: BaseException) -> str:
    """Why torch.load failed, in one short line: the format versions where a newer PyTorch wrote the file, else
    torch's first line without its C++ '[enforce fail at FILE:LINE] .' prefix."""
    import re

    import torch

    text = str(exc)
    newer = re.search(r"PyTorch file with version (\d+), but the maximum supported version for reading is (\d+)", text)
    if newer:
        return (f"saved by a newer PyTorch: file format version {newer[1]}, torch {torch.__version__} here reads "
                f"up to {newer[2]}")
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text.strip())
    return ((text.splitlines() or [type(exc).__name__])[0] or type(exc).__name__)[:160]


def read_safetensors(path) -> dict:
    """The tensors of a ``.safetensors`` file (``safetensors.torch.save_file(model.state_dict(), ...)``,
    ``save_model``; Hugging Face, timm) as a state dict on the CPU, in the dtypes stored. The format holds tensors
    and an optional ``__metadata__`` of strings (not needed, not read), nothing that runs code when loaded, and
    never lungedge's metadata: it is always a state dict from outside. A damaged file (cut short, a header that is
    not JSON or longer than the file, a dtype the library does not know) or one holding no tensors is one line."""
    from .sniff import expect

    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"checkpoint not found: {path}")
    expect(path, ("safetensors",), "a safetensors file")  # LFS pointer, empty, HTML page, a damaged header: one line
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise LungedgeError(f"{path}: reading a .safetensors file needs the safetensors package "
                            "(pip install safetensors==0.8.0)") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            state = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        why = " ".join(str(exc).split()).removeprefix("Error while deserializing header: ")
        raise LungedgeError(f"{path} is not a readable safetensors file ({why[:160]})") from None
    if not state:
        raise LungedgeError(f"{path} is a safetensors file holding no tensors (only a header): not a model's weights; "
                            "save them with safetensors.torch.save_file(model.state_dict(), ...)")
    return state


def is_tensor_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def is_lungedge_payload(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_torch_checkpoint(path) -> dict:
    """The payload of a lungedge ``.pth`` (format, meta, state_dict, optional train_state)."""
    path = Path(path)
    settle(path.parent)  # a set a killed training left half renamed there is completed first
    payload = read_pth(path)
    if not (is_lungedge_payload(payload) and isinstance(payload.get("meta"), dict)
            and is_tensor_dict(payload.get("state_dict"))):
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


# -- keras ------------------------------------------------------------------------------------------

def save_keras_checkpoint(path, model, meta: dict) -> Path:
    """Atomically write the Keras model as HDF5 with the metadata JSON in its attributes (named like
    :func:`lungedge.io.atomic_write_bytes`'s files, so also together with a :func:`~lungedge.io.written_together`
    set); a failed write is a :class:`~lungedge.io.WriteError` naming ``path``."""
    import h5py

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".h5", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        model.save(tmp, include_optimizer=False) if _accepts_include_optimizer(model) else model.save(tmp)
        with h5py.File(tmp, "a") as fh:
            fh.attrs[META_ATTR] = json.dumps(meta, allow_nan=False)
    except (OSError, RuntimeError) as exc:  # h5py reports a failed write (full disk) as either
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno:
            raise write_error(path, exc) from None
        raise WriteError(f"cannot write {path}: {' '.join(str(exc).split())[:300] or type(exc).__name__}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return publish_file(tmp, path)


def _accepts_include_optimizer(model) -> bool:
    import inspect

    return "include_optimizer" in inspect.signature(model.save).parameters


def has_keras_meta(path) -> bool:
    import h5py

    from .sniff import check_model_file

    check_model_file(path)
    try:
        with h5py.File(path, "r") as fh:
            return META_ATTR in fh.attrs
    except OSError:
        raise LungedgeError(f"{path} is not an HDF5 file") from None


def read_keras_meta(path) -> dict:
    import h5py

    path = Path(path)
    settle(path.parent)  # a set a killed training left half renamed there is completed first
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


def keras_weights_only(path) -> bool:
    """Whether ``path`` is an HDF5 file of Keras weights alone (``model.save_weights``: Keras 3's
    ``.weights.h5`` with ``layers``/``vars`` groups, Keras 2's ``layer_names`` attribute) and no model config."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if "model_config" in fh.attrs:
                return False
            return "layer_names" in fh.attrs or ("layers" in fh and "vars" in fh)
    except OSError:
        return False


def weights_only_error(path) -> LungedgeError:
    return LungedgeError(
        f"{path} holds Keras weights only (model.save_weights), not the model's architecture, which lungedge needs: "
        "in Keras, build the model, call model.load_weights() on this file and save the whole model with "
        "model.save(\"model.h5\") or model.save(\"model.keras\"), then export that file")


TRUST_CODE_ENV = "LUNGEDGE_KERAS_TRUST_CODE"  # "1": Keras may deserialize Lambda layers' Python code (--trust-pickle)


def load_keras_file(path, trust_code: bool | None = None):
    """The Keras model stored in ``path`` (architecture and weights), uncompiled. A ``Lambda`` layer holding
    Python code (which runs when loaded) is refused unless ``trust_code`` (default: the environment's
    :data:`TRUST_CODE_ENV`, set for the conversion children of a ``--trust-pickle`` export)."""
    from .frameworks import import_keras

    settle(Path(path).parent)  # a set a killed training left half renamed there is completed first
    if Path(path).suffix.lower() in KERAS_SUFFIXES and keras_weights_only(path):
        raise weights_only_error(path)
    keras = import_keras()
    if trust_code is None:
        trust_code = os.environ.get(TRUST_CODE_ENV) == "1"
    kwargs = {"safe_mode": False} if trust_code else {}
    try:
        legacy = _keras2_nested_config(path)
        if legacy is not None:
            return _load_keras2_h5(path, legacy, safe_mode=not trust_code)
        try:
            return keras.models.load_model(str(path), compile=False, **kwargs)
        except TypeError as exc:  # a Keras without safe_mode
            if not kwargs or "safe_mode" not in str(exc):
                raise
            return keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        if "Lambda" in text and ("safe_mode" in text or "arbitrary code" in text):
            raise LungedgeError(f"{path} holds a Lambda layer with Python code, which runs when loaded; refusing "
                                "it. If you trust its origin, pass --trust-pickle") from None
        raise LungedgeError(f"{path}: cannot load the Keras model ({_keras_cause(text)}){_saved_by_newer(path, keras)}"
                            ) from None


def _keras_cause(text: str) -> str:
    """The innermost reason in a Keras load error, which nests one 'could not be deserialized ... config={...}'
    paragraph per enclosing layer before it ('Exception encountered: Unrecognized keyword arguments ...')."""
    inner = text.rsplit("Exception encountered:", 1)[-1]
    lines = [line.strip() for line in inner.strip().splitlines() if line.strip()]
    return (lines[0] if lines else "no reason given")[:200]


def _saved_by_newer(path, keras) -> str:
    """'; saved by Keras X, newer than Keras Y here, ...' where the file records a newer Keras than this one
    (a ``.keras`` archive's metadata.json, an ``.h5``'s keras_version attribute); else ''."""
    import zipfile

    saved = None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                saved = json.loads(zf.read("metadata.json")).get("keras_version")
        else:
            import h5py

            with h5py.File(path, "r") as fh:
                saved = fh.attrs.get("keras_version")
        saved = saved.decode() if isinstance(saved, bytes) else saved
    except Exception:  # noqa: BLE001 - no record of the version: nothing to add
        return ""

    def key(version):
        return tuple(int(p) for p in str(version).split("+")[0].split(".")[:3] if p.isdigit())

    if not isinstance(saved, str) or not key(saved) or key(saved) <= key(keras.__version__):
        return ""
    return (f"; saved by Keras {saved}, newer than Keras {keras.__version__} here, which may not know all that "
            "it writes")


def _fix_nested(config) -> int:
    """Keras 2's configs of the layers inside a model, made what Keras 3's legacy h5 loader reads, in place;
    returns how many were changed. Keras 3 fixes these two only for the outermost model's own config, so a
    Keras 2 ``Sequential`` holding ``ResNet50`` does not load without this:

    * a built layer's ``axis`` written as a list (``BatchNormalization``'s ``[3]``) -> its one int;
    * a nested functional model's ``input_layers``/``output_layers`` written as a list of one
      ``[name, node, index]`` -> that entry (else the nested model returns a list, which the next layer refuses)."""
    n = 0
    if isinstance(config, dict):
        inner = config.get("config")
        if "class_name" in config and isinstance(inner, dict):
            axis = inner.get("axis")
            if isinstance(axis, list) and len(axis) == 1 and isinstance(axis[0], int):
                inner["axis"] = axis[0]
                n += 1
            for key in ("input_layers", "output_layers"):
                ends = inner.get(key)
                if isinstance(ends, list) and len(ends) == 1 and isinstance(ends[0], list) \
                        and len(ends[0]) == 3 and isinstance(ends[0][0], str):
                    inner[key] = ends[0]
                    n += 1
        n += sum(_fix_nested(v) for v in config.values())
    elif isinstance(config, list):
        n += sum(_fix_nested(v) for v in config)
    return n


def _keras2_nested_config(path):
    """The model config of an HDF5 Keras file whose nested layers need :func:`_fix_nested`, fixed; else None."""
    import h5py

    if Path(path).suffix.lower() not in KERAS_SUFFIXES:
        return None
    try:
        with h5py.File(path, "r") as fh:
            raw = fh.attrs.get("model_config")
    except OSError:
        return None
    if raw is None:
        return None
    config = json.loads(raw if isinstance(raw, str) else raw.decode("utf-8"))
    layers = config.get("config", {}).get("layers") if isinstance(config.get("config"), dict) else None
    return config if layers is not None and _fix_nested(layers) else None


def _load_keras2_h5(path, config: dict, safe_mode: bool):
    """Keras 3's own HDF5 loader on ``path`` with ``config`` as its model config: an in-memory HDF5 file
    (nothing written to disk; the user's file is only read) holding the fixed config and a copy of the weights
    (Keras refuses an HDF5 external link)."""
    import uuid

    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    mem = h5py.File(f"lungedge-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False)
    try:
        with h5py.File(path, "r") as src:
            for key, value in src.attrs.items():
                if key != "model_config":
                    mem.attrs[key] = value
            src.copy(src["model_weights"], mem, "model_weights")
        mem.attrs["model_config"] = json.dumps(config)
        return legacy_h5_format.load_model_from_hdf5(mem, compile=False, safe_mode=safe_mode)
    finally:
        mem.close()


# -- any checkpoint -------------------------------------------------------------------------------

def read_meta(path) -> dict:
    """Metadata of a checkpoint without building the model."""
    path = Path(path)
    if path.suffix.lower() in KERAS_SUFFIXES:
        meta = read_keras_meta(path)
    elif path.suffix.lower() in TORCH_SUFFIXES:
        meta = read_torch_checkpoint(path)["meta"]
    elif path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from .sniff import check_model_file

        check_model_file(path)  # LFS pointer, empty, damaged: said as such first
        raise LungedgeError(f"{path} is not a lungedge checkpoint (a .safetensors file holds a bare state dict, "
                            "without the classes and preprocessing lungedge records)")
    else:
        raise LungedgeError(f"{path}: unknown checkpoint type (expected .pth or .h5)")
    meta = dict(meta)
    meta["checkpoint_sha256"] = sha256_file(path)
    meta["checkpoint_path"] = str(path)
    return meta
