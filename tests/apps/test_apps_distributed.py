"""``torchrun`` with two CPU processes (gloo): DistributedDataParallel training, results written once by rank 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "torchddn",
           "pointcloud", "--quick", "--epochs", "1", "--n-train", "24", "--n-test", "12", "--points", "32",
           "--classes", "3", "--methods", "max", "huber", "--fractions", "0", "0.5", "--no-progress",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["world_size"] == 2
    assert len(data["rows"]) == 4 and all(0 <= r["test_accuracy"] <= 1 for r in data["rows"])
    # rank 0 alone prints the table
    assert proc.stdout.count("test_accuracy") == 1
    assert (out / "accuracy.png").exists()
