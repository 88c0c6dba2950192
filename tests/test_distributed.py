"""poissonflow.distributed against the single-process ops, on 2 and 3 gloo processes.

Each world (2 and 3 ranks, one thread each, 127.0.0.1) is started once per session: every rank
runs all scenarios below on its shards of deterministic global data (ragged shards, an empty
query shard and an empty charge shard, weights with zeros, an all-zero-weight shard, rows no
charge reaches, exclude across shards), twice (for run-to-run bit identity), and saves its
results; the tests then compare them with poissonflow.poisson_field / transform / losses on the
gathered data in this process. Tolerances: poissonflow.testing (float32), 1e-12 (float64: a
merge of exact partials only adds a few roundings).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import poissonflow
from poissonflow.testing import row_errors, tolerance

F64_TOL = 1e-12
MODES = ("allgather", "ring")
# (queries per rank, charges per rank): ragged, with an empty query shard and an empty charge
# shard (rank 1 of the 3-rank world holds neither)
SHARDS = {2: ([0, 9], [5, 6]), 3: ([4, 0, 6], [5, 0, 7])}
D = 5


# ------------------------------------------------------------------------------- data


def field_data(seed, R, dtype, kind):
    nq, nb = SHARDS[R]
    N, B = sum(nq), sum(nb)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.rand(B, generator=g, dtype=torch.float64) + 0.1
    w[1] = 0.0
    ex = torch.randint(-1, B, (N,), generator=g)
    gv = torch.randn(N, D, generator=g, dtype=torch.float64)
    gl = torch.randn(N, generator=g, dtype=torch.float64)
    if kind == "plain":  # no weights, no exclusion
        w, ex = None, None
    elif kind == "zero_shard":  # the last rank's charges all have weight 0
        w[B - nb[-1] :] = 0.0
    elif kind == "dead":  # one charge of weight > 0; queries that exclude it feel no field
        w = torch.zeros(B, dtype=torch.float64)
        w[B - 1] = 1.0
        ex[::2] = B - 1
    return tuple(
        None if t is None else (t.to(dtype) if t.is_floating_point() else t)
        for t in (x, y, w, ex, gv, gl)
    )


def shard(t, sizes, r):
    if t is None:
        return None
    o = sum(sizes[:r])
    return t[o : o + sizes[r]]


def field_and_grads(fn, x, y, w, ex, gv, gl):
    """(v, ls, dx, dy, dw) of <v, gv> + <ls, gl> (rows without field excluded) through fn."""
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    w = None if w is None else w.clone().requires_grad_()
    v, ls = fn(x, y, w, ex)
    loss = (v * gv).sum() + torch.where(torch.isfinite(ls), ls * gl, 0.0).sum()
    loss.backward()
    return [v.detach(), ls.detach(), x.grad, y.grad, None if w is None else w.grad]


def transform_data(R, dtype):
    nq = SHARDS[R][0]
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(sum(nq) + 6, 3, generator=g, dtype=torch.float64).to(dtype)
    return feats


TRANSFORM_CASES = {
    # name: (mode, dtype, kwargs)
    "allgather": ("allgather", torch.float64, {}),
    "ring": ("ring", torch.float64, {}),
    "ring_f32": ("ring", torch.float32, {}),
    "ring_flux": ("ring", torch.float64, {"start": "flux", "seed": 3}),
    "ring_radial_euler": ("ring", torch.float64, {"parameterization": "radial", "solver": "euler"}),
    "ring_charges": ("ring", torch.float64, {"charges": True}),
    # several query batches per rank, as many on every rank (the ring passes line up)
    "ring_batches": ("ring", torch.float64, {"batch_size": 4}),
}
T_STEPS = 6


def transform_split(R, feats, case):
    """(global features, global charges or None, per-rank feature sizes, charge sizes)."""
    n = feats.shape[0]
    nq = list(SHARDS[R][0])
    nq[-1] += n - sum(nq)
    if TRANSFORM_CASES[case][2].get("charges"):
        # held-out points and charges of other ranks among each rank's features
        charges = feats
        queries = torch.cat([feats[2:8], feats[:3] + 0.05])
        nqq = [len(queries) - 4 * (R - 1)] + [4] * (R - 1)
        nb = [n // R] * (R - 1) + [n - (n // R) * (R - 1)]
        return queries, charges, nqq, nb
    return feats, None, nq, None


# ------------------------------------------------------------------------------- worker


def worker(rank, world, port, out):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    import poissonflow.distributed as pfd
    from poissonflow.distributed import flow as dtr

    res = {}
    nq, nb = SHARDS[world]
    for dtype in (torch.float64, torch.float32):
        for kind in ("full", "plain", "zero_shard", "dead"):
            if dtype == torch.float32 and kind != "full":
                continue
            x, y, w, ex, gv, gl = field_data(1, world, dtype, kind)
            args = [
                shard(x, nq, rank),
                shard(y, nb, rank),
                shard(w, nb, rank),
                shard(ex, nq, rank),
                shard(gv, nq, rank),
                shard(gl, nq, rank),
            ]
            for mode in MODES:

                def fn(a, b, c, e, mode=mode):
                    return pfd.poisson_field(a, b, weights=c, exclude=e, mode=mode)

                first = field_and_grads(fn, *args)
                again = field_and_grads(fn, *args)
                same = all(
                    (a is None and b is None) or torch.equal(a, b) for a, b in zip(first, again)
                )
                res[("field", str(dtype), kind, mode)] = (first, same)
    # "auto" at these sizes is the all-gather: the same bits
    x, y, w, ex, gv, gl = field_data(1, world, torch.float64, "full")
    args = [shard(x, nq, rank), shard(y, nb, rank), shard(w, nb, rank), shard(ex, nq, rank)]
    res["auto_equals_allgather"] = all(
        torch.equal(a, b)
        for a, b in zip(
            pfd.poisson_field(*args[:2], weights=args[2], exclude=args[3]),
            pfd.poisson_field(*args[:2], weights=args[2], exclude=args[3], mode="allgather"),
        )
    )
    # a subgroup (ranks 0 and R - 1): point-to-point addresses are the group's global ranks
    sub = dist.new_group([0, world - 1])
    if rank in (0, world - 1):
        xs, ys, gvs, gls = (
            torch.cat([shard(t, sz, 0), shard(t, sz, world - 1)])
            for t, sz in ((x, nq), (y, nb), (gv, nq), (gl, nq))
        )
        part = 0 if rank == 0 else 1
        sq = [nq[0], nq[world - 1]]
        sb = [nb[0], nb[world - 1]]

        def fn(a, b, c, e):
            return pfd.poisson_field(a, b, group=sub, mode="ring")

        res["subgroup"] = field_and_grads(
            fn,
            shard(xs, sq, part),
            shard(ys, sb, part),
            None,
            None,
            shard(gvs, sq, part),
            shard(gls, sq, part),
        )
    # the distributed horizon pieces against poissonflow.horizon on the union
    x, y, w, *_ = field_data(2, world, torch.float64, "full")
    plan = pfd.field.plan_field(
        shard(x, nq, rank),
        shard(y, nb, rank),
        shard(w, nb, rank),
        None,
        0.0,
        None,
        None,
        "ring",
        "auto",
        grad=False,
    )
    res["horizon"] = (
        dtr.median_nn_distance(shard(y, nb, rank), plan.layout, dist.group.WORLD, sample=7),
        dtr.data_scale(shard(y, nb, rank), shard(w, nb, rank), plan.layout, dist.group.WORLD),
    )
    for case, (mode, dtype, kw) in TRANSFORM_CASES.items():
        feats = transform_data(world, dtype)
        q, c, nqq, nbb = transform_split(world, feats, case)
        kw = dict(kw)
        if kw.pop("charges", False):
            kw["charges"] = shard(c, nbb, rank)
        u, info = pfd.transform(
            shard(q, nqq, rank), steps=T_STEPS, mode=mode, return_info=True, **kw
        )
        res[("transform", case)] = (u, info)
    for mode in MODES:
        res[("riesz", mode)] = _riesz_case(pfd, rank, world, mode)
    res["uniform"] = _uniform_case(pfd, rank, world)
    # an invalid argument on one rank raises on every rank (none is left waiting)
    x, y, *_ = field_data(3, world, torch.float64, "plain")
    xs = shard(x, nq, rank).clone()
    if rank == world - 1:
        xs[0, 0] = float("nan")
    try:
        pfd.poisson_field(xs, shard(y, nb, rank))
        res["invalid"] = "no error"
    except ValueError as err:
        res["invalid"] = str(err)
    # the same for the flow and the loss, whose own checks run before any collective
    for name, call in (
        ("invalid_transform", lambda a: pfd.transform(a, steps=1)),
        ("invalid_riesz", lambda a: pfd.riesz_uniformity_loss(a, 2.0)),
    ):
        try:
            call(xs)
            res[name] = "no error"
        except ValueError as err:
            res[name] = str(err)
    torch.save(res, Path(out) / f"rank{rank}.pt")
    pfd.end_process_group()


def riesz_data(world):
    nq, nb = SHARDS[world]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(nq), D, generator=g, dtype=torch.float64)
    bank = torch.randn(sum(nb), D, generator=g, dtype=torch.float64)
    return x, bank


def _riesz_case(pfd, rank, world, mode):
    nq, nb = SHARDS[world]
    x, bank = riesz_data(world)
    xs = shard(x, nq, rank).clone().requires_grad_()
    loss = pfd.riesz_uniformity_loss(xs, 3.0, bank=shard(bank, nb, rank), mode=mode)
    loss.backward()
    xs2 = shard(x, nq, rank).clone().requires_grad_()
    loss2 = pfd.riesz_uniformity_loss(xs2, 3.0, mode=mode)  # no bank
    loss2.backward()
    return loss.detach(), xs.grad, loss2.detach(), xs2.grad


def _uniform_case(pfd, rank, world):
    nq = SHARDS[world][0]
    x, _ = riesz_data(world)
    u = x / x.norm(dim=1, keepdim=True)
    xs = shard(u, nq, rank).clone().requires_grad_()
    loss = pfd.uniform_loss(xs, 2.0, chunk_size=3)
    loss.backward()
    return loss.detach(), xs.grad


# ------------------------------------------------------------------------------- the worlds


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


@pytest.fixture(scope="session")
def worlds(tmp_path_factory):
    """{R: [rank 0's results, rank 1's, ...]} for R = 2 and 3, both worlds run concurrently."""
    procs, dirs = [], {}
    t0 = time.perf_counter()
    for R in SHARDS:
        out = tmp_path_factory.mktemp(f"world{R}")
        dirs[R] = out
        port = free_port()
        for r in range(R):
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, str(r), str(R), str(port), str(out)],
                    env=_env(),
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
    bad = [(p.returncode, log) for p, log in zip(procs, logs) if p.returncode]
    assert not bad, "a worker failed:\n" + "\n".join(log[-3000:] for _, log in bad)
    print(f"worlds ran in {time.perf_counter() - t0:.1f} s")
    return {
        R: [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(R)]
        for R, d in dirs.items()
    }


# ------------------------------------------------------------------------------- tests


def test_import_poissonflow_imports_nothing_distributed(tmp_path):
    code = (
        "import sys, poissonflow, poissonflow.losses, poissonflow.metrics; "
        "bad = [m for m in sys.modules if m.startswith('poissonflow.distributed')]; "
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_uninitialised_group_names_the_fix():
    import torch.distributed as dist

    import poissonflow.distributed as pfd

    assert not dist.is_initialized()
    x = torch.randn(3, 2)
    for call in (
        lambda: pfd.poisson_field(x, x),
        lambda: pfd.transform(x),
        lambda: pfd.riesz_uniformity_loss(x, 2.0),
        lambda: pfd.uniform_loss(x),
        lambda: pfd.fit_learned_field(x),
    ):
        with pytest.raises(RuntimeError, match="init_process_group"):
            call()


def _single(R, dtype, kind):
    x, y, w, ex, gv, gl = field_data(1, R, dtype, kind)

    def fn(a, b, c, e):
        return poissonflow.poisson_field(a, b, weights=c, exclude=e)

    return field_and_grads(fn, x, y, w, ex, gv, gl)


NAMES = ("v", "log_scale", "dx", "dy", "dw")


@pytest.mark.parametrize("R", sorted(SHARDS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["full", "plain", "zero_shard", "dead"])
def test_field_and_gradients_float64(worlds, R, mode, kind):
    """Forward and gradients equal the single-process op on the gathered data to 1e-12, and
    repeat bit for bit; rows without field (kind "dead") agree exactly (v = 0, -inf)."""
    ref = _single(R, torch.float64, kind)
    nq, nb = SHARDS[R]
    for r in range(R):
        got, same = worlds[R][r][("field", str(torch.float64), kind, mode)]
        assert same, f"rank {r}: not bit-identical run to run"
        for i, name in enumerate(NAMES):
            sizes = nq if i in (0, 1, 2) else nb
            want = shard(ref[i], sizes, r)
            if want is None:
                assert got[i] is None
                continue
            if name == "log_scale":
                assert torch.equal(torch.isneginf(got[i]), torch.isneginf(want))
                fin = torch.isfinite(want)
                err = row_errors(got[i][fin], want[fin])
            else:
                err = row_errors(got[i], want)
            assert err <= F64_TOL, f"rank {r} {name}: {err:.2e}"
        if kind == "dead":
            dead = torch.isneginf(got[1])
            assert bool(dead.any()) or nq[r] == 0
            assert bool((got[0][dead] == 0).all())


@pytest.mark.parametrize("R", sorted(SHARDS))
@pytest.mark.parametrize("mode", MODES)
def test_field_and_gradients_float32(worlds, R, mode):
    """float32 against the float64 op on the same (rounded) inputs, within the conformance
    suite's float32 tolerances (poissonflow.testing)."""
    x, y, w, ex, gv, gl = field_data(1, R, torch.float32, "full")
    ref = field_and_grads(
        lambda a, b, c, e: poissonflow.poisson_field(a, b, weights=c, exclude=e),
        *(
            None if t is None else (t.double() if t.is_floating_point() else t)
            for t in (x, y, w, ex, gv, gl)
        ),
    )
    tol = tolerance(torch.float32)
    nq, nb = SHARDS[R]
    for r in range(R):
        got, same = worlds[R][r][("field", str(torch.float32), "full", mode)]
        assert same
        for i, name in enumerate(NAMES):
            want = shard(ref[i], nq if i < 3 else nb, r)
            bound = {"v": tol.v, "log_scale": tol.log_scale}.get(name, tol.grad)
            err = row_errors(got[i], want)
            print(f"float32 {mode} R={R} rank {r} {name}: {err:.2e}")
            assert err <= bound, f"rank {r} {name}: {err:.2e} > {bound}"


