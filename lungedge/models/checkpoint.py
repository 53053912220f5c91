"""Checkpoints: the metadata every checkpoint carries (:func:`make_meta`, with the model's ``build``
record) and :func:`load_checkpoint`, which rebuilds exactly the function that was saved.

File reading and writing live in :mod:`.files` (re-exported here); the file's SHA-256 is
computed by the reader (``meta["checkpoint_sha256"]``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..preprocess import Preprocessing
from .files import (FORMAT, KERAS_SUFFIXES, META_ATTR, TORCH_SUFFIXES, load_keras_file, read_keras_meta, read_meta,
                    read_torch_checkpoint, save_keras_checkpoint, save_torch_checkpoint, versions)
from .registry import apply_mode, get_spec, legacy_build, rebuild
from .weights import load_state


def make_meta(spec, classes, preprocessing: Preprocessing, mode: str, split_fingerprint: str | None,
              epoch: int, history: list, build: dict | None = None, **extra) -> dict:
    """The metadata every checkpoint carries (JSON-serialisable). ``build`` is the record
    :func:`lungedge.models.registry.build_model` returned; without it, the random-init build."""
    meta = {
        "format": FORMAT,
        "architecture": spec.name,
        "framework": spec.framework,
        "classes": list(classes),
        "num_classes": len(classes),
        "input_size": preprocessing.size,
        "preprocessing": preprocessing.to_dict(),
        "build": build or legacy_build(spec, len(classes), preprocessing.size),
        "mode": mode,
        "split_fingerprint": split_fingerprint,
        "epoch": int(epoch),
        "history": history,
        "versions": versions(spec.framework),
    }
    meta.update(extra)
    # a JSON round trip: plain dict/list/str/float only (torch.load(weights_only=True) reads nothing else)
    return json.loads(json.dumps(meta, allow_nan=False))


def build_of(meta: dict) -> dict:
    """The checkpoint's ``build`` record; for files written before builds were recorded, the
    random-init arguments (what loading assumed before)."""
    if meta.get("build"):
        return meta["build"]
    return legacy_build(get_spec(meta["architecture"]), int(meta["num_classes"]), int(meta["input_size"]))


def load_checkpoint(path, device: str = "cpu", mode: str | None = None, unfreeze=None):
    """Rebuild the model saved in ``path``: (model, meta). Torch models come back in eval mode,
    built from the checkpoint's ``build`` record (constructor arguments as trained)."""
    path = Path(path)
    meta = read_meta(path)
    spec = get_spec(meta["architecture"])
    if spec.framework == "keras":
        model = load_keras_file(path)  # the HDF5 file holds the architecture itself
        if mode is not None:
            apply_mode(spec, model, mode, unfreeze)
        return model, meta
    payload = read_torch_checkpoint(path)
    model = rebuild(build_of(meta))
    load_state(spec, model, payload["state_dict"], path)
    apply_mode(spec, model, mode or meta.get("mode") or spec.defaults.mode, unfreeze)
    model.to(device).eval()
    return model, meta


__all__ = ["FORMAT", "KERAS_SUFFIXES", "META_ATTR", "TORCH_SUFFIXES", "build_of", "load_checkpoint", "make_meta",
           "read_keras_meta", "read_meta", "read_torch_checkpoint", "save_keras_checkpoint", "save_torch_checkpoint"]
