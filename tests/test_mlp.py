"""The hand-worked MLP: NumPy kernel against torch autograd, micrograd, ONNX Runtime and the group's figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lungedge import mlp
from lungedge import mlp_backends as backends
from lungedge.cli import main
from lungedge.errors import LungedgeError

HYPO = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- strategies


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def problems(draw, max_n=5):
    """Random weights (|w| <= 2), a batch of 1..max_n inputs (|x| <= 3) and targets in [-1, 1]."""
    p = {k: draw(arrays(np.float64, mlp.SHAPES[k], elements=_floats(-2, 2))) for k in mlp.NAMES}
    n = draw(st.integers(1, max_n))
    X = draw(arrays(np.float64, (n, 3), elements=_floats(-3, 3)))
    y = draw(arrays(np.float64, (n,), elements=_floats(-1, 1)))
    # Stay off the ReLU kinks, where the derivative is undefined and a last-bit
    # difference in summation order could flip which side a backend lands on.
    _, cache = mlp.forward(p, X)
    assume(np.abs(cache.z1).min() > 1e-9 and np.abs(cache.z2).min() > 1e-9)
    return p, X, y


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in mlp.NAMES)


def _weights_for_yhat_0_2559() -> dict:
    """Seed-0 weights with b3 moved so that the first input's prediction is exactly tanh(atanh(0.2559))."""
    p = mlp.init_params(0)
    _, cache = mlp.forward(p, mlp.XS[:1])
    p["b3"] = np.array([math.atanh(0.2559) - float(cache.h2[0] @ p["W3"][0])])
    return p


# --------------------------------------------------------------------------- import hygiene and init


