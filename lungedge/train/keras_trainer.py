"""The Keras trainer (ResNet50): Adam with cosine decay, class-weighted loss, one ``fit`` call per
epoch on inputs cached through the model's Preprocessing, best/last ``.h5`` checkpoints with the
metadata inside, and an optional ``tf.distribute`` strategy.

Resume reloads ``last.h5`` and the optimizer's variables (``last.optimizer.npz``) and continues at
the next epoch; shuffling and augmentation are seeded by (seed, epoch).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import LungedgeError
from ..io import atomic_write_bytes
from ..models import checkpoint as ckpt
from ..models.registry import apply_mode, get_spec, import_keras
from . import common
from .metrics import class_weights, summarize
from .torch_trainer import _clean, _write_metrics


def _augment_nhwc(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flips and intensity jitter on a normalised NHWC batch."""
    flip = rng.random(len(x)) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    gain = 1 + 0.1 * (rng.random(len(x)) * 2 - 1)
    return (x * gain[:, None, None, None]).astype(np.float32)


def _save_optimizer(path: Path, optimizer) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(v.numpy()) for v in optimizer.variables])
    atomic_write_bytes(path, buf.getvalue())


def _load_optimizer(path: Path, optimizer, model) -> None:
    optimizer.build(model.trainable_variables)
    with np.load(path) as data:
        arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
    if len(arrays) != len(optimizer.variables):
        raise LungedgeError(f"{path} does not match this model's optimizer")
    for v, a in zip(optimizer.variables, arrays):
        v.assign(a)


def train_keras(cfg: common.TrainConfig, on_epoch=None, show_progress: bool | None = None,
                stop_after: int | None = None, resume_dir: Path | None = None, strategy=None) -> dict:
    keras = import_keras()
    spec = get_spec(cfg.model)
    common.check_device(cfg.device, "keras")
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    if resume_dir is not None:
        run_dir = resume_dir
    else:
        run_dir = common.new_run_dir(cfg)
        common.save_config(run_dir, cfg)
    manifest, root = common.prepare_split(
        common.TrainConfig.from_dict({**cfg.to_dict(), "split": cfg.split or (str(run_dir / "split.json") if resume_dir else None)}),
        run_dir)
    fingerprint = manifest["dataset"]["fingerprint"]
    split_path = str(Path(cfg.split)) if cfg.split else str(run_dir / "split.json")
    classes = list(manifest["classes"])
    prep = spec.preprocessing_for(cfg.image_size)
    arrays = common.load_arrays(manifest, root, prep)

    keras.utils.set_random_seed(cfg.seed)
    n_train = len(arrays.y["train"])
    steps = max(1, math.ceil(n_train / cfg.batch_size))
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        if resume_dir is not None:
            model, _ = ckpt.load_checkpoint(run_dir / "last.h5", mode=cfg.mode, unfreeze=cfg.unfreeze)
            apply_mode(spec, model, cfg.mode, cfg.unfreeze)
        else:
            model = common.initial_model(cfg, spec, classes)
        schedule = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=cfg.epochs * steps)
        optimizer = keras.optimizers.Adam(learning_rate=schedule)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    history, best, start, bad_epochs = [], None, 0, 0
    if resume_dir is not None:
        meta = ckpt.read_keras_meta(run_dir / "last.h5")
        history, start = list(meta["history"]), int(meta["epoch"])
        best, bad_epochs = meta.get("best"), int(meta.get("bad_epochs", 0))
        _load_optimizer(run_dir / "last.optimizer.npz", optimizer, model)

    cw = {i: float(w) for i, w in enumerate(class_weights(arrays.y["train"], len(classes)))}

    def meta_for(epoch):
        return ckpt.make_meta(spec, classes, prep, cfg.mode, fingerprint, epoch, history, split_manifest=split_path,
                              data_root=str(root), config=cfg.to_dict(), best=best, bad_epochs=bad_epochs)

    def evaluate(split):
        x, y = arrays.x[split], arrays.y[split]
        if len(y) == 0:
            return {"loss": None, **summarize([], [], classes)}
        logits = np.asarray(model.predict(x, batch_size=64, verbose=0))
        z = logits - logits.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return {"loss": float(-logp[np.arange(len(y)), y].mean()), **summarize(y, logits.argmax(1), classes)}

    t_start, status = time.time(), "finished"
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, epoch])
        perm = rng.permutation(n_train)
        x, y = arrays.x["train"][perm], arrays.y["train"][perm]
        if cfg.augment:
            x = _augment_nhwc(x, rng)
        keras.utils.set_random_seed(cfg.seed * 100_003 + epoch)
        fit = model.fit(x, y, batch_size=cfg.batch_size, epochs=epoch + 1, initial_epoch=epoch, shuffle=False,
                        class_weight=cw, verbose=2 if show_progress else 0)
        val = evaluate("val")
        score = val["balanced_accuracy"]
        improved = best is None or score > best["val_balanced_accuracy"] + 1e-12 or (
            score >= best["val_balanced_accuracy"] - 1e-12 and (val["loss"] or 0) < (best["val_loss"] or 0))
        rec = {"epoch": epoch + 1, "train_loss": float(fit.history["loss"][-1]), "val_loss": val["loss"] or float("nan"),
               "val_balanced_accuracy": score, "val_accuracy": val["accuracy"], "seconds": time.time() - t0,
               "best": bool(improved)}
        history.append(_clean(rec))
        if improved:
            best = {"epoch": epoch + 1, "val_balanced_accuracy": score, "val_loss": val["loss"]}
            bad_epochs = 0
        else:
            bad_epochs += 1
        if improved:
            ckpt.save_keras_checkpoint(run_dir / "best.h5", model, meta_for(epoch + 1))
        ckpt.save_keras_checkpoint(run_dir / "last.h5", model, meta_for(epoch + 1))
        _save_optimizer(run_dir / "last.optimizer.npz", optimizer)
        _write_metrics(run_dir, cfg, manifest, split_path, history, best, None, "running", time.time() - t_start)
        if on_epoch:
            on_epoch(rec)
        if cfg.patience and bad_epochs >= cfg.patience:
            break
        if stop_after is not None and epoch + 1 - start >= stop_after and epoch + 1 < cfg.epochs:
            return {"run_dir": str(run_dir), "status": "interrupted", "history": history}
    best_model, _ = ckpt.load_checkpoint(run_dir / "best.h5")
    model = best_model
    test = evaluate("test")
    summary = _write_metrics(run_dir, cfg, manifest, split_path, history, best, test, status, time.time() - t_start)
    summary["checkpoints"] = {"best": str(run_dir / "best.h5"), "last": str(run_dir / "last.h5")}
    from ..io import write_json

    write_json(run_dir / "metrics.json", summary)
    return summary
