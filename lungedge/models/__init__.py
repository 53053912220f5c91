"""Model registry, builders and checkpoint I/O (torch and Keras imported lazily).

Imports run one way: frameworks, spec <- builders <- files <- weights <- registry <- checkpoint.
"""

from .registry import (MODES, REGISTRY, Built, ModelSpec, apply_mode, build_model, count_parameters, create, describe,
                       get_spec, import_torch_first, names, rebuild)
from .checkpoint import build_of, load_checkpoint, read_meta

__all__ = ["MODES", "REGISTRY", "Built", "ModelSpec", "apply_mode", "build_model", "count_parameters", "create",
           "describe", "get_spec", "import_torch_first", "names", "rebuild", "build_of", "load_checkpoint", "read_meta"]
