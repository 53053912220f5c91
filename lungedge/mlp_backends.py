"""Cross-check backends for the NumPy MLP kernel: PyTorch autograd and micrograd.

Both take the NumPy weights (``lungedge.mlp`` params) as they are, so one seed gives
the same starting point in every backend, and both return NumPy arrays. torch and
micrograd are imported inside the functions that use them.
"""

from __future__ import annotations

import math

import numpy as np

from . import mlp
from .errors import LungedgeError

BACKENDS = ("numpy", "torch", "micrograd")


# --------------------------------------------------------------------------- PyTorch


def _torch_params(p):
    import torch

    return {k: torch.tensor(p[k], requires_grad=True) for k in mlp.NAMES}  # keeps p's dtype


def torch_forward(t, X):
    import torch

    h1 = torch.relu(X @ t["W1"].T + t["b1"])
    h2 = torch.relu(h1 @ t["W2"].T + t["b2"])
    return torch.tanh(h2 @ t["W3"].T + t["b3"])[:, 0]


def torch_loss(yhat, y):
    return 0.5 * ((yhat - y) ** 2).sum()


def torch_gradients(p, X, y):
    """(L, grads) from torch autograd, in the dtype of ``p``."""
    import torch

    t = _torch_params(p)
    dt = mlp.dtype_of(p)
    X = torch.from_numpy(mlp.as_batch(X, dt))
    L = torch_loss(torch_forward(t, X), torch.from_numpy(mlp.as_targets(y, len(X), dt)))
    L.backward()
    return L.item(), {k: t[k].grad.numpy() for k in mlp.NAMES}


def torch_train(p, X=mlp.XS, y=mlp.YS, steps=mlp.DEFAULT_STEPS, lr=mlp.DEFAULT_LR):
    """torch.optim.SGD on the same loss; returns (final params, losses) like :func:`lungedge.mlp.train`."""
    import torch

    mlp.check_training(steps, lr)
    t = _torch_params(p)
    dt = mlp.dtype_of(p)
    X = torch.from_numpy(mlp.as_batch(X, dt))
    y = torch.from_numpy(mlp.as_targets(y, len(X), dt))
    opt = torch.optim.SGD(list(t.values()), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        L = torch_loss(torch_forward(t, X), y)
        losses.append(L.item())
        L.backward()
        opt.step()
    with torch.no_grad():
        losses.append(torch_loss(torch_forward(t, X), y).item())
    return {k: t[k].detach().numpy().copy() for k in mlp.NAMES}, losses


# --------------------------------------------------------------------------- micrograd


def _mg_tanh(v):
    """tanh as a micrograd op (micrograd 0.1.0 ships relu but not tanh)."""
    from micrograd.engine import Value

    t = math.tanh(v.data)
    out = Value(t, (v,), "tanh")

    def _backward():
        v.grad += (1 - t**2) * out.grad

    out._backward = _backward
    return out


def _mg_params(p):
    from micrograd.engine import Value

    return {k: [Value(float(w)) for w in np.ravel(p[k])] for k in mlp.NAMES}


def _mg_forward(q, x):
    """ŷ for one sample x, as a micrograd Value; ``q`` holds each W row-major as a flat list."""
    h = [float(v) for v in x]
    for l in (1, 2, 3):
        W, b = q[f"W{l}"], q[f"b{l}"]
        rows = [W[j * len(h):(j + 1) * len(h)] for j in range(len(b))]
        z = [sum((w * hi for w, hi in zip(row, h)), bj) for row, bj in zip(rows, b)]
        h = [zj.relu() for zj in z] if l < 3 else z
    return _mg_tanh(h[0])


def _mg_loss(q, X, y):
    return 0.5 * sum((_mg_forward(q, x) - float(yi)) ** 2 for x, yi in zip(X, y))


def _mg_check(p):
    if mlp.dtype_of(p) is not np.float64:
        raise LungedgeError("the micrograd backend computes in Python floats (float64) only")


def micrograd_gradients(p, X, y):
    """(L, grads) from micrograd's scalar autograd (float64)."""
    _mg_check(p)
    X = mlp.as_batch(X)
    q = _mg_params(p)
    L = _mg_loss(q, X, mlp.as_targets(y, len(X)))
    L.backward()
    return L.data, {k: np.array([v.grad for v in q[k]], dtype=float).reshape(mlp.SHAPES[k]) for k in mlp.NAMES}


def micrograd_train(p, X=mlp.XS, y=mlp.YS, steps=mlp.DEFAULT_STEPS, lr=mlp.DEFAULT_LR):
    """Plain SGD with micrograd Values; returns (final params, losses) like :func:`lungedge.mlp.train`."""
    mlp.check_training(steps, lr)
    _mg_check(p)
    X = mlp.as_batch(X)
    y = mlp.as_targets(y, len(X))
    q = _mg_params(p)
    params = [v for k in mlp.NAMES for v in q[k]]
    losses = []
    for _ in range(steps):
        for v in params:
            v.grad = 0
        L = _mg_loss(q, X, y)
        losses.append(L.data)
        L.backward()
        for v in params:
            v.data -= lr * v.grad
    losses.append(_mg_loss(q, X, y).data)
    return {k: np.array([v.data for v in q[k]]).reshape(mlp.SHAPES[k]) for k in mlp.NAMES}, losses


# --------------------------------------------------------------------------- one entry point


def train(p, X=mlp.XS, y=mlp.YS, steps=mlp.DEFAULT_STEPS, lr=mlp.DEFAULT_LR, backend: str = "numpy"):
    """Train with the named backend from the given NumPy weights: (final params, losses)."""
    fns = {"numpy": mlp.train, "torch": torch_train, "micrograd": micrograd_train}
    if backend not in fns:
        raise LungedgeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return fns[backend](p, X, y, steps=steps, lr=lr)
