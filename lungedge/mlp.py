"""The research group's hand-worked MLP as a NumPy reference kernel.

    x ∈ R³ → z1 = W1 x + b1, h1 = relu(z1)        Linear(3, 4) + ReLU
           → z2 = W2 h1 + b2, h2 = relu(z2)       Linear(4, 4) + ReLU
           → z3 = W3 h2 + b3, ŷ = tanh(z3)        Linear(4, 1) + tanh
    L = ½ Σ (ŷ − y)²

Each W_l has the maths' shape (fan_out, fan_in), so on a batch of rows X a layer is
``X @ W.T + b`` and the per-sample gradient of W_l is the outer product δ_l ⊗ h_{l-1}.
Forward and backward are vectorised over the batch and written by hand (no
autograd). Arrays are float64 unless float32 is asked for, and then every step
computes in float32. Only NumPy is imported here; onnx and onnxruntime are imported
inside the functions that need them, and the torch and micrograd cross-checks live
in :mod:`lungedge.mlp_backends`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import LungedgeError
from .io import atomic_write_bytes, write_json

SIZES = (3, 4, 4, 1)
NAMES = ("W1", "b1", "W2", "b2", "W3", "b3")
SHAPES = {"W1": (4, 3), "b1": (4,), "W2": (4, 4), "b2": (4,), "W3": (1, 4), "b3": (1,)}

# The four examples the group worked by hand.
XS = np.array([[2.0, 3.0, -1.0], [3.0, -1.0, 0.5], [0.5, 1.0, 1.0], [1.0, 1.0, -1.0]])
YS = np.array([1.0, -1.0, -1.0, 1.0])

# Full-batch SGD on the summed loss. From seed 0: L = 1.899 at the start, below 0.01
# from step 92, 0.0027 after 300 steps. 46 of seeds 0-49 get below 0.01 this way; the
# other four stall where ReLUs are dead: seed 5 at L ≈ 1.333, seeds 8, 37 and 40 at
# L = 2 (no second-layer unit is ever active, so only b3 learns and ŷ → 0).
DEFAULT_STEPS = 300
MAX_STEPS = 1_000_000  # a loss per step is kept: 10**12 steps would run for days and fill the memory
DEFAULT_LR = 0.1

WEIGHTS_FORMAT = "lungedge.mlp"
DTYPES = {"float64": np.float64, "float32": np.float32}

Params = dict  # {"W1": array, "b1": array, ..., "b3": array}


class Cache(NamedTuple):
    """What the forward pass keeps for the backward pass."""

    X: np.ndarray
    z1: np.ndarray
    h1: np.ndarray
    z2: np.ndarray
    h2: np.ndarray
    z3: np.ndarray
    yhat: np.ndarray


# --------------------------------------------------------------------------- params


def as_dtype(dtype) -> type:
    """np.float64 or np.float32 from a name or a NumPy dtype; anything else is an error."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise LungedgeError(f"dtype must be float64 or float32, got {name!r}")
    return DTYPES[name]


def init_params(seed: int = 0, dtype="float64") -> Params:
    """W_l, b_l ~ U(−1/√fan_in, +1/√fan_in) from ``np.random.default_rng(seed)``.

    Drawn in the order W1, b1, W2, b2, W3, b3, always in float64 and then cast, so
    the float32 weights are the rounded float64 ones.
    """
    rng = np.random.default_rng(seed)
    p = {}
    for l, (fan_in, fan_out) in enumerate(zip(SIZES, SIZES[1:]), start=1):
        bound = 1.0 / math.sqrt(fan_in)
        p[f"W{l}"] = rng.uniform(-bound, bound, size=(fan_out, fan_in))
        p[f"b{l}"] = rng.uniform(-bound, bound, size=fan_out)
    return astype(p, dtype)


def astype(p: Params, dtype) -> Params:
    dt = as_dtype(dtype)
    return {k: np.array(p[k], dtype=dt) for k in NAMES}


def check_params(p: Params, source: str = "weights") -> Params:
    """Raise a one-line LungedgeError unless ``p`` holds the six arrays with the right shapes."""
    for k in NAMES:
        if k not in p:
            raise LungedgeError(f"{source}: missing {k!r} (need {', '.join(NAMES)})")
        _check_array(k, p[k], source)
    return p


def _check_array(k: str, v, source: str) -> None:
    if np.shape(v) != SHAPES[k]:
        raise LungedgeError(f"{source}: {k} has shape {np.shape(v)}, expected {SHAPES[k]}")
    if not np.all(np.isfinite(v)):
        raise LungedgeError(f"{source}: {k} has a non-finite value")


def dtype_of(p: Params) -> type:
    return as_dtype(p["W1"].dtype)


def as_batch(X, dtype=np.float64) -> np.ndarray:
    """Inputs as an (n, 3) array of ``dtype``; a single x of shape (3,) becomes a batch of one."""
    X = np.asarray(X, dtype=dtype)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != SIZES[0]:
        raise LungedgeError(f"inputs must have shape (n, {SIZES[0]}) or ({SIZES[0]},), got {np.shape(X)}")
    return X