@pytest.mark.parametrize("R", sorted(SHARDS))
def test_auto_mode_and_subgroup(worlds, R):
    """mode="auto" picks the all-gather at small sizes (bit-identical results); a process
    group of ranks 0 and R - 1 computes the field of those two ranks' charges."""
    nq, nb = SHARDS[R]
    x, y, w, ex, gv, gl = field_data(1, R, torch.float64, "full")
    pick = [0, R - 1]
    cat = [
        torch.cat([shard(t, sz, k) for k in pick])
        for t, sz in ((x, nq), (y, nb), (gv, nq), (gl, nq))
    ]
    ref = field_and_grads(
        lambda a, b, c, e: poissonflow.poisson_field(a, b),
        cat[0],
        cat[1],
        None,
        None,
        cat[2],
        cat[3],
    )
    sq, sb = [nq[k] for k in pick], [nb[k] for k in pick]
    for part, r in enumerate(pick):
        assert worlds[R][r]["auto_equals_allgather"]
        got = worlds[R][r]["subgroup"]
        for i in range(4):
            want = shard(ref[i], sq if i < 3 else sb, part)
            assert row_errors(got[i], want) <= F64_TOL, (r, NAMES[i])
    assert all("subgroup" not in worlds[R][r] for r in range(1, R - 1))


