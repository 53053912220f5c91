"""The PyTorch trainer: class-weighted loss, AdamW with warm-up + cosine schedule, GPU-free
augmentation on cached inputs, best/last checkpoints, exact resume, and DistributedDataParallel
when started by ``torchrun`` (one process per rank; gloo on CPU, NCCL on CUDA).

Every epoch draws its shuffle, augmentation and dropout randomness from generators seeded by
(seed, epoch), so a run resumed from ``last.pth`` ends where an uninterrupted one ends.
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
from ..io import sha256_bytes, written_together
from ..models import checkpoint as ckpt
from ..models.registry import get_spec
from . import common
from .loop import EpochLoop
from .metrics import class_weights


# -- distributed helpers ----------------------------------------------------------------------------

class Dist:
    """rank / world size; a no-op when not started by torchrun. On CUDA each rank binds its GPU
    (``torch.cuda.set_device(local_rank)``) before NCCL starts, so collectives use the right device."""

    def __init__(self, device: str):
        import torch
        import torch.distributed as dist

        self.world, self.rank, self.local_rank = common.ddp_env()
        self.active = self.world > 1
        if device == "cuda":
            torch.cuda.set_device(self.local_rank)
        if self.active and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        self.dist = dist

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def sync_buffers(self, model) -> None:
        """BatchNorm running statistics drift apart per rank; take rank 0's."""
        if self.active:
            for b in model.buffers():
                self.dist.broadcast(b.data, src=0)

    def barrier(self):
        if self.active:
            self.dist.barrier()

    def close(self):
        if self.active and self.dist.is_initialized():
            self.dist.destroy_process_group()


# -- pieces ----------------------------------------------------------------------------------------

def set_train_mode(model) -> None:
    """train(), except BatchNorm layers whose parameters are frozen keep their running statistics."""
    import torch.nn as nn

    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def evaluate(model, x, y, classes, device) -> dict:
    """Loss and metrics of ``model`` on cached inputs (batched through :func:`lungedge.batching.predict_in_batches`)."""
    import torch

    model.eval()

    def forward(xb):
        with torch.no_grad():
            return model(torch.from_numpy(xb).to(device)).float().cpu().numpy()

    return common.score(predict_in_batches(forward, x, 64, len(classes)), y, classes)


def state_digest(model) -> str:
    """SHA-256 over all parameters and buffers (to check that DDP ranks agree)."""
    h = []
    for k, v in sorted(model.state_dict().items()):
        h.append(k.encode() + v.detach().cpu().float().numpy().tobytes())
    return sha256_bytes(b"".join(h))


