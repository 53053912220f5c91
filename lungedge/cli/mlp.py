"""`lungedge mlp`: the hand-worked 3-4-4-1 MLP as a NumPy reference kernel."""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import LungedgeError
from .common import print_json

app = typer.Typer(help="The research group's hand-worked MLP (3 -> 4 ReLU -> 4 ReLU -> 1 tanh) as a NumPy kernel.", no_args_is_help=True)

SEED_HELP = "Seed for numpy's default_rng; weights ~ U(+-1/sqrt(fan_in)) [default: 0]."
WEIGHTS_HELP = "Start from this weights JSON file (as written by --save-weights) instead of a seed."
DTYPE_HELP = "float64 or float32 [default: float64, or the weights file's]."


def _params(seed: Optional[int], weights: Optional[str], dtype: Optional[str]):
    """The weights the user asked for, and a short description of where they came from."""
    from .. import mlp

    if seed is not None and weights is not None:
        raise LungedgeError("give --seed or --weights, not both")
    if seed is not None:
        from ..limits import check_seed

        check_seed(seed)
    if weights is not None:
        return mlp.load_params(weights, dtype), f"weights file {weights}"
    seed = 0 if seed is None else seed
    return mlp.init_params(seed, dtype or "float64"), f"seed {seed}"


def _f(v: float) -> str:
    return f"{v + 0.0:.4f}"  # + 0.0 turns -0.0 into 0.0


def _layer_table(title: str, W, b, wname: str, bname: str):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    t.add_column("j", justify="right")
    for i in range(len(W[0])):
        t.add_column(escape(f"{wname}[j,{i + 1}]"), justify="right")
    t.add_column(bname, justify="right")
    for j, (row, bj) in enumerate(zip(W, b), start=1):
        t.add_row(str(j), *(_f(w) for w in row), _f(bj))
    return t


def _print_layers(console, p: dict, heading: str, prefix: str = "") -> None:
    console.print()
    console.print(heading)
    for l in (1, 2, 3):
        w, b = f"{prefix}W{l}", f"{prefix}b{l}"
        console.print(_layer_table(f"layer {l}", p[f"W{l}"], p[f"b{l}"], w, b))


@app.command("demo")
def demo(
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    save_weights: Optional[str] = typer.Option(None, "--save-weights", help="Also write the weights used to this JSON file."),
    input_no: int = typer.Option(1, "--input", help="Which of the four inputs (1-4) gets its own gradients."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Replay the hand-worked example: weights, forward table, loss and every gradient."""
    from .. import mlp

    p, source = _params(seed, weights, dtype)
    report = mlp.walkthrough(p, mlp.XS, mlp.YS, input_no)
    if save_weights:
        mlp.save_params(p, save_weights)
    if as_json:
        print_json({"source": source, **report, "saved_weights": save_weights})
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"MLP 3 -> 4 ReLU -> 4 ReLU -> 1 tanh, {source}, {report['dtype']}; L = 1/2 sum (yhat - y)^2")
    _print_layers(console, report["weights"], "Weights (W_l is fan_out x fan_in; z_l = W_l h_(l-1) + b_l):")
    console.print()
    t = Table(title="Forward pass", title_justify="left")
    for col in ("input", "x", "y", "yhat", "error yhat-y", "dL/db3 = err*(1-yhat^2)"):
        t.add_column(col, justify="right")
    for r in report["forward"]:
        t.add_row(str(r["input"]), "[" + ", ".join(f"{v:g}" for v in r["x"]) + "]", f"{r['y']:g}",
                  _f(r["yhat"]), _f(r["error"]), _f(r["delta_out"]))
    console.print(t)
    console.print(f"Loss L = {report['loss']:.4f}")
    _print_layers(console, report["grads_input"], f"Gradients for input {report['input']} alone (of 1/2 (yhat - y)^2):", "dL/d")
    _print_layers(console, report["grads_batch"], "Gradients of L over the batch of four (sums of the per-input ones):", "dL/d")
    if save_weights:
        console.print(f"wrote {save_weights}")


@app.command("train")
def train(
    steps: Optional[int] = typer.Option(None, "--steps", help="SGD steps on the four examples [default: 300]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate [default: 0.1]."),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    backend: str = typer.Option("numpy", "--backend", help="numpy, torch or micrograd (all start from the same NumPy weights)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    every: int = typer.Option(0, "--every", help="Print the loss every N steps [default: steps/10].", show_default=False),
    save_weights: Optional[str] = typer.Option(None, "--save-weights", help="Write the trained weights to this JSON file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Train on the four hand-worked examples with full-batch SGD and print the loss curve."""
    from .. import mlp, mlp_backends

    steps = mlp.DEFAULT_STEPS if steps is None else steps
    lr = mlp.DEFAULT_LR if lr is None else lr
    mlp.check_training(steps, lr)
    if backend not in mlp_backends.BACKENDS:
        raise LungedgeError(f"unknown backend {backend!r}; choose one of {', '.join(mlp_backends.BACKENDS)}")
    if every < 0:
        raise LungedgeError(f"--every must be positive, got {every}")
    every = every or max(1, steps // 10)
    p, source = _params(seed, weights, dtype)
    trained, losses = mlp_backends.train(p, mlp.XS, mlp.YS, steps=steps, lr=lr, backend=backend)
    if save_weights:
        mlp.save_params(trained, save_weights)
    curve = [(s, losses[s]) for s in range(0, steps + 1, every)]
    if curve[-1][0] != steps:
        curve.append((steps, losses[steps]))
    if as_json:
        print_json({"backend": backend, "source": source, "dtype": mlp.dtype_of(p).__name__,
                    "steps": steps, "lr": lr, "losses": losses, "final_loss": losses[-1],
                    "yhat": mlp.predict(trained, mlp.XS).tolist(), "saved_weights": save_weights})
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"full-batch SGD on the four examples: backend {backend}, {source}, lr {lr:g}, {steps} steps")
    t = Table()
    t.add_column("step", justify="right")
    t.add_column("loss", justify="right")
    for s, L in curve:
        t.add_row(str(s), f"{L:.6f}")
    console.print(t)
    yhat = ", ".join(_f(v) for v in mlp.predict(trained, mlp.XS))
    console.print(f"final loss {losses[-1]:.6f}")
    console.print(f"yhat = [{yhat}] for y = [1, -1, -1, 1]")
    if save_weights:
        console.print(f"wrote {save_weights}")


@app.command("export")
def export(
    out: str = typer.Option(..., "--out", help="The .onnx file to write."),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a line."),
):
    """Write the network as ONNX (Gemm/Relu/Tanh, float32, dynamic batch) and check it with ONNX Runtime."""
    from pathlib import Path

    from .. import mlp

    p, source = _params(seed, weights, None)
    path = mlp.export_onnx(p, out)
    diff = mlp.onnx_max_diff(path, p, mlp.XS)
    size = Path(path).stat().st_size
    if as_json:
        print_json({"out": str(path), "bytes": size, "source": source, "max_abs_diff_vs_numpy_float32": diff})
        return
    typer.echo(f"wrote {path} ({size} bytes, {source}); ONNX Runtime vs NumPy float32 on the four inputs: max |diff| = {diff:.2e}")
