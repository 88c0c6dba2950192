"""RieszLoss over a process group and the streaming metrics' sync, against one process.

Worlds of 2 and 3 gloo processes (one thread each, 127.0.0.1), started once per session; every
rank runs the scenarios below on its shards of deterministic global data and saves its results,
and the tests compare them with the single-process function / one-shot metric on the
concatenated data in this process. The shards are ragged, one is empty, and the data hold
coincident rows: a row repeated on another rank, and a row of the second step equal to one of
the first step's, which by then is in some rank's bank. float64: 1e-12.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from poissonflow import losses as L
from poissonflow import metrics as M
from poissonflow.testing import row_errors

TOL = 1e-12
D = 5
S = 2.5
BANK = 16
# rows of each rank in each of two steps (an empty shard in each world)
STEPS = {2: [[5, 9], [0, 7]], 3: [[4, 0, 6], [3, 5, 2]]}
# two update batches per rank; rank 1 of the 3-rank world sees only empty ones
FEATURE_SHARDS = {2: [[0, 40], [25, 13]], 3: [[17, 0], [0, 0], [20, 9]]}


def step_data(world):
    """The global batch of each step; step 2 holds a copy of one of its rows on another rank
    and a copy of a step-1 row (in a bank by then)."""
    g = torch.Generator().manual_seed(21)
    out = []
    for sizes in STEPS[world]:
        out.append(torch.randn(sum(sizes), D, generator=g, dtype=torch.float64))
    second = out[1]
    second[-1] = second[0]  # across ranks (rank-major: first and last rows)
    second[1] = 3.0 * out[0][2]  # a multiple of a step-1 row: the same point (float64)
    return out


def shard(t, sizes, r):
    o = sum(sizes[:r])
    return t[o : o + sizes[r]]


def feature_data(world):
    g = torch.Generator().manual_seed(5)
    n = sum(sum(p) for p in FEATURE_SHARDS[world])
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    y = x + 0.2 * torch.randn(n, 12, generator=g, dtype=torch.float64)
    return x, y


def feature_shards(world, rank):
    """This rank's two update batches as row ranges of the global features (rank-major)."""
    sizes = [sum(p) for p in FEATURE_SHARDS[world]]
    start = sum(sizes[:rank])
    a, b = FEATURE_SHARDS[world][rank]
    return slice(start, start + a), slice(start + a, start + a + b)


# ------------------------------------------------------------------------------- the worker


def worker(rank, world, port, out):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from poissonflow.distributed import end_process_group

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    res = {}
    data = step_data(world)
    for mode in ("ring", "allgather"):
        mod = L.RieszLoss(s=S, bank_size=BANK, gather_distributed=True, mode=mode)
        for step, sizes in enumerate(STEPS[world]):
            x = shard(data[step], sizes, rank).clone().requires_grad_()
            loss = mod(x)
            loss.backward()
            res[("riesz", mode, step)] = (loss.detach(), x.grad)
    # a process group given explicitly; coincident="raise" raises on every rank
    mod = L.RieszLoss(s=S, process_group=dist.group.WORLD, coincident="raise")
    try:
        mod(shard(data[1], STEPS[world][1], rank))
        res["raise"] = "no error"
    except ValueError as err:
        res["raise"] = str(err)
    x, y = feature_data(world)
    metrics = {
        "alignment": M.Alignment(1.5),
        "uniformity": M.Uniformity(normalize=True),
        "w2": M.WassersteinUniformity(),
        "erank": M.EffectiveRank(center=True),
        "rankme": M.RankMe(),
    }
    for part in feature_shards(world, rank):
        for name, m in metrics.items():
            m.update(x[part], y[part]) if name == "alignment" else m.update(x[part])
    res["metrics"] = {name: float(m.compute()) for name, m in metrics.items()}
    local = M.EffectiveRank(center=True, sync=False)
    local.update(x[feature_shards(world, rank)[1]])
    res["local_erank"] = (
        float(local.compute())
        if feature_shards(world, rank)[1].stop > feature_shards(world, rank)[1].start + 1
        else None
    )
    torch.save(res, Path(out) / f"rank{rank}.pt")
    end_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    procs, dirs = [], {}
    t0 = time.perf_counter()
    for R in STEPS:
        out = tmp_path_factory.mktemp(f"losses{R}")
        dirs[R] = out
        port = _free_port()
        for r in range(R):
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, str(r), str(R), str(port), str(out)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    bad = [log for p, log in zip(procs, logs) if p.returncode]
    assert not bad, "a worker failed:\n" + "\n".join(log[-3000:] for log in bad)
    print(f"worlds ran in {time.perf_counter() - t0:.1f} s")
    return {
        R: [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(R)]
        for R, d in dirs.items()
    }


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("R", sorted(STEPS))
@pytest.mark.parametrize("mode", ["ring", "allgather"])
def test_riesz_module_equals_one_process_on_the_concatenation(worlds, R, mode):
    """Step 1: the global batch, no bank yet. Step 2: the global batch against the union of the
    ranks' banks (= step 1's rows), with a row repeated across ranks and a row equal to a
    bank row: the same value on every rank, each rank's gradient the single-process one."""
    data = step_data(R)
    for step, sizes in enumerate(STEPS[R]):
        bank = data[0] if step == 1 else None
        x = data[step].clone().requires_grad_()
        ref = L.riesz_uniformity_loss(x, S, bank=bank)
        ref.backward()
        for r in range(R):
            val, grad = worlds[R][r][("riesz", mode, step)]
            assert abs(float(val) - float(ref.detach())) <= TOL * abs(float(ref.detach()))
            assert row_errors(grad, shard(x.grad, sizes, r)) <= TOL


@pytest.mark.parametrize("R", sorted(STEPS))
def test_coincident_raise_names_rows_on_every_rank(worlds, R):
    n = sum(STEPS[R][1])
    for r in range(R):
        assert f"x rows 0 and {n - 1}" in worlds[R][r]["raise"]


@pytest.mark.parametrize("R", sorted(STEPS))
def test_streaming_metrics_synced_equal_one_shot(worlds, R):
    x, y = feature_data(R)
    u = x / x.norm(dim=1, keepdim=True)
    want = {
        "alignment": float(M.align_loss(x, y, 1.5)),
        "uniformity": float(M.uniform_loss(u)),
        "w2": float(M.wasserstein_uniformity(x)),
        "erank": M.effective_rank(x, center=True),
        "rankme": M.rankme(x),
    }
    for r in range(R):
        got = worlds[R][r]["metrics"]
        for name, value in want.items():
            assert abs(got[name] - value) <= 1e-10 * abs(value), (name, got[name], value)
        part = feature_shards(R, r)[1]
        if worlds[R][r]["local_erank"] is not None:  # sync=False: this rank's rows only
            assert (
                abs(worlds[R][r]["local_erank"] - M.effective_rank(x[part], center=True))
                <= 1e-10 * R * 10
            )


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
