"""PyTorch training under torchrun: 2 CPU processes (gloo) end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_dataset

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_end_with_identical_weights(tmp_path):
    data = write_dataset(tmp_path / "data", ["a", "b", "c"], per_class=8, size=48, colour=True)
    entry = tmp_path / "entry.py"
    entry.write_text("import torch, torchvision, sys\nfrom lungedge.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(entry),
           "train", "smallcnn", "--data", str(data), "--epochs", "2", "--batch-size", "8", "--image-size", "32",
           "--weights", "none", "--out", str(tmp_path / "runs"), "--run-name", "ddp", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    metrics = json.loads((tmp_path / "runs" / "smallcnn" / "ddp" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["history"]) == 2
    digests = metrics["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_cuda_ranks_bind_their_gpu_before_nccl(monkeypatch):
    """issue #15: torch.cuda.set_device(local_rank) comes before init_process_group on CUDA."""
    import torch
    import torch.distributed as dist

    from lungedge.train.torch_trainer import Dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    Dist("cuda")
    assert calls == [("set_device", 1), ("init", "nccl")]
    calls.clear()
    Dist("cpu")
    assert calls == [("init", "gloo")]
