"""`torchrun --nproc-per-node 2 -m poissonflow transform FEATURES -o OUT`, end to end: two gloo
ranks each read their slice of a small .npy file, flow it through the distributed transform
(ring mode: every field evaluation crosses processes), and rank 0 writes OUT and its
.info.json; the result equals the one-process `poissonflow.transform` of the whole file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

import poissonflow


def test_torchrun_transform_writes_the_single_process_result(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((23, 4))  # float64, 12 + 11 rows per rank
    src = tmp_path / "feats.npy"
    np.save(src, feats)
    out = tmp_path / "flowed.npy"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "poissonflow",
        "transform",
        str(src),
        "-o",
        str(out),
        "--steps",
        "5",
        "--distributed-mode",
        "ring",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "wrote" in run.stdout and "2 processes" in run.stdout
    got = np.load(out)
    want, info = poissonflow.transform(torch.from_numpy(feats), steps=5, return_info=True)
    assert got.shape == (23, 5) and got.dtype == np.float64
    assert float(np.abs(got - want.numpy()).max()) <= 1e-10
    meta = json.loads((tmp_path / "flowed.info.json").read_text())
    assert meta["world_size"] == 2 and meta["mode"] == "ring"
    assert meta["rows_per_rank"] == [12, 11] and meta["n_samples"] == 23
    assert meta["excluded"] == info["excluded"] == 23
    assert abs(meta["z_min"] - info["z_min"]) <= 1e-14 * info["z_min"]


def test_torchrun_learned_field_transform(tmp_path):
    """--field learned under torchrun: the field trained by fit_learned_field (DDP, rank 0
    saves --save-field), each rank's rows of an .npz flowed through it; equal to the
    one-process command's output to float32 rounding."""
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((20, 3)).astype(np.float32)
    src = tmp_path / "feats.npz"
    np.savez(src, emb=feats)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    common = [
        "-m",
        "poissonflow",
        "transform",
        str(src),
        "--field",
        "learned",
        "--field-epochs",
        "3",
        "--steps",
        "4",
    ]
    dist_cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *common,
        "-o",
        str(tmp_path / "two.npz"),
        "--save-field",
        str(tmp_path / "field.pt"),
    ]
    one_cmd = [sys.executable, *common, "-o", str(tmp_path / "one.npz")]
    for cmd in (dist_cmd, one_cmd):
        run = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    two = np.load(tmp_path / "two.npz")["emb"]
    one = np.load(tmp_path / "one.npz")["emb"]
    assert two.shape == one.shape == (20, 4)
    assert float(np.abs(two - one).max()) <= 1e-5
    meta = json.loads((tmp_path / "two.info.json").read_text())
    assert meta["world_size"] == 2 and meta["field"] == "learned"
    assert meta["learned_field_epochs"] == 3
    assert (tmp_path / "field.pt").is_file()