@pytest.mark.parametrize("R", sorted(SHARDS))
def test_horizon_pieces_equal_single_process(worlds, R):
    from poissonflow import horizon

    x, y, w, *_ = field_data(2, R, torch.float64, "full")
    med = horizon.median_nn_distance(y, sample=7)
    scale = horizon.data_scale(y, w)
    centre = (w[:, None] * y).sum(0) / w.sum()
    for res in worlds[R]:
        got_med, (got_scale, got_centre) = res["horizon"]
        assert got_med == med  # the same pairs' distances, a min and a median: exact
        assert abs(got_scale - scale) <= 1e-14 * scale
        assert float((got_centre - centre).abs().max()) <= 1e-14


def _single_transform(R, case):
    mode, dtype, kw = TRANSFORM_CASES[case]
    feats = transform_data(R, dtype)
    q, c, nqq, _ = transform_split(R, feats, case)
    kw = dict(kw)
    if kw.pop("charges", False):
        kw["charges"] = c
    u, info = poissonflow.transform(q, steps=T_STEPS, return_info=True, **kw)
    return u, info, nqq


@pytest.mark.parametrize("R", sorted(SHARDS))
@pytest.mark.parametrize("case", sorted(TRANSFORM_CASES))
def test_transform_matches_single_process(worlds, R, case):
    """Rows equal poissonflow.transform on the union: float64 to 1e-10 (allgather: bit for bit,
    the same fused kernel calls), float32 (ring: unfused RK4 against the fused kernel) within the
    flow tolerance 1e-4 of poissonflow.testing."""
    u, info, nqq = _single_transform(R, case)
    dtype = TRANSFORM_CASES[case][1]
    bound = 1e-10 if dtype == torch.float64 else tolerance(torch.float32).flow
    for r in range(R):
        got, ginfo = worlds[R][r][("transform", case)]
        want = shard(u, nqq, r)
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.shape[0]:
            err = float((got.double() - want.double()).abs().max())
            print(f"transform {case} R={R} rank {r}: max abs difference {err:.2e}")
            assert err <= bound, f"rank {r}: {err:.2e}"
        if case == "allgather":
            assert torch.equal(got, want)
        for key in ("z_min", "z_max", "excluded", "steps", "solver", "start", "output"):
            a, b = ginfo[key], info[key]
            if isinstance(b, float):
                assert abs(a - b) <= 1e-14 * abs(b), key
            else:
                assert a == b, key
        assert ginfo["world_size"] == R and ginfo["mode"] == TRANSFORM_CASES[case][0]


