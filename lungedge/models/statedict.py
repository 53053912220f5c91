"""State dicts as training code leaves them, brought to torchvision's layout (each change said in one line).

* :func:`unwrap`: a training checkpoint ``{"state_dict" | "model_state_dict" | "model" | "net" | ...: weights,
  "optimizer": ..., "epoch": ...}`` -> its weights (the optimizer state and counters beside them are left out);
* :func:`normalise_keys`: the prefixes a wrapper adds to every name (``module.`` from DataParallel,
  ``_orig_mod.`` from ``torch.compile``, ``model.``/``net.`` from a wrapper module or PyTorch Lightning),
  DenseNet's pre-0.3 names (``norm.1`` for ``norm1``, which torchvision's own loader renames too), and a head
  written as ``nn.Sequential(nn.Dropout(p), nn.Linear(...))`` (its one Linear is the head at inference);
* :func:`as_float32`: weights saved in another precision (``model.half().state_dict()``, a bfloat16
  ``.safetensors``) in float32, the precision the registry models are rebuilt in.
"""

from __future__ import annotations

import re

from ..errors import LungedgeError

# where training scripts put the model's weights in a checkpoint dict, most specific first
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model_state", "model", "net", "network", "weights", "params")
# prefixes stripped where every name (module., _orig_mod.: any name) carries them
PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "network.")
_DENSENET_OLD = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                           r"running_var|num_batches_tracked))$")


def is_tensor_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def unwrap(payload, name: str) -> tuple[dict | None, list[str]]:
    """(the state dict in ``payload``, notes): ``payload`` itself when it is one, else the tensors under the
    first of :data:`WRAPPER_KEYS` that holds them; ``None`` when there are none."""
    if is_tensor_dict(payload):
        return payload, []
    if not isinstance(payload, dict):
        return None, []
    for key in WRAPPER_KEYS:
        inner = payload.get(key)
        if is_tensor_dict(inner):
            beside = [str(k) for k in payload if k != key]
            return inner, [f"{name} is a training checkpoint: exporting the weights under {key!r}"
                           + (f" (left out: {', '.join(beside[:6])}{', ...' if len(beside) > 6 else ''})"
                              if beside else "")]
    return None, []


def unwrap_module(payload, name: str):
    """(the whole ``nn.Module`` under the first of :data:`WRAPPER_KEYS` that holds one, notes) for a training
    checkpoint ``{"model": <module>, "optimizer": ..., "epoch": ...}`` read with ``--trust-pickle``;
    ``(None, [])`` when there is none."""
    import torch

    if not isinstance(payload, dict):
        return None, []
    for key in WRAPPER_KEYS:
        inner = payload.get(key)
        if isinstance(inner, torch.nn.Module):
            beside = [str(k) for k in payload if k != key]
            return inner, [f"{name} is a training checkpoint: exporting the pickled model under {key!r}"
                           + (f" (left out: {', '.join(beside[:6])}{', ...' if len(beside) > 6 else ''})"
                              if beside else "")]
    return None, []


def describe_payload(payload) -> str:
    """What a torch.save payload that holds no state dict is, for a one-line refusal."""
    if isinstance(payload, dict):
        keys = [str(k) for k in payload][:6]
        return f"a dict with keys {', '.join(keys)}{', ...' if len(payload) > 6 else ''} and no state dict under them"
    return f"a {type(payload).__name__}"


def as_float32(state: dict, name: str, notes: list[str]) -> dict:
    """``state`` with its floating-point tensors of other precisions (float16, bfloat16, float64, float8) in
    float32, said in one line (``load_state_dict`` casts them so too, silently); a tensor that has no float32
    value (complex, packed float4) is refused in one line rather than cast or left to fail inside torch."""
    import torch

    dtypes, out = set(), {}
    for k, v in state.items():
        if v.is_complex() or (v.is_floating_point() and v.dtype != torch.float32):
            dtype = str(v.dtype).removeprefix("torch.")
            try:
                if v.is_complex():
                    raise RuntimeError("complex")
                v = v.float()
            except RuntimeError:
                raise LungedgeError(f"{name}: tensor {k} is {dtype}, which has no float32 value to load into the "
                                    "model; save the weights as float32, float16 or bfloat16") from None
            dtypes.add(dtype)
        out[k] = v
    if dtypes:
        notes.append(f"{name} holds {', '.join(sorted(dtypes))} weights; converted to float32 (the FP32 ONNX; "
                     "--fp16 writes the FP16 one)")
    return out