def as_targets(y, n: int, dtype=np.float64) -> np.ndarray:
    y = np.asarray(y, dtype=dtype).reshape(-1)
    if y.shape != (n,):
        raise LungedgeError(f"targets must have {n} values (one per input), got {y.size}")
    return y


# --------------------------------------------------------------------------- the maths


def relu(z):
    return np.maximum(z, 0)


def forward(p: Params, X) -> tuple[np.ndarray, Cache]:
    """ŷ (shape (n,)) for a batch X (n, 3), and the cache the backward pass needs."""
    X = as_batch(X, dtype_of(p))
    z1 = X @ p["W1"].T + p["b1"]
    h1 = relu(z1)
    z2 = h1 @ p["W2"].T + p["b2"]
    h2 = relu(z2)
    z3 = h2 @ p["W3"].T + p["b3"]
    yhat = np.tanh(z3[:, 0])
    return yhat, Cache(X, z1, h1, z2, h2, z3, yhat)


def predict(p: Params, X) -> np.ndarray:
    return forward(p, X)[0]


def loss(yhat, y):
    """L = ½ Σ (ŷ − y)²."""
    return 0.5 * np.sum((yhat - y) ** 2)


def output_delta(yhat, y):
    """δ3 = ∂L/∂z3 = (ŷ − y)(1 − ŷ²); for one sample this is also ∂L/∂b3."""
    return (yhat - y) * (1 - yhat**2)