@contextlib.contextmanager
def _epoch_bar(total: int, epoch: int, epochs: int, enabled: bool):
    """A rich bar on stderr (terminal only): loss so far and the last validation balanced accuracy."""
    if not enabled:
        yield lambda n=1, **kw: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("epoch {task.fields[e]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}  val bal acc {task.fields[bacc]}"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("train", total=total, e=f"{epoch}/{epochs}", loss="-", bacc="-")
        yield lambda n=1, **kw: bar.update(task, advance=n, **kw)


# -- the run ----------------------------------------------------------------------------------------

def train_torch(cfg: common.TrainConfig, on_epoch=None, show_progress: bool | None = None,
                stop_after: int | None = None, resume_dir: Path | None = None) -> dict:
    """Train (or resume) one run; return the run summary (also written as ``metrics.json``).

    ``stop_after`` ends the process's work after that many epochs of this call, as an
    interruption would (used by tests of --resume).
    """
    import torch

    common.check_device(cfg.device, "torch")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dist = Dist(cfg.device)
    try:
        run = TorchRun(cfg, dist, resume_dir)
        if show_progress is None:
            show_progress = sys.stderr.isatty()
        return run.fit(on_epoch, show_progress and dist.main, stop_after)
    finally:
        dist.close()


class TorchRun(EpochLoop):
    """One training run: data, model, optimizer and the epoch loop's state."""

    def __init__(self, cfg: common.TrainConfig, dist: Dist, resume_dir: Path | None):
        import torch

        self.cfg, self.dist, self.spec = cfg, dist, get_spec(cfg.model)
        self.device = torch.device(f"cuda:{dist.local_rank}" if cfg.device == "cuda" else "cpu")
        if resume_dir is None:  # rank 0 names the run folder; the others follow
            run_dir = Path(dist.broadcast(str(common.new_run_dir(cfg)) if dist.main else None))
            if dist.main:
                common.save_config(run_dir, cfg)
        else:
            run_dir = resume_dir
        torch.manual_seed(cfg.seed)
        self.data = self._open_data(run_dir, resume_dir is not None)
        self._build_model()
        self._build_optimizer()
        self.history, self.best, self.start, self.bad_epochs = [], None, 0, 0
        if resume_dir is not None:
            self.dist.barrier()  # rank 0 has locked the run folder, completing a set a kill left half renamed
            self._restore(ckpt.read_torch_checkpoint(run_dir / "last.pth"))

    def _open_data(self, run_dir: Path, resuming: bool) -> common.RunData:
        self.prep = common.run_preprocessing(self.cfg, self.spec)
        return common.open_run(self.cfg, run_dir, resuming, self.prep, write=self.dist.main)

    def _build_model(self) -> None:
        built = common.initial_model(self.cfg, self.spec, self.data.classes)
        self.model, self.build = built.model.to(self.device), built.build
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise LungedgeError(f"nothing to train: {self.cfg.model} in {self.cfg.mode} mode has no trainable parameters")
        self.net = self.model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.model, device_ids=[self.dist.local_rank] if self.cfg.device == "cuda" else None)

    def _build_optimizer(self) -> None:
        import torch
        import torch.nn as nn

        cfg, y = self.cfg, self.data.arrays.y["train"]
        self.n_train = len(y)
        self.per_rank = self.n_train // self.dist.world
        self.local_batch = max(1, cfg.batch_size // self.dist.world)
        self.steps = max(1, math.ceil(self.per_rank / self.local_batch))
        total, warmup = cfg.epochs * self.steps, int(cfg.warmup_epochs * self.steps)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: common.lr_factor(s, total, warmup))
        weights = torch.from_numpy(class_weights(y, len(self.data.classes))).to(self.device)
        self.loss_fn = nn.CrossEntropyLoss(weight=weights)

    def _restore(self, payload: dict) -> None:
        ts = payload["train_state"]
        self.model.load_state_dict(payload["state_dict"])
        self.opt.load_state_dict(ts["optimizer"])
        self.sched.load_state_dict(ts["scheduler"])
        self.history, self.start = list(payload["meta"]["history"]), int(ts["epoch"])
        self.bad_epochs, self.best = int(ts["bad_epochs"]), ts.get("best") or None

    @property
    def main(self) -> bool:
        return self.dist.main

    def barrier(self) -> None:
        self.dist.barrier()

    def meta_for(self, epoch: int) -> dict:
        return super().meta_for(epoch, world_size=self.dist.world)

    def train_epoch(self, epoch: int, show_progress: bool) -> float:
        """One pass over this rank's share of the training set; the mean training loss."""
        import torch

        cfg, dist = self.cfg, self.dist
        x_train, y_train = torch.from_numpy(self.data.arrays.x["train"]), torch.from_numpy(self.data.arrays.y["train"])
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch + 1)  # dropout
        perm = torch.randperm(self.n_train, generator=gen)[: self.per_rank * dist.world][dist.rank::dist.world]
        set_train_mode(self.net)
        total_loss, seen = 0.0, 0
        bacc = f"{self.history[-1]['val_balanced_accuracy']:.3f}" if self.history else "-"
        with _epoch_bar(self.steps, epoch + 1, cfg.epochs, show_progress) as advance:
            for s in range(self.steps):
                idx = perm[s * self.local_batch:(s + 1) * self.local_batch]
                xb, yb = x_train[idx], y_train[idx]
                if cfg.augment:
                    xb = common.augment(xb, gen, self.prep)
                if len(idx) >= 2 or s == 0:  # a lone last sample would break BatchNorm; skip it
                    total_loss += self._step(xb, yb) * len(idx)
                    seen += len(idx)
                advance(loss=f"{total_loss / max(seen, 1):.4f}", bacc=bacc)
        train_loss = total_loss / max(seen, 1)
        if dist.active:  # mean training loss over ranks (for the record only)
            train_loss = float(np.mean(dist.gather(train_loss)))
        return train_loss

    def _step(self, xb, yb) -> float:
        loss = self.loss_fn(self.net(xb.to(self.device)), yb.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def end_epoch(self, epoch: int, train_loss: float, seconds: float) -> dict:
        """Validate, update best/patience, write best.pth (if better), last.pth and metrics.json (rank 0), as
        one set: a failed write (full disk) leaves the previous epoch's set whole, to --resume from."""
        self.dist.sync_buffers(self.model)
        arrays = self.data.arrays
        val = evaluate(self.model, arrays.x["val"], arrays.y["val"], self.data.classes, self.device)
        rec, improved = self.record_epoch(epoch, train_loss, val, seconds, lr=self.opt.param_groups[0]["lr"])
        if self.dist.main:
            run_dir = self.data.run_dir
            with written_together():  # all of them this epoch's, or (a failed write) all the previous epoch's
                if improved:
                    ckpt.save_torch_checkpoint(run_dir / "best.pth", self.model, self.meta_for(epoch + 1))
                train_state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                               "epoch": epoch + 1, "bad_epochs": self.bad_epochs, "best": self.best}
                ckpt.save_torch_checkpoint(run_dir / "last.pth", self.model, self.meta_for(epoch + 1), train_state)
                common.write_metrics(self.data, self.cfg, self.history, self.best, None, "running",
                                     time.time() - self.t_start)
        return rec

    def finish(self) -> dict:
        """Test the best checkpoint (rank 0), write the final metrics.json; early stopping is a normal end."""
        digests = self.dist.gather(state_digest(self.model))
        summary = None
        if self.dist.main:
            best_model, _ = ckpt.load_checkpoint(self.data.run_dir / "best.pth", device=str(self.device))
            arrays = self.data.arrays
            test = evaluate(best_model, arrays.x["test"], arrays.y["test"], self.data.classes, self.device)
            summary = common.write_metrics(
                self.data, self.cfg, self.history, self.best, test, "finished", time.time() - self.t_start,
                rank_digests=digests if self.dist.active else None,
                early_stopped=self.early_stopped)
        self.dist.barrier()
        return summary or {"run_dir": str(self.data.run_dir), "status": "finished", "rank_digests": digests}
