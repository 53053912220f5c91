"""The epoch loop both trainers share: train an epoch, validate, keep best/last, stop early or on
request, then test the best checkpoint. A trainer (``TorchRun``, ``KerasRun``) supplies the steps:
:meth:`EpochLoop.train_epoch`, :meth:`EpochLoop.end_epoch` (which calls :meth:`record_epoch`) and
:meth:`EpochLoop.finish`; a distributed trainer also overrides :attr:`main` and :meth:`barrier`.
"""

from __future__ import annotations

import time

from ..models import checkpoint as ckpt
from . import common


class EpochLoop:
    """State of the loop: ``cfg``, ``spec``, ``prep``, ``data``, ``build``, ``history``, ``best``,
    ``start``, ``bad_epochs``, ``t_start`` (set by the trainer before :meth:`fit`)."""

    main = True  # this process reports epochs and writes files (rank 0 of a distributed run)

    def barrier(self) -> None:
        """Wait for every process of the run (a no-op when there is one)."""

    def train_epoch(self, epoch: int, show_progress: bool) -> float:
        raise NotImplementedError

    def end_epoch(self, epoch: int, train_loss: float, seconds: float) -> dict:
        raise NotImplementedError

    def finish(self) -> dict:
        raise NotImplementedError

    @property
    def early_stopped(self) -> bool:
        return bool(self.cfg.patience and self.bad_epochs >= self.cfg.patience)

    def record_epoch(self, epoch: int, train_loss: float, val: dict, seconds: float, **extra) -> tuple[dict, bool]:
        """Append epoch ``epoch`` (0-based) to the history and update best/patience; (record, improved)."""
        improved = common.is_better(self.best, val)
        rec = common.epoch_record(epoch + 1, train_loss, val, seconds, improved, **extra)
        self.history.append(common.clean(rec))
        if improved:
            self.best, self.bad_epochs = common.best_record(epoch + 1, val), 0
        else:
            self.bad_epochs += 1
        return rec, improved

    def meta_for(self, epoch: int, **extra) -> dict:
        """The checkpoint metadata after ``epoch`` epochs."""
        d = self.data
        return ckpt.make_meta(self.spec, d.classes, self.prep, self.cfg.mode, d.fingerprint, epoch, self.history,
                              build=self.build, split_manifest=d.split_path, data_root=str(d.root),
                              config=self.cfg.to_dict(), best=self.best, **extra)

    def fit(self, on_epoch, show_progress: bool, stop_after: int | None) -> dict:
        """Run the remaining epochs; ``stop_after`` ends this call after that many, as an interruption would."""
        cfg, self.t_start = self.cfg, time.time()
        for epoch in range(self.start, cfg.epochs):
            t0 = time.time()
            train_loss = self.train_epoch(epoch, show_progress)
            rec = self.end_epoch(epoch, train_loss, time.time() - t0)
            if on_epoch and self.main:
                on_epoch(rec)
            if self.early_stopped:
                break
            if stop_after is not None and epoch + 1 - self.start >= stop_after and epoch + 1 < cfg.epochs:
                self.barrier()
                return {"run_dir": str(self.data.run_dir), "status": "interrupted", "history": self.history}
        return self.finish()
