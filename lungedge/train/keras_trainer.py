"""The Keras trainer (ResNet50): AdamW (``weight_decay``) with linear warm-up (``warmup_epochs``) and
cosine decay, class-weighted loss, one ``fit`` call per epoch on inputs cached through the model's
Preprocessing, the PyTorch trainer's augmentation (:func:`common.augment`, run on NCHW copies),
best/last ``.h5`` checkpoints with the metadata inside, and an optional ``tf.distribute`` strategy.

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

from ..batching import predict_in_batches
from ..errors import LungedgeError
from ..io import atomic_write_bytes, written_together
from ..models import checkpoint as ckpt
from ..models.frameworks import set_tensorflow_threads
from ..models.registry import Built, apply_mode, get_spec, import_keras
from . import common
from .loop import EpochLoop
from .metrics import class_weights


def augment_nhwc(x: np.ndarray, seed: int, prep) -> np.ndarray:
    """:func:`common.augment` (the PyTorch trainer's definition) on a normalised NHWC batch."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return np.ascontiguousarray(common.augment(t, gen, prep).numpy().transpose(0, 2, 3, 1))


def save_optimizer(path: Path, optimizer) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(v.numpy()) for v in optimizer.variables])
    atomic_write_bytes(path, buf.getvalue())


def load_optimizer(path: Path, optimizer, model) -> None:
    optimizer.build(model.trainable_variables)
    with np.load(path) as data:
        arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
    if len(arrays) != len(optimizer.variables):
        raise LungedgeError(f"{path} does not match this model's optimizer")
    for v, a in zip(optimizer.variables, arrays):
        v.assign(a)


def make_optimizer(keras, cfg: common.TrainConfig, steps_per_epoch: int):
    """AdamW; rate: linear warm-up to ``cfg.lr`` over ``warmup_epochs``, then cosine decay to zero
    (the PyTorch trainer's :func:`common.lr_factor` schedule)."""
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    if warmup > 0:
        schedule = keras.optimizers.schedules.CosineDecay(cfg.lr / warmup, decay_steps=max(1, total - warmup),
                                                          warmup_target=cfg.lr, warmup_steps=warmup)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=total)
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)


def train_keras(cfg: common.TrainConfig, on_epoch=None, show_progress: bool | None = None,
                stop_after: int | None = None, resume_dir: Path | None = None, strategy=None) -> dict:
    import_keras()
    common.check_device(cfg.device, "keras")
    set_tensorflow_threads(cfg.threads)
    run = KerasRun(cfg, resume_dir, strategy)
    return run.fit(on_epoch, sys.stderr.isatty() if show_progress is None else show_progress, stop_after)


class KerasRun(EpochLoop):
    """One Keras training run: data, model, optimizer and the epoch loop's state."""

    def __init__(self, cfg: common.TrainConfig, resume_dir: Path | None, strategy=None):
        keras = self.keras = import_keras()
        self.cfg, self.spec = cfg, get_spec(cfg.model)
        run_dir = resume_dir or common.new_run_dir(cfg)
        if resume_dir is None:
            common.save_config(run_dir, cfg)
        self.prep = common.run_preprocessing(cfg, self.spec)
        self.data = common.open_run(cfg, run_dir, resume_dir is not None, self.prep)
        keras.utils.set_random_seed(cfg.seed)
        self.n_train = len(self.data.arrays.y["train"])
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with scope:
            built = self._start_model(resume_dir)
            self.model, self.build = built.model, built.build
            self.optimizer = make_optimizer(keras, cfg, max(1, math.ceil(self.n_train / cfg.batch_size)))
            self.model.compile(optimizer=self.optimizer,
                               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        self.history, self.best, self.start, self.bad_epochs = [], None, 0, 0
        if resume_dir is not None:
            self._restore(run_dir)

    def _start_model(self, resume_dir: Path | None) -> Built:
        cfg = self.cfg
        if resume_dir is None:
            return common.initial_model(cfg, self.spec, self.data.classes)
        model, meta = ckpt.load_checkpoint(resume_dir / "last.h5", mode=cfg.mode, unfreeze=cfg.unfreeze)
        apply_mode(self.spec, model, cfg.mode, cfg.unfreeze)
        return Built(model, ckpt.build_of(meta), self.prep)

    def _restore(self, run_dir: Path) -> None:
        meta = ckpt.read_keras_meta(run_dir / "last.h5")
        self.history, self.start = list(meta["history"]), int(meta["epoch"])
        self.best, self.bad_epochs = meta.get("best"), int(meta.get("bad_epochs", 0))
        load_optimizer(run_dir / "last.optimizer.npz", self.optimizer, self.model)

    def meta_for(self, epoch: int) -> dict:
        return super().meta_for(epoch, bad_epochs=self.bad_epochs)

    def evaluate(self, model, split: str) -> dict:
        x, y = self.data.arrays.x[split], self.data.arrays.y[split]
        logits = predict_in_batches(lambda xb: model(xb, training=False), x, 64, len(self.data.classes))
        return common.score(logits, y, self.data.classes)

    def train_epoch(self, epoch: int, show_progress: bool) -> float:
        cfg, arrays = self.cfg, self.data.arrays
        rng = np.random.default_rng([cfg.seed, epoch])
        perm = rng.permutation(self.n_train)
        x, y = arrays.x["train"][perm], arrays.y["train"][perm]
        if cfg.augment:
            x = augment_nhwc(x, cfg.seed * 100_003 + epoch, self.prep)
        self.keras.utils.set_random_seed(cfg.seed * 100_003 + epoch)
        cw = {i: float(w) for i, w in enumerate(class_weights(arrays.y["train"], len(self.data.classes)))}
        fit = self.model.fit(x, y, batch_size=cfg.batch_size, epochs=epoch + 1, initial_epoch=epoch, shuffle=False,
                             class_weight=cw, verbose=2 if show_progress else 0)
        return float(fit.history["loss"][-1])

    def end_epoch(self, epoch: int, train_loss: float, seconds: float) -> dict:
        """Validate, update best/patience, write best.h5 (if better), last.h5 (+ optimizer) and metrics.json
        as one set: a failed write (full disk) leaves the previous epoch's set whole, to --resume from."""
        rec, improved = self.record_epoch(epoch, train_loss, self.evaluate(self.model, "val"), seconds)
        run_dir = self.data.run_dir
        with written_together():
            if improved:
                ckpt.save_keras_checkpoint(run_dir / "best.h5", self.model, self.meta_for(epoch + 1))
            ckpt.save_keras_checkpoint(run_dir / "last.h5", self.model, self.meta_for(epoch + 1))
            save_optimizer(run_dir / "last.optimizer.npz", self.optimizer)
            common.write_metrics(self.data, self.cfg, self.history, self.best, None, "running",
                                 time.time() - self.t_start, suffix=".h5")
        return rec

    def finish(self) -> dict:
        """Test the best checkpoint and write the final metrics.json; early stopping is a normal end."""
        best_model, _ = ckpt.load_checkpoint(self.data.run_dir / "best.h5")
        test = self.evaluate(best_model, "test")
        return common.write_metrics(self.data, self.cfg, self.history, self.best, test, "finished",
                                    time.time() - self.t_start, suffix=".h5", early_stopped=self.early_stopped)