def deltas(p: Params, cache: Cache, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """δ_l = ∂L/∂z_l for each sample: δ3 (n, 1), δ2 = (δ3 W3) ⊙ relu'(z2), δ1 = (δ2 W2) ⊙ relu'(z1)."""
    y = as_targets(y, len(cache.yhat), cache.yhat.dtype)
    d3 = output_delta(cache.yhat, y)[:, None]
    d2 = (d3 @ p["W3"]) * (cache.z2 > 0)
    d1 = (d2 @ p["W2"]) * (cache.z1 > 0)
    return d1, d2, d3


def backward(p: Params, cache: Cache, y, per_sample: bool = False) -> Params:
    """∂L/∂W_l = δ_l ⊗ h_{l-1} and ∂L/∂b_l = δ_l, summed over the batch (or kept per sample).

    With ``per_sample=True`` every gradient gets a leading batch axis: ``g["W1"][i]``
    is the outer product of sample i's δ1 and x_i, the gradient of ½(ŷ_i − y_i)².
    """
    g = {}
    for l, (d, h) in enumerate(zip(deltas(p, cache, y), (cache.X, cache.h1, cache.h2)), start=1):
        if per_sample:
            g[f"W{l}"] = d[:, :, None] * h[:, None, :]
            g[f"b{l}"] = d
        else:
            g[f"W{l}"] = d.T @ h
            g[f"b{l}"] = d.sum(axis=0)
    return g


def gradients(p: Params, X, y, per_sample: bool = False) -> tuple[float, Params]:
    """Forward, loss and backward in one call: (L, grads) for the batch (X, y)."""
    yhat, cache = forward(p, X)
    y = as_targets(y, len(yhat), yhat.dtype)
    return loss(yhat, y), backward(p, cache, y, per_sample=per_sample)


def sgd_step(p: Params, g: Params, lr: float) -> Params:
    """θ ← θ − lr · ∂L/∂θ (returns new arrays; ``p`` is left alone)."""
    lr = float(lr)  # a Python float never promotes float32 weights to float64
    return {k: p[k] - lr * g[k] for k in NAMES}


def check_training(steps: int, lr: float) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps <= 0:
        raise LungedgeError(f"steps must be a positive integer, got {steps!r}")
    if steps > MAX_STEPS:
        raise LungedgeError(f"steps must be at most {MAX_STEPS:,}, got {steps:,}")
    if not (isinstance(lr, (int, float, np.floating)) and math.isfinite(lr) and lr > 0):
        raise LungedgeError(f"learning rate must be a positive finite number, got {lr!r}")


def train(p: Params, X=XS, y=YS, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR) -> tuple[Params, list[float]]:
    """Full-batch SGD; returns the final weights and the loss before each step plus the final loss."""
    check_training(steps, lr)
    X = as_batch(X, dtype_of(p))
    losses = []
    for _ in range(steps):
        L, g = gradients(p, X, y)
        losses.append(float(L))
        p = sgd_step(p, g, lr)
    losses.append(float(gradients(p, X, y)[0]))
    return p, losses


# --------------------------------------------------------------------------- the walkthrough


def walkthrough(p: Params, X=XS, y=YS, input_no: int = 1) -> dict:
    """Everything the group worked by hand, as plain JSON-ready data.

    Weights, the forward table (ŷ, error ŷ − y and δ3 per input), the loss, and every
    gradient for input number ``input_no`` (1-based, as in the hand-worked tables)
    alone and for the whole batch.
    """
    yhat, cache = forward(p, X)
    y = as_targets(y, len(yhat), yhat.dtype)
    if not 1 <= input_no <= len(yhat):
        raise LungedgeError(f"input must be between 1 and {len(yhat)}, got {input_no}")
    k = input_no - 1
    per = backward(p, cache, y, per_sample=True)
    batch = backward(p, cache, y)
    d3 = output_delta(yhat, y)
    return {
        "dtype": np.dtype(dtype_of(p)).name,
        "weights": _tolists(p),
        "forward": [
            {"input": i + 1, "x": cache.X[i].tolist(), "y": float(y[i]), "yhat": float(yhat[i]),
             "error": float(yhat[i] - y[i]), "delta_out": float(d3[i])}
            for i in range(len(yhat))
        ],
        "loss": float(loss(yhat, y)),
        "input": input_no,
        "grads_input": _tolists({n: per[n][k] for n in NAMES}),
        "grads_batch": _tolists(batch),
    }


def _tolists(p: Params) -> dict:
    return {k: np.asarray(p[k]).tolist() for k in NAMES}


# --------------------------------------------------------------------------- weights files


def params_to_json(p: Params) -> dict:
    check_params(p)
    return {"format": WEIGHTS_FORMAT, "version": 1, "sizes": list(SIZES),
            "dtype": np.dtype(dtype_of(p)).name, "params": _tolists(p)}


def params_from_json(obj, source: str = "weights") -> Params:
    if not isinstance(obj, dict) or not isinstance(obj.get("params"), dict):
        raise LungedgeError(f"{source}: expected a JSON object with a 'params' object holding {', '.join(NAMES)}")
    if obj.get("format", WEIGHTS_FORMAT) != WEIGHTS_FORMAT:
        raise LungedgeError(f"{source}: format is {obj.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
    dt = DTYPES.get(obj.get("dtype", "float64"))
    if dt is None:
        raise LungedgeError(f"{source}: dtype must be 'float64' or 'float32', got {obj.get('dtype')!r}")
    p = {}
    for k in NAMES:
        if k not in obj["params"]:
            raise LungedgeError(f"{source}: missing {k!r} (need {', '.join(NAMES)})")
        try:
            raw = np.asarray(obj["params"][k])
        except ValueError:
            raw = None
        if raw is None or raw.dtype.kind not in "iuf":
            raise LungedgeError(f"{source}: {k} must be a (nested) list of numbers")
        _check_array(k, raw, source)
        p[k] = raw.astype(dt)
    return p


def save_params(p: Params, path: str | os.PathLike) -> Path:
    """Write the weights as JSON, atomically; floats are written so they load back bit-exact."""
    obj = params_to_json(p)
    try:
        return write_json(path, obj)
    except OSError as exc:
        raise LungedgeError(f"cannot write weights file {path}: {exc.strerror or exc}") from None


def load_params(path: str | os.PathLike, dtype=None) -> Params:
    """Read a weights file written by :func:`save_params` (in its own dtype unless one is given)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LungedgeError(f"weights file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LungedgeError(f"cannot read weights file {path}: {exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LungedgeError(f"weights file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    p = params_from_json(obj, f"weights file {path}")
    return p if dtype is None else astype(p, dtype)


# --------------------------------------------------------------------------- ONNX


def to_onnx(p: Params, opset: int = 17):
    """The network as an ONNX model: Gemm/Relu/Gemm/Relu/Gemm/Tanh, float32, input x of shape (batch, 3)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_params(p)
    inits = [numpy_helper.from_array(np.asarray(p[k], dtype=np.float32), name=k) for k in NAMES]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["z1"], transB=1),
        helper.make_node("Relu", ["z1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "W2", "b2"], ["z2"], transB=1),
        helper.make_node("Relu", ["z2"], ["h2"]),
        helper.make_node("Gemm", ["h2", "W3", "b3"], ["z3"], transB=1),
        helper.make_node("Tanh", ["z3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "lungedge_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SIZES[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SIZES[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, producer_name="lungedge", opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what opset 17 needs; keeps the file loadable by older runtimes
    onnx.checker.check_model(model)
    return model


def export_onnx(p: Params, path: str | os.PathLike) -> Path:
    """Write :func:`to_onnx` to ``path`` atomically."""
    data = to_onnx(p).SerializeToString()
    try:
        return atomic_write_bytes(path, data)
    except OSError as exc:
        raise LungedgeError(f"cannot write ONNX file {path}: {exc.strerror or exc}") from None


def onnx_predict(path: str | os.PathLike, X) -> np.ndarray:
    """ŷ (shape (n,)) from ONNX Runtime on the CPU, in float32."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": as_batch(X, np.float32)})[0][:, 0]


def onnx_max_diff(path: str | os.PathLike, p: Params, X=XS) -> float:
    """max |ŷ_onnxruntime − ŷ_numpy| on X, both in float32."""
    return float(np.max(np.abs(onnx_predict(path, X) - predict(astype(p, "float32"), X))))
