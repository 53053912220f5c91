"""Where a model looks: Grad-CAM for PyTorch checkpoints, occlusion for any runner (both from Captum).

* **Grad-CAM** (Selvaraju et al. 2017; ``captum.attr.LayerGradCam``) weights the last
  convolutional layer's feature maps by the gradient of the class score, keeps the positive part
  and upsamples it to the input. Needs the PyTorch module, so it runs on ``torch`` runners.
* **Occlusion** (Zeiler & Fergus 2014; ``captum.attr.Occlusion``) slides a grey patch (input value
  0, the normalised data mean) over the image and records how much the class probability drops.
  It only calls the model, so it works on every runner: ONNX Runtime (any precision), Keras,
  OpenVINO, TensorRT. The same map for FP32 and INT8 shows whether quantisation moved the focus.

Maps are (H, W) float32 in [0, 1] at the model's input size, aligned with
``Preprocessing.pixels`` (the centre-cropped, resized image the model sees), so an overlay is exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .errors import LungedgeError, check_choice
from .io import atomic_write_bytes, retire, write_error
from .runners.artifact import is_kind

METHODS = ("auto", "gradcam", "occlusion")


def _normalise(maps: np.ndarray) -> np.ndarray:
    maps = np.maximum(np.asarray(maps, np.float32), 0)
    top = maps.reshape(len(maps), -1).max(1)
    top[top == 0] = 1
    return maps / top[:, None, None]


def last_conv(model):
    """The last ``Conv2d`` of a torch module (Grad-CAM's default layer)."""
    import torch

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise LungedgeError("Grad-CAM needs a convolutional layer; this model has none (use --method occlusion)")
    return convs[-1]


def gradcam(model, x: np.ndarray, targets, layer=None) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] of a torch ``model`` for NCHW inputs ``x`` and class ``targets``."""
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    layer = layer or last_conv(model)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    model.eval()
    gc = LayerGradCam(lambda t: model(t).float(), layer)
    out = []
    with torch.enable_grad():
        for i in range(0, len(x), 16):
            t = torch.from_numpy(np.ascontiguousarray(x[i:i + 16])).to(device, dtype=dtype).requires_grad_(True)
            tg = torch.as_tensor(np.asarray(targets[i:i + 16]), device=device)
            attr = gc.attribute(t, target=tg, relu_attributions=True)
            attr = LayerAttribution.interpolate(attr.float(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
            out.append(attr[:, 0].detach().cpu().numpy())
    return _normalise(np.concatenate(out))


def occlusion(infer, x: np.ndarray, targets, layout: str = "NCHW", window: int | None = None,
              stride: int | None = None, output: str = "logits") -> np.ndarray:
    """Occlusion maps (N, H, W) in [0, 1]: drop of the target class's probability when a square patch
    (side ``window``, default size/6, step ``stride``, default window/2) is set to 0. ``infer`` maps a
    float32 batch in ``layout`` to class scores (any runner's ``infer``; ``output`` says what they are)."""
    import torch
    from captum.attr import Occlusion

    from .runners.base import to_probabilities

    size = x.shape[-1] if layout == "NCHW" else x.shape[1]
    window = window or max(2, size // 6)
    stride = stride or max(1, window // 2)

    def forward(t):
        return torch.from_numpy(to_probabilities(infer(t.detach().cpu().numpy().astype(np.float32)), output)
                                .astype(np.float32))

    occ = Occlusion(forward)
    shape = (3, window, window) if layout == "NCHW" else (window, window, 3)
    strides = (3, stride, stride) if layout == "NCHW" else (stride, stride, 3)
    out = []
    for i in range(len(x)):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + 1]))
        attr = occ.attribute(t, target=int(targets[i]), sliding_window_shapes=shape, strides=strides,
                             baselines=0.0, perturbations_per_eval=64)
        a = attr[0].numpy()
        out.append(a.mean(0) if layout == "NCHW" else a.mean(-1))
    return _normalise(np.stack(out))


