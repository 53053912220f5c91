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

from ..errors import LungedgeError
from ..io import sha256_bytes, write_json
from ..models import checkpoint as ckpt
from ..models.registry import get_spec
from . import common
from .metrics import class_weights, summarize


# -- distributed helpers ----------------------------------------------------------------------------

class Dist:
    """rank / world size; a no-op when not started by torchrun."""

    def __init__(self, device: str):
        import torch.distributed as dist

        self.world = common.env_int("WORLD_SIZE", 1)
        self.rank = common.env_int("RANK", 0)
        self.local_rank = common.env_int("LOCAL_RANK", 0)
        self.active = self.world > 1
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

def augment(x, gen, max_degrees: float = 10.0, max_scale: float = 0.10, max_shift: float = 0.06, jitter: float = 0.10):
    """Random horizontal flip, small rotation/zoom/shift and brightness/contrast jitter on a batch
    of normalised NCHW inputs (train only; val/test see exactly the model's Preprocessing)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    r = torch.rand(b, 7, generator=gen) * 2 - 1  # uniform in [-1, 1]
    x = torch.where((r[:, 0] > 0)[:, None, None, None], x.flip(-1), x)
    angle = r[:, 1] * math.radians(max_degrees)
    scale = 1 + r[:, 2] * max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, r[:, 3] * max_shift], 1),
                         torch.stack([sin, cos, r[:, 4] * max_shift], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x * (1 + jitter * r[:, 5])[:, None, None, None] + (jitter * r[:, 6])[:, None, None, None]


def set_train_mode(model) -> None:
    """train(), except BatchNorm layers whose parameters are frozen keep their running statistics."""
    import torch.nn as nn

    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def predict_logits(model, x: np.ndarray, device, batch: int = 64) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch]).to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate(model, x, y, classes, device) -> dict:
    if len(y) == 0:
        return {"loss": float("nan"), **summarize([], [], classes)}
    logits = predict_logits(model, x, device)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean())
    return {"loss": loss, **summarize(y, logits.argmax(1), classes)}


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


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

    spec = get_spec(cfg.model)
    common.check_device(cfg.device, "torch")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dist = Dist(cfg.device)
    try:
        return _run(cfg, spec, dist, on_epoch, show_progress, stop_after, resume_dir)
    finally:
        dist.close()


def _run(cfg, spec, dist: Dist, on_epoch, show_progress, stop_after, resume_dir):
    import torch
    import torch.nn as nn

    device = torch.device(f"cuda:{dist.local_rank}" if cfg.device == "cuda" else "cpu")
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    show_progress = show_progress and dist.main

    # run folder (rank 0 names it; the others follow)
    resume_state = None
    if resume_dir is not None:
        run_dir = resume_dir
        last = run_dir / "last.pth"
        payload = ckpt.read_torch_checkpoint(last)
        resume_state = payload
    else:
        run_dir = Path(dist.broadcast(str(common.new_run_dir(cfg)) if dist.main else None))
        if dist.main:
            common.save_config(run_dir, cfg)
    manifest, root = common.prepare_split(
        common.TrainConfig.from_dict({**cfg.to_dict(), "split": cfg.split or (str(run_dir / "split.json") if resume_dir else None)}),
        run_dir, write=dist.main)
    fingerprint = manifest["dataset"]["fingerprint"]
    split_path = str(Path(cfg.split)) if cfg.split else str(run_dir / "split.json")
    classes = list(manifest["classes"])
    prep = spec.preprocessing_for(cfg.image_size)
    arrays = common.load_arrays(manifest, root, prep)

    # model: fresh, or the checkpoint being fine-tuned
    torch.manual_seed(cfg.seed)
    model = common.initial_model(cfg, spec, classes)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LungedgeError(f"nothing to train: {cfg.model} in {cfg.mode} mode has no trainable parameters")
    net = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dist.local_rank] if cfg.device == "cuda" else None)

    n_train = len(arrays.y["train"])
    per_rank = n_train // dist.world
    local_batch = max(1, cfg.batch_size // dist.world)
    steps_per_epoch = max(1, math.ceil(per_rank / local_batch))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)))
    weights = torch.from_numpy(class_weights(arrays.y["train"], len(classes))).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    x_train = torch.from_numpy(arrays.x["train"])
    y_train = torch.from_numpy(arrays.y["train"])

    history, best, start, bad_epochs = [], None, 0, 0
    if resume_state is not None:
        ts = resume_state["train_state"]
        model.load_state_dict(resume_state["state_dict"])
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        history, start, bad_epochs = list(resume_state["meta"]["history"]), int(ts["epoch"]), int(ts["bad_epochs"])
        best = ts.get("best") or None

    def meta_for(epoch):
        return ckpt.make_meta(spec, classes, prep, cfg.mode, fingerprint, epoch, history,
                              split_manifest=split_path, data_root=str(root), config=cfg.to_dict(),
                              best=best, world_size=dist.world)

    t_start = time.time()
    status = "running"
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch + 1)  # dropout
        perm = torch.randperm(n_train, generator=gen)[: per_rank * dist.world][dist.rank::dist.world]
        set_train_mode(net)
        total_loss, seen = 0.0, 0
        with _epoch_bar(steps_per_epoch, epoch + 1, cfg.epochs, show_progress) as advance:
            for s in range(steps_per_epoch):
                idx = perm[s * local_batch:(s + 1) * local_batch]
                xb, yb = x_train[idx], y_train[idx]
                if cfg.augment:
                    xb = augment(xb, gen)
                if len(idx) < 2 and s > 0:  # a lone last sample would break BatchNorm; skip it
                    advance(loss=f"{total_loss / max(seen, 1):.4f}")
                    continue
                logits = net(xb.to(device))
                loss = loss_fn(logits, yb.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += float(loss.detach()) * len(idx)
                seen += len(idx)
                advance(loss=f"{total_loss / max(seen, 1):.4f}",
                        bacc=f"{history[-1]['val_balanced_accuracy']:.3f}" if history else "-")
        dist.sync_buffers(model)
        val = evaluate(model, arrays.x["val"], arrays.y["val"], classes, device)
        train_loss = total_loss / max(seen, 1)
        if dist.active:  # mean training loss over ranks (for the record only)
            train_loss = float(np.mean(dist.gather(train_loss)))
        score = val["balanced_accuracy"]
        improved = best is None or score > best["val_balanced_accuracy"] + 1e-12 or (
            score >= best["val_balanced_accuracy"] - 1e-12 and val["loss"] < best["val_loss"])
        rec = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
               "val_balanced_accuracy": score, "val_accuracy": val["accuracy"], "lr": opt.param_groups[0]["lr"],
               "seconds": time.time() - t0, "best": bool(improved)}
        history.append(rec)
        if improved:
            best = {"epoch": epoch + 1, "val_balanced_accuracy": score, "val_loss": val["loss"]}
            bad_epochs = 0
        else:
            bad_epochs += 1
        if dist.main:
            if improved:
                ckpt.save_torch_checkpoint(run_dir / "best.pth", model, meta_for(epoch + 1))
            train_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1,
                           "bad_epochs": bad_epochs, "best": best}
            ckpt.save_torch_checkpoint(run_dir / "last.pth", model, meta_for(epoch + 1), train_state)
            _write_metrics(run_dir, cfg, manifest, split_path, history, best, None, "running", time.time() - t_start)
        if on_epoch and dist.main:
            on_epoch(rec)
        if cfg.patience and bad_epochs >= cfg.patience:
            status = "stopped-early"
            break
        if stop_after is not None and epoch + 1 - start >= stop_after and epoch + 1 < cfg.epochs:
            dist.barrier()
            return {"run_dir": str(run_dir), "status": "interrupted", "history": history}
    else:
        status = "finished"
    if status == "stopped-early":
        status = "finished"  # early stopping is a normal end
    digests = dist.gather(state_digest(model))
    test = None
    if dist.main:
        best_model, _ = ckpt.load_checkpoint(run_dir / "best.pth", device=str(device))
        test = evaluate(best_model, arrays.x["test"], arrays.y["test"], classes, device)
        test["loss"] = None if math.isnan(test["loss"]) else test["loss"]
    summary = _write_metrics(run_dir, cfg, manifest, split_path, history, best, test, status,
                             time.time() - t_start, rank_digests=digests if dist.active else None,
                             early_stopped=bool(cfg.patience and bad_epochs >= cfg.patience)) if dist.main else None
    dist.barrier()
    return summary or {"run_dir": str(run_dir), "status": status, "rank_digests": digests}


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _write_metrics(run_dir, cfg, manifest, split_path, history, best, test, status, seconds, **extra) -> dict:
    summary = {
        "format": common.RUN_FORMAT, "model": cfg.model, "run_dir": str(run_dir), "status": status,
        "config": cfg.to_dict(), "classes": manifest["classes"],
        "split": {"manifest": split_path, "fingerprint": manifest["dataset"]["fingerprint"],
                  "group_by": manifest["params"]["group_by"],
                  "counts": {s: sum(v.values()) for s, v in manifest["counts"].items()}},
        "history": history, "best": best, "test": test, "wall_seconds": round(seconds, 1),
        "checkpoints": {"best": str(run_dir / "best.pth"), "last": str(run_dir / "last.pth")}, **extra,
    }
    summary = _clean(summary)
    write_json(run_dir / "metrics.json", summary)
    return summary
