"""Source kinds: one module per kind of file export reads, registered in :data:`KINDS`.

A kind is a :class:`SourceKind`: four functions, the same for every kind,

* ``recognise(path) -> bool`` — cheap: is this file of my kind (suffix, magic bytes)?
* ``load(path, request) -> Source`` — read it (refusing with one line what it cannot read);
* ``run(source, x) -> np.ndarray`` — the source framework's own output for a float32 batch;
* ``to_onnx(source, opset) -> onnx.ModelProto`` — FP32, input ``input`` and output ``logits``
  with a dynamic batch axis; export attaches the metadata, checks and writes it.

Adding a kind (TorchScript, ``torch.export``, plain ONNX, ...) is one module defining ``KIND``
and one line in :data:`KINDS`. The first kind whose ``recognise`` accepts a file loads it, so
a more specific kind goes before a broader one (TorchScript ``.pt`` before the state-dict ``.pt``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import LungedgeError, check_choice
from ..kind import SourceKind
from ..source import Request, Source


def _kinds() -> list[SourceKind]:
    from . import keras, onnxfile, torch, torchprog

    return [
        torchprog.TORCHSCRIPT,  # by content, before torch.KIND (which takes any .pth/.pt)
        torchprog.TORCH_EXPORT,
        torch.KIND,
        keras.KIND,
        onnxfile.KIND,
    ]


KINDS: list[SourceKind] = []  # filled on first use, so that importing this stays cheap


def kinds() -> list[SourceKind]:
    if not KINDS:
        KINDS.extend(_kinds())
    return KINDS


def kind_named(name: str) -> SourceKind:
    by_name = {kind.name: kind for kind in kinds()}
    return by_name[check_choice(name, by_name, "source kind")]


# what a file's bytes hold (models.sniff) -> the kind that reads it, whatever its name: a Hugging Face
# pytorch_model.bin, a PyTorch Lightning .ckpt (torch.save files), a TorchScript or ONNX file named otherwise
BY_CONTENT = {"torchscript": "torchscript", "torch-export": "torch.export", "torch-zip": "torch",
              "torch-pickle": "torch", "safetensors": "torch", "onnx": "onnx"}


def kind_of(path: Path) -> SourceKind:
    """The kind that reads ``path``: the first whose ``recognise`` takes it (its name), else the one its bytes
    say (:data:`BY_CONTENT`). A Keras file must carry a name Keras reads (it picks its reader by suffix)."""
    for kind in kinds():
        if kind.recognise(path):
            return kind
    from ...models.sniff import DESCRIBE, sniff

    fmt = sniff(path) if path.is_file() else None
    if fmt in BY_CONTENT:
        return kind_named(BY_CONTENT[fmt])
    if fmt in ("hdf5", "keras-zip"):
        raise LungedgeError(f"{path} holds {DESCRIBE[fmt]}, which Keras reads only under the name "
                            f"{'.h5' if fmt == 'hdf5' else '.keras'}: copy or rename it so")
    accepted = "; ".join(k.describe for k in kinds())
    raise LungedgeError(f"{path} is not a model file export reads (accepted: {accepted})")


def load_source(path: str | Path, request: Request) -> Source:
    """The file at ``path`` loaded by the first kind that recognises it."""
    from ...models.registry import import_torch_first

    import_torch_first()  # torch before tensorflow, whatever the kind
    from ...models.sniff import check_model_file

    path = Path(path)
    if not path.is_file():
        raise LungedgeError(f"checkpoint not found: {path}")
    check_model_file(path)  # a Git LFS pointer, an empty file, an HTML page, random bytes: one line
    return kind_of(path).load(path, request)


def run_source(source: Source, x: np.ndarray) -> np.ndarray:
    from ..declared import keep_first

    return keep_first(kind_named(source.kind).run(source, x), source.keep)


def source_to_onnx(source: Source, opset: int):
    from ..declared import onnx_keep_first

    return onnx_keep_first(kind_named(source.kind).to_onnx(source, opset), source.keep)
