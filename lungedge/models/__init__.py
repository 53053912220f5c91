"""Model registry, builders and checkpoint I/O (torch and Keras imported lazily)."""

from .registry import (MODES, REGISTRY, ModelSpec, apply_mode, count_parameters, create, describe, get_spec,
                       import_torch_first, names)
from .checkpoint import load_checkpoint, read_meta

__all__ = ["MODES", "REGISTRY", "ModelSpec", "apply_mode", "count_parameters", "create", "describe", "get_spec",
           "import_torch_first", "names", "load_checkpoint", "read_meta"]