def overlay(pixels: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 HxWx3 image with ``heat`` (H, W in [0, 1], resized if needed) blended in as a jet colour map."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = pixels.shape[:2]
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0
    colour = colormaps["jet"](heat)[..., :3] * 255
    a = alpha * heat[..., None]  # cold regions stay the image
    return np.clip(pixels * (1 - a) + colour * a, 0, 255).astype(np.uint8)


def explain(runner, paths, method: str = "auto", targets=None, batch: int = 16) -> list[dict]:
    """Predict and explain ``paths`` with an open runner: per image {"image", "class", "probability",
    "target", "method", "heat" (H, W), "pixels" (H, W, 3 uint8)}. ``targets`` (class indices) default
    to the predicted class; ``method`` auto = Grad-CAM on torch FP32 runners, occlusion elsewhere."""
    from .preprocess import read_image
    from .runners.base import to_probabilities

    check_choice(method, METHODS, "saliency method")
    paths = [Path(p) for p in paths]
    if not paths:
        raise LungedgeError("no images to explain")
    model = getattr(runner, "model", None)
    torch_ok = _is_torch_module(model) and runner.precision == "fp32"
    if method == "gradcam" and not torch_ok:
        raise LungedgeError(f"Grad-CAM needs a PyTorch checkpoint run by the torch backend; "
                            f"{runner.backend} runs {runner.info.path.name}: use --method occlusion")
    prep = runner.preprocessing
    # the decode training and every runner use (Preprocessing.load): the map explains what the model sees
    pixels = np.stack([prep.pixels(read_image(p, prep.size)) for p in paths])
    x = prep.normalize(pixels)
    logits = np.concatenate([runner.infer(x[i:i + batch]) for i in range(0, len(x), batch)])
    probs = to_probabilities(logits, runner.output, runner.temperature)
    pred = probs.argmax(1)
    tg = pred if targets is None else np.asarray(targets, int)
    use = "gradcam" if method == "gradcam" or (method == "auto" and torch_ok) else "occlusion"
    if use == "gradcam":
        heat = gradcam(model, x, tg)
    else:
        heat = occlusion(runner.infer, x, tg, prep.layout, output=runner.output)
    return [{"image": str(p), "class": runner.classes[int(k)], "probability": float(probs[i, k]),
             "target": runner.classes[int(tg[i])], "method": use, "heat": heat[i], "pixels": pixels[i]}
            for i, (p, k) in enumerate(zip(paths, pred))]


def clean_overlay_temps(out_dir) -> list[str]:
    """Remove the overlays a killed ``predict --explain`` left under temporary names (call it holding the
    folder's lock); the user's other files stay. Returns the names removed."""
    removed = []
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return removed
    for m in METHODS:
        for p in out_dir.glob(f".*.{m}.png.*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def overlays_in(out_dir) -> int:
    """How many overlays (``<stem>.<class>.<method>.png``, as :func:`write_overlays` names them) ``out_dir`` holds
    now: what an interrupted ``predict --explain`` says it left as it was."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return 0
    return sum(1 for m in METHODS for p in out_dir.glob(f"*.*.{m}.png") if not p.name.startswith(".") and p.is_file())


def write_overlays(explained: list[dict], out_dir, stems: set[str] | None = None, classes=()) -> list[str]:
    """Write ``<stem>.<class>.<method>.png`` (the image with its map) for each explained image, atomically.
    ``stems``: the stems already written in this run (updated); an image whose stem repeats (a/img05.png,
    b/img05.png) gets ``<stem>-2``, ``<stem>-3``, ... instead of overwriting the first one's overlay.
    ``classes``: the model's classes; an overlay of the same stem and method under another of them (an earlier
    run that predicted another class) is replaced too (:func:`lungedge.io.retire`), not left beside the new one."""
    from io import BytesIO

    from PIL import Image

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out_dir, exc, "cannot create") from None
    stems = set() if stems is None else stems
    written = []
    for e in explained:
        base = stem = Path(e["image"]).stem.replace(" ", "_")
        n = 1
        while stem in stems:
            n += 1
            stem = f"{base}-{n}"
        stems.add(stem)
        buf = BytesIO()
        Image.fromarray(overlay(e["pixels"], e["heat"])).save(buf, format="PNG")
        name = _overlay_name(stem, e["class"], e["method"])
        for other in {_overlay_name(stem, c, e["method"]) for c in classes} - {name}:
            if (out_dir / other).is_file():
                retire(out_dir / other)
        written.append(str(atomic_write_bytes(out_dir / name, buf.getvalue())))
    return written


def _overlay_name(stem: str, cls: str, method: str) -> str:
    return f"{stem}.{cls}.{method}.png".replace(" ", "_")


# -- the report's grid -------------------------------------------------------------------------------

def pick_examples(y, pred, classes, per_class: int = 2) -> list[tuple[int, str]]:
    """Per class up to ``per_class`` correctly and ``per_class`` wrongly classified images: (index, 'right'|'wrong')."""
    y, pred = np.asarray(y), np.asarray(pred)
    out = []
    for k in range(len(classes)):
        right = np.flatnonzero((y == k) & (pred == k))[:per_class]
        wrong = np.flatnonzero((y == k) & (pred != k))[:per_class]
        out += [(int(i), "right") for i in right] + [(int(i), "wrong") for i in wrong]
    return out


def _is_torch_module(model) -> bool:
    torch = sys.modules.get("torch")  # a torch model means torch is imported already
    return torch is not None and isinstance(model, torch.nn.Module)


def _on_cpu(backend: str) -> str | None:
    """The row's backend when it runs on cpu; else None (the artifact's default backend)."""
    from .runners.registry import BACKENDS

    entry = BACKENDS.get(backend)
    return backend if entry is not None and "cpu" in entry.devices else None


def _pairs(rows: list[dict]) -> list[tuple[dict, dict | None]]:
    """(FP32 row, its INT8 row or None) per model, from eval rows that list their images."""
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("images") and r.get("labels") is not None]
    out = []
    for model in dict.fromkeys(r["model"] for r in evals):
        mine = [r for r in evals if r["model"] == model]
        fp32 = next((r for r in mine if r["variant"] == "fp32" and is_kind(r["artifact"], "onnx")), None) or \
            next((r for r in mine if r["variant"] == "fp32"), None)  # prefer the ONNX the INT8 file came from
        if fp32 is None:
            continue
        int8 = next((r for r in mine if r["variant"].startswith("int8") and r["images"] == fp32["images"]), None)
        out.append((fp32, int8))
    return out


def report_grid(rows: list[dict], path, per_class: int = 2, log=lambda s: None) -> Path | None:
    """A PNG per model: per class a few right and wrong test images (by FP32), each with its occlusion map
    for FP32 and beside it for INT8 (the same method, so the two are comparable). None when no eval row's
    artifact and images are on this machine."""
    pairs = []
    for fp32, int8 in _pairs(rows):
        arts = [r for r in (fp32, int8) if r is not None]
        if not all(Path(r["artifact"]).is_file() for r in arts) or not all(Path(p).is_file() for p in fp32["images"]):
            log(f"saliency grid: {fp32['model']}'s artifact or test images are not on this machine; skipped")
            continue
        pairs.append((fp32, int8))
    if not pairs:
        return None
    return _draw_grid([(fp32["model"], _panel(fp32, int8, per_class)) for fp32, int8 in pairs], path)


def _panel(fp32: dict, int8: dict | None, per_class: int) -> list[tuple[str, list]]:
    """One model's rows of the grid: (row label, [(cell title, overlay image), ...]) per picked image."""
    from .runners import open_runner

    picks = pick_examples(fp32["labels"], fp32["predictions"], fp32["classes"], per_class)
    paths = [fp32["images"][i] for i, _ in picks]
    maps = {}
    for r in (fp32, int8):
        if r is None:
            continue
        with open_runner(r["artifact"], backend=_on_cpu(r["backend"]), device="cpu") as runner:
            maps[r["variant"]] = explain(runner, paths, "occlusion",
                                         targets=[fp32["labels"][i] for i, _ in picks])
    rows_ = []
    for j, (i, kind) in enumerate(picks):
        cells = []
        for r in (fp32, int8):
            if r is None:
                continue
            e = maps[r["variant"]][j]
            cells.append((f"{r['variant']}: {e['class']} ({e['probability']:.2f})", overlay(e["pixels"], e["heat"])))
        rows_.append((f"{fp32['classes'][fp32['labels'][i]]}, {kind}\n{Path(paths[j]).name[:28]}", cells))
    return rows_


def _draw_grid(panels: list, path) -> Path:
    """The panels as one PNG (a row per picked image, a column per precision), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write_png

    n_rows = sum(len(r) for _, r in panels)
    n_cols = max(len(c) for _, rs in panels for _, c in rs)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols + 1.6, 2.5 * n_rows), dpi=90, squeeze=False)
    k = 0
    for model, rs in panels:
        for label, cells in rs:
            for c in range(n_cols):
                ax = axes[k, c]
                ax.axis("off")
                if c < len(cells):
                    ax.imshow(cells[c][1])
                    ax.set_title(cells[c][0], fontsize=8)
            axes[k, 0].text(-0.05, 0.5, f"{model}\ntrue {label}", transform=axes[k, 0].transAxes, ha="right",
                            va="center", fontsize=8)
            k += 1
    fig.suptitle("Where the models look: occlusion maps (red = the class probability drops most when covered)",
                 fontsize=10)
    fig.tight_layout(rect=(0.12, 0, 1, 0.98))
    return atomic_write_png(path, fig)