def _riesz_single(x, bank, s):
    """The Riesz s-energy of the rows of x (and the bank), by its definition, float64 autograd."""
    u = x / x.norm(dim=1, keepdim=True)
    n = u.shape[0]
    e = (u[:, None, :] - u[None, :, :]).norm(dim=-1)
    off = ~torch.eye(n, dtype=torch.bool)
    terms = [(-s * torch.log(e[off]))]
    k = 0
    if bank is not None:
        b = bank / bank.norm(dim=1, keepdim=True)
        k = b.shape[0]
        terms.append((-s * torch.log((u[:, None, :] - b[None, :, :]).norm(dim=-1))).flatten())
    return torch.logsumexp(torch.cat(terms), 0) - math.log(n * (n - 1 + k))


@pytest.mark.parametrize("R", sorted(SHARDS))
@pytest.mark.parametrize("mode", MODES)
def test_riesz_loss_of_the_global_batch(worlds, R, mode):
    x, bank = riesz_data(R)
    nq = SHARDS[R][0]
    for with_bank, (iv, ig) in ((True, (0, 1)), (False, (2, 3))):
        xx = x.clone().requires_grad_()
        ref = _riesz_single(xx, bank if with_bank else None, 3.0)
        ref.backward()
        single = getattr(poissonflow.losses, "riesz_uniformity_loss", None)
        if single is not None:  # the package's single-process loss, where it exists
            assert (
                abs(float(single(x, 3.0, bank=bank if with_bank else None)) - float(ref.detach()))
                <= 1e-12
            )
        for r in range(R):
            res = worlds[R][r][("riesz", mode)]
            assert abs(float(res[iv]) - float(ref.detach())) <= 1e-12 * abs(float(ref.detach()))
            assert row_errors(res[ig], shard(xx.grad, nq, r)) <= F64_TOL


@pytest.mark.parametrize("R", sorted(SHARDS))
def test_uniform_loss_of_the_global_batch(worlds, R):
    from poissonflow.metrics import uniform_loss

    x, _ = riesz_data(R)
    u = (x / x.norm(dim=1, keepdim=True)).requires_grad_()
    ref = uniform_loss(u, 2.0)
    ref.backward()
    for r in range(R):
        val, grad = worlds[R][r]["uniform"]
        assert abs(float(val) - float(ref.detach())) <= 1e-12 * abs(float(ref.detach()))
        assert row_errors(grad, shard(u.grad, SHARDS[R][0], r)) <= F64_TOL


@pytest.mark.parametrize("R", sorted(SHARDS))
def test_invalid_argument_on_one_rank_raises_on_all(worlds, R):
    for key in ("invalid", "invalid_transform", "invalid_riesz"):
        for r in range(R):
            msg = worlds[R][r][key]
            assert "NaN" in msg, (key, msg)
            if r != R - 1:
                assert f"rank {R - 1}" in msg, (key, msg)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