def _strip_prefixes(state: dict, notes: list[str], extra: bool) -> dict:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES if extra else PREFIXES[:2]:
            if prefix in ("module.", "_orig_mod."):
                if any(k.startswith(prefix) for k in state):
                    state = {k.removeprefix(prefix): v for k, v in state.items()}
                    notes.append(f"removed the {prefix!r} prefix from the tensor names"
                                 f" ({'DataParallel' if prefix == 'module.' else 'torch.compile'})")
                    changed = True
            elif all(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                notes.append(f"removed the {prefix!r} prefix every tensor name carries (a wrapper module's)")
                changed = True
    return state


def _densenet_old_names(state: dict, notes: list[str]) -> dict:
    renamed = {}
    for k, v in state.items():
        m = _DENSENET_OLD.match(k)
        renamed[m.group(1) + m.group(2) if m else k] = v
    n = sum(1 for k in state if _DENSENET_OLD.match(k))
    if n:
        notes.append(f"renamed {n} DenseNet tensors from the old names (norm.1 -> norm1, conv.2 -> conv2), as "
                     "torchvision's own loader does")
    return renamed


def _sequential_head(state: dict, head: str, name: str, notes: list[str]) -> dict:
    """``head.N.weight``/``head.N.bias`` of one Linear inside an ``nn.Sequential`` (the other entries hold no
    weights: Dropout) -> ``head.weight``/``head.bias``; a head with several weighted layers refused."""
    if f"{head}.weight" in state:
        return state
    inner = {k[len(head) + 1:]: v for k, v in state.items() if k.startswith(head + ".")}
    layers = sorted({k.split(".")[0] for k in inner})
    if not layers or not all(n.isdigit() for n in layers):
        return state
    if len(layers) != 1 or set(inner) != {f"{layers[0]}.weight", f"{layers[0]}.bias"} \
            or inner[f"{layers[0]}.weight"].dim() != 2:
        raise LungedgeError(
            f"{name}: its head {head} is an nn.Sequential with weights in {len(layers)} layer"
            f"{'s' if len(layers) != 1 else ''} ({', '.join(f'{head}.{n}' for n in layers[:4])}), not one Linear; "
            "lungedge rebuilds the registry head only: export the model as TorchScript, torch.export (.pt2) or "
            "ONNX and use --custom")
    n = layers[0]
    w = inner[f"{n}.weight"]
    notes.append(f"the head {head} is an nn.Sequential whose only weights are {head}.{n} (Linear {w.shape[1]} -> "
                 f"{w.shape[0]}); exported as that Linear: layers without weights are not in a state dict (a Dropout does "
                 "nothing at inference; a Softmax after it changes no prediction, the logits are softmaxed by lungedge)")
    rest = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    rest[f"{head}.weight"], rest[f"{head}.bias"] = w, inner[f"{n}.bias"]
    return rest


def normalise_keys(state: dict, head: str, name: str, notes: list[str], wrapper_prefixes: bool = True) -> dict:
    """``state`` renamed to torchvision's layout (see the module doc); each change appended to ``notes``.
    ``wrapper_prefixes=False``: only ``module.``/``_orig_mod.`` are stripped (a pickled model's own names)."""
    state = _strip_prefixes(dict(state), notes, wrapper_prefixes and f"{head}.weight" not in state)
    state = _densenet_old_names(state, notes)
    return _sequential_head(state, head, name, notes)