def test_module_imports_with_numpy_alone():
    code = (
        "import sys, lungedge.mlp, lungedge.mlp_backends, lungedge.cli.mlp;"
        "heavy = {'torch', 'micrograd', 'onnx', 'onnxruntime', 'tensorflow'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_init_is_seeded_uniform_within_one_over_sqrt_fan_in():
    p = mlp.init_params(0)
    assert {k: p[k].shape for k in mlp.NAMES} == mlp.SHAPES
    assert all(p[k].dtype == np.float64 for k in mlp.NAMES)
    for l, fan_in in ((1, 3), (2, 4), (3, 4)):
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(p[f"W{l}"]).max() <= bound and np.abs(p[f"b{l}"]).max() <= bound
    # Many draws fill the range: the extremes come close to ±1/√3 = ±0.577 and ±0.5.
    many = [mlp.init_params(s) for s in range(200)]
    assert 0.57 < max(np.abs(q["W1"]).max() for q in many) <= 1 / math.sqrt(3)
    assert 0.49 < max(np.abs(q["W2"]).max() for q in many) <= 0.5
    assert _max_diff(mlp.init_params(0), p) == 0
    assert _max_diff(mlp.init_params(1), p) > 0.01
    # float32 on request is the float64 draw, rounded.
    p32 = mlp.init_params(0, "float32")
    assert all(p32[k].dtype == np.float32 and np.array_equal(p32[k], p[k].astype(np.float32)) for k in mlp.NAMES)


# --------------------------------------------------------------------------- gradients


@HYPO
@given(problems())
def test_gradients_match_torch_autograd_float64(prob):
    p, X, y = prob
    L, g = mlp.gradients(p, X, y)
    Lt, gt = backends.torch_gradients(p, X, y)
    assert abs(L - Lt) <= 1e-10
    assert _max_diff(g, gt) <= 1e-10


@HYPO
@given(problems(max_n=3))
def test_gradients_match_micrograd(prob):
    p, X, y = prob
    L, g = mlp.gradients(p, X, y)
    Lm, gm = backends.micrograd_gradients(p, X, y)
    assert abs(L - Lm) <= 1e-9
    assert _max_diff(g, gm) <= 1e-9


@settings(max_examples=25, deadline=None, derandomize=True)
@given(problems())
def test_batch_gradient_is_the_sum_of_per_sample_gradients(prob):
    p, X, y = prob
    _, batch = mlp.gradients(p, X, y)
    _, per = mlp.gradients(p, X, y, per_sample=True)
    for i in range(len(X)):
        _, one = mlp.gradients(p, X[i], y[i])
        assert _max_diff({k: per[k][i] for k in mlp.NAMES}, one) <= 1e-12
    assert _max_diff({k: per[k].sum(axis=0) for k in mlp.NAMES}, batch) <= 1e-12


def test_relu_derivative_at_the_kink_is_zero_in_every_backend():
    # z exactly 0 (a zero row and bias): relu'(0) = 0 is the convention of torch and micrograd too.
    p = mlp.init_params(0)
    p["W1"][1], p["b1"][1] = 0.0, 0.0
    p["W2"][2], p["b2"][2] = 0.0, 0.0
    _, cache = mlp.forward(p, mlp.XS)
    assert np.all(cache.z1[:, 1] == 0) and np.all(cache.z2[:, 2] == 0)
    _, g = mlp.gradients(p, mlp.XS, mlp.YS)
    assert np.all(g["W1"][1] == 0) and np.all(g["W2"][2] == 0)
    assert _max_diff(g, backends.torch_gradients(p, mlp.XS, mlp.YS)[1]) <= 1e-12
    assert _max_diff(g, backends.micrograd_gradients(p, mlp.XS, mlp.YS)[1]) <= 1e-12


def test_gradients_are_not_trivially_zero():
    # The comparisons above would pass for a kernel that returns zeros if torch did too;
    # make sure the example problem has real, non-zero gradients in every parameter.
    _, g = mlp.gradients(mlp.init_params(0), mlp.XS, mlp.YS)
    assert all(np.abs(g[k]).max() > 1e-3 for k in mlp.NAMES)


def test_output_delta_reproduces_the_groups_minus_0_695():
    p = _weights_for_yhat_0_2559()
    yhat, cache = mlp.forward(p, mlp.XS[:1])
    assert round(float(yhat[0]), 4) == 0.2559
    assert round(float(yhat[0] - mlp.YS[0]), 4) == -0.7441
    g = mlp.backward(p, cache, mlp.YS[:1])
    assert round(float(g["b3"][0]), 3) == -0.695
    # ∂L/∂W3 = δ3 · h2 (the same δ3 scales the last hidden layer)
    assert np.allclose(g["W3"][0], g["b3"][0] * cache.h2[0], rtol=0, atol=1e-15)
    # The whole-batch walkthrough gives the same figures for input 1.
    report = mlp.walkthrough(p, mlp.XS, mlp.YS, 1)
    row = report["forward"][0]
    assert (round(row["yhat"], 4), round(row["error"], 4), round(row["delta_out"], 3)) == (0.2559, -0.7441, -0.695)
    assert round(report["grads_input"]["b3"][0], 3) == -0.695


def test_demo_cli_replays_the_figures_from_a_weights_file(tmp_path, capsys):
    path = mlp.save_params(_weights_for_yhat_0_2559(), tmp_path / "fig.json")
    assert main(["mlp", "demo", "--weights", str(path), "--input", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert round(report["forward"][0]["yhat"], 4) == 0.2559
    assert round(report["grads_input"]["b3"][0], 3) == -0.695


def test_per_sample_dW1_is_rank_one_outer_product_of_delta1_and_x():
    p = mlp.init_params(0)
    yhat, cache = mlp.forward(p, mlp.XS)
    d1, _, _ = mlp.deltas(p, cache, mlp.YS)
    per = mlp.backward(p, cache, mlp.YS, per_sample=True)
    for i, x in enumerate(mlp.XS):
        gW1 = per["W1"][i]
        assert np.abs(d1[i]).max() > 0
        assert np.linalg.matrix_rank(gW1) == 1
        assert np.array_equal(gW1, np.outer(d1[i], x))
        _, gt = backends.torch_gradients(p, x, mlp.YS[i])  # and it is the true per-sample gradient
        assert np.abs(gW1 - gt["W1"]).max() <= 1e-12
    # Summing four such outer products is not rank one.
    assert np.linalg.matrix_rank(per["W1"].sum(axis=0)) > 1


# --------------------------------------------------------------------------- training


def test_numpy_and_torch_sgd_trajectories_agree_for_100_steps():
    p0 = mlp.init_params(3)
    p_np, l_np = mlp.train(p0, mlp.XS, mlp.YS, steps=100, lr=0.1)
    p_t, l_t = backends.torch_train(p0, mlp.XS, mlp.YS, steps=100, lr=0.1)
    assert len(l_np) == len(l_t) == 101
    assert np.abs(np.array(l_np) - np.array(l_t)).max() <= 1e-9
    assert _max_diff(p_np, p_t) <= 1e-9
    assert l_np[-1] < 0.1 * l_np[0]  # it moved


def test_numpy_and_micrograd_sgd_trajectories_agree():
    p0 = mlp.init_params(1)
    p_np, l_np = mlp.train(p0, mlp.XS, mlp.YS, steps=25, lr=0.1)
    p_m, l_m = backends.micrograd_train(p0, mlp.XS, mlp.YS, steps=25, lr=0.1)
    assert np.abs(np.array(l_np) - np.array(l_m)).max() <= 1e-9
    assert _max_diff(p_np, p_m) <= 1e-9


def test_training_with_the_defaults_reaches_loss_below_0_01():
    assert (mlp.DEFAULT_STEPS, mlp.DEFAULT_LR) == (300, 0.1)
    p, losses = mlp.train(mlp.init_params(0))
    assert losses[0] > 1.0 and losses[-1] < 0.01
    assert np.all(np.sign(mlp.predict(p, mlp.XS)) == mlp.YS)
    # Not only seed 0.
    assert all(mlp.train(mlp.init_params(s))[1][-1] < 0.01 for s in (1, 2, 3, 4))


def test_train_does_not_touch_its_input_weights():
    p = mlp.init_params(0)
    before = {k: v.copy() for k, v in p.items()}
    mlp.train(p, steps=5)
    backends.torch_train(p, steps=5)
    assert _max_diff(p, before) == 0


@pytest.mark.parametrize("backend", ["numpy", "torch", "micrograd"])
def test_train_cli_same_seed_same_curve_in_every_backend(backend, capsys):
    assert main(["mlp", "train", "--backend", backend, "--steps", "20", "--seed", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    _, ref = mlp.train(mlp.init_params(2), steps=20, lr=mlp.DEFAULT_LR)
    assert out["backend"] == backend and len(out["losses"]) == 21
    assert np.abs(np.array(out["losses"]) - np.array(ref)).max() <= 1e-9


def test_train_cli_defaults_reach_0_01_and_print_a_curve(tmp_path, capsys):
    out_file = tmp_path / "trained.json"
    assert main(["mlp", "train", "--save-weights", str(out_file)]) == 0
    text = capsys.readouterr().out
    assert "final loss 0.002678" in text and "1.898676" in text
    trained = mlp.load_params(out_file)
    assert mlp.loss(mlp.predict(trained, mlp.XS), mlp.YS) < 0.01


# --------------------------------------------------------------------------- float32


def test_float32_on_request_really_computes_in_float32():
    p64 = mlp.init_params(0)
    p32 = mlp.init_params(0, "float32")
    yhat, cache = mlp.forward(p32, mlp.XS)  # XS is float64: it must not pull the sums up to float64
    assert all(a.dtype == np.float32 for a in cache)
    L, g = mlp.gradients(p32, mlp.XS, mlp.YS)
    assert L.dtype == np.float32 and all(g[k].dtype == np.float32 for k in mlp.NAMES)
    _, g64 = mlp.gradients(p64, mlp.XS, mlp.YS)
    # Rounded at float32 precision: close to float64, but not the float64 result cast down.
    err = _max_diff(g, g64)
    assert 1e-9 < err < 1e-5
    _, gt32 = backends.torch_gradients(p32, mlp.XS, mlp.YS)
    assert all(gt32[k].dtype == np.float32 for k in mlp.NAMES)
    assert _max_diff(g, gt32) < 1e-6
    p_trained, losses = mlp.train(p32, steps=10, lr=np.float64(0.1))
    assert all(p_trained[k].dtype == np.float32 for k in mlp.NAMES)


def test_dtype_other_than_float32_or_float64_is_refused():
    with pytest.raises(LungedgeError, match="float64 or float32"):
        mlp.init_params(0, "float16")


# --------------------------------------------------------------------------- ONNX


def test_onnx_runtime_matches_numpy_float32(tmp_path):
    import onnx

    p = mlp.init_params(7)
    path = mlp.export_onnx(p, tmp_path / "mlp.onnx")
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm", "Tanh"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    p32 = mlp.astype(p, "float32")
    rng = np.random.default_rng(0)
    for X in (mlp.XS, mlp.XS[:1], rng.uniform(-3, 3, size=(1000, 3))):
        got = mlp.onnx_predict(path, X)
        want = mlp.predict(p32, X)
        assert got.dtype == np.float32 and got.shape == (len(X),)
        assert np.abs(got - want).max() <= 1e-6
    assert np.std(mlp.onnx_predict(path, rng.uniform(-3, 3, size=(100, 3)))) > 0.01  # not a constant
    assert [f.name for f in tmp_path.iterdir()] == ["mlp.onnx"]  # no temp file left behind


def test_export_cli(tmp_path, capsys):
    out = tmp_path / "sub" / "m.onnx"
    assert main(["mlp", "export", "--out", str(out), "--seed", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.exists() and report["bytes"] == out.stat().st_size
    assert report["max_abs_diff_vs_numpy_float32"] <= 1e-6
    assert np.abs(mlp.onnx_predict(out, mlp.XS) - mlp.predict(mlp.init_params(3, "float32"), mlp.XS)).max() <= 1e-6


# --------------------------------------------------------------------------- weights files


def test_weights_json_round_trips_exactly(tmp_path):
    p64 = mlp.init_params(5)
    p64["W2"][0] = [0.1, 1 / 3, 5e-324, -0.0]  # a subnormal and a negative zero survive too
    p64["b3"][0] = 1e308
    p32 = mlp.init_params(5, "float32")
    p32["W2"][0] = np.array([0.1, 1 / 3, 1e-45, -0.0], dtype=np.float32)
    for name, q in (("w64.json", p64), ("w32.json", p32)):
        back = mlp.load_params(mlp.save_params(q, tmp_path / name))
        for k in mlp.NAMES:
            assert back[k].dtype == q[k].dtype and back[k].tobytes() == q[k].tobytes()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["w32.json", "w64.json"]  # no temp files left


def test_demo_saved_weights_replay_the_same_walkthrough(tmp_path, capsys):
    path = tmp_path / "w.json"
    assert main(["mlp", "demo", "--seed", "11", "--save-weights", str(path), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["mlp", "demo", "--weights", str(path), "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    for key in ("weights", "forward", "loss", "grads_input", "grads_batch"):
        assert first[key] == second[key]


def test_demo_json_has_every_gradient_for_the_chosen_input_and_the_batch(capsys):
    assert main(["mlp", "demo", "--input", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    p = mlp.init_params(0)
    _, one = mlp.gradients(p, mlp.XS[2], mlp.YS[2])
    L, batch = mlp.gradients(p, mlp.XS, mlp.YS)
    assert report["input"] == 3 and report["loss"] == float(L)
    assert [r["input"] for r in report["forward"]] == [1, 2, 3, 4]
    assert _max_diff(report["grads_input"], one) <= 1e-15
    assert _max_diff(report["grads_batch"], batch) <= 1e-15


def test_demo_pretty_output(capsys):
    assert main(["mlp", "demo"]) == 0
    out = capsys.readouterr().out
    for text in ("Forward pass", "Loss L = 1.8987", "dL/dW1[j,3]", "dL/db3", "Gradients for input 1",
                 "over the batch", "0.7907"):
        assert text in out


BAD_WEIGHTS = {
    "malformed.json": "{not json",
    "list.json": "[1, 2, 3]",
    "no_b1.json": json.dumps({"params": {k: v for k, v in mlp.params_to_json(mlp.init_params(0))["params"].items() if k != "b1"}}),
    "shape.json": json.dumps({"params": {**mlp.params_to_json(mlp.init_params(0))["params"], "W2": [[1.0, 2.0]]}}),
    "strings.json": json.dumps({"params": {**mlp.params_to_json(mlp.init_params(0))["params"], "b2": ["a", "b", "c", "d"]}}),
    "ragged.json": json.dumps({"params": {**mlp.params_to_json(mlp.init_params(0))["params"], "W1": [[1, 2, 3], [1]]}}),
    "nan.json": json.dumps({"params": {**mlp.params_to_json(mlp.init_params(0))["params"], "b3": [float("nan")]}}),
    "dtype.json": json.dumps({**mlp.params_to_json(mlp.init_params(0)), "dtype": "int8"}),
}


def _assert_one_line_error(capsys, argv, fragment):
    assert main(argv) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in cap.err
    assert fragment in err
    assert cap.out == ""


@pytest.mark.parametrize("name", sorted(BAD_WEIGHTS))
def test_bad_weights_file_is_a_one_line_error(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text(BAD_WEIGHTS[name])
    _assert_one_line_error(capsys, ["mlp", "demo", "--weights", str(path)], str(path))


def test_missing_weights_file_is_a_one_line_error(tmp_path, capsys):
    _assert_one_line_error(capsys, ["mlp", "train", "--weights", str(tmp_path / "nope.json")], "not found")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["mlp", "train", "--backend", "jax"], "unknown backend 'jax'"),
        (["mlp", "train", "--steps", "0"], "steps must be a positive integer"),
        (["mlp", "train", "--steps", "-3"], "steps must be a positive integer"),
        (["mlp", "train", "--lr", "0"], "learning rate"),
        (["mlp", "train", "--backend", "micrograd", "--dtype", "float32"], "float64"),
        (["mlp", "demo", "--input", "5"], "between 1 and 4"),
        (["mlp", "demo", "--seed", "1", "--weights", "w.json"], "not both"),
        (["mlp", "demo", "--dtype", "float16"], "float64 or float32"),
    ],
)
def test_bad_cli_input_is_a_one_line_error(capsys, argv, fragment):
    _assert_one_line_error(capsys, argv, fragment)


def test_wrong_input_shape_is_a_lungedge_error():
    with pytest.raises(LungedgeError, match=r"shape \(n, 3\)"):
        mlp.forward(mlp.init_params(0), np.ones((4, 2)))
    with pytest.raises(LungedgeError, match="targets must have 4 values"):
        mlp.gradients(mlp.init_params(0), mlp.XS, [1.0, -1.0])
