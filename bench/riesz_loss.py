"""Forward + backward time and peak memory of `losses.riesz_uniformity_loss` against a memory
bank, compared in the same run with pure-PyTorch implementations of the same loss and with
`metrics.uniform_loss` through autograd.

    python bench/riesz_loss.py                     # N = 256, banks 1k-64k, + N = 4096 x 64k
    python bench/riesz_loss.py --json out.json     # also write every figure and setting
    python bench/riesz_loss.py --quick             # banks 1k and 4k only, no large row
    python bench/riesz_loss.py --threads 1         # one thread per cell (a loaded machine)

Implementations (all take raw features x (N, D) and a bank (K, D), float32, and L2-normalise
both; the first four compute log mean_{i, j != i} ||u_i - u_j||^(-s) over the batch and bank):

* poissonflow: `losses.riesz_uniformity_loss` (the field kernel; O((N + K) D) memory).
* torch dense: the best plain-autograd version, in the log domain: r2 = 2 - 2 u.c from one
  addmm per block (unit rows), clamped at float32's tiny, -(s/2) log r2, the diagonal masked,
  logsumexp. It holds several N x (N + K) matrices. The Gram expansion is what torch.cdist
  does at these sizes too; it is inaccurate for near-coincident points (docs/DESIGN.md).
* torch chunked: the same per block of `--chunk` bank columns under
  torch.utils.checkpoint, so only one N x chunk block lives at a time (recomputed in the
  backward): the memory-saving trick available in plain PyTorch, paid for in time.
* torch direct: torch.cdist with compute_mode="donot_use_mm_for_euclid_dist" (direct
  differences, the accurate form), log domain, dense.
* uniform_loss: `metrics.uniform_loss(cat(u, bank))` (Wang & Isola's Gaussian potential, t =
  2). It has no bank argument, so it also sums the K^2 bank-bank pairs: O((N + K)^2 D).

Method. Each (implementation, N, K) cell runs in a fresh child process: inputs are built,
the extension is loaded on a tiny problem, ru_maxrss (peak resident memory) is read, then
`--repeats` forward + backward passes run and ru_maxrss is read again; "peak MB" is the
difference (what the computation added over its inputs). The whole sweep runs `--rounds`
times and a cell's time is its minimum over all rounds and repeats (this machine's 2 cores
are shared: the minimum is the least disturbed figure, and rounds minutes apart give every
cell several chances at a quiet spell). On a machine that other processes load, use
`--threads 1`: with two threads each parallel region waits for a descheduled thread, which
inflated 3 ms calls to 150 ms in our runs; one thread per cell compares the implementations
core for core. The value
and the gradient are compared with a float64 evaluation (for the Riesz implementations the
float64 poissonflow loss, which tests/test_riesz.py checks against explicit pairwise distances
to 1e-10; for uniform_loss its own float64 evaluation). A cell whose dense N x (N + K) memory,
extrapolated from the implementation's largest measured cell, exceeds `--budget-gb`, or whose
extrapolated time exceeds `--max-seconds`, is not run: its row says what it would need.

Ceiling. The poissonflow rows also give their fraction of this machine's ceiling
(bench/ceiling.py, measured at the start of the run on the cells' thread count): the loss makes
two field calls, the batch against itself (N x N) and against the bank (N x K), each at power s
in D dimensions, and their backward for dL/dx alone (the charges take no gradient and the field
v none); the ceiling is the time those four kernel passes would take with every vector pipe
busy. At N = 256 the kernels' share of a step is small (normalisation, the logsumexp, autograd):
the fraction says how much of the step the kernels' best case is, not how well they run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceiling  # noqa: E402
import machine  # noqa: E402

IMPLS = ["poissonflow", "torch dense", "torch chunked", "torch direct", "uniform_loss"]
# Implementations whose memory grows like N (N + K): the ones the budget guards.
DENSE = {"torch dense", "torch direct"}


# ----------------------------------------------------------------------------- the losses


def _tiny(dtype):
    return torch.finfo(dtype).tiny


def _block_logsumexp(u, c, s, diagonal):
    """log sum_{i, j} r_ij^(-s) for unit rows u (N, D) against c (M, D), by the Gram expansion,
    the diagonal (i == j) left out when `diagonal` (c is u)."""
    r2 = torch.addmm(torch.full((), 2.0, dtype=u.dtype), u, c.T, alpha=-2.0)
    logits = torch.log(r2.clamp_min(_tiny(u.dtype))) * (-0.5 * s)
    if diagonal:
        eye = torch.eye(u.shape[0], dtype=torch.bool)
        logits = logits.masked_fill(eye, -math.inf)
    return torch.logsumexp(logits.flatten(), 0)


def torch_dense(x, bank, s, chunk):
    u, b = F.normalize(x, dim=1), F.normalize(bank, dim=1)
    n, k = u.shape[0], b.shape[0]
    total = torch.logaddexp(_block_logsumexp(u, u, s, True), _block_logsumexp(u, b, s, False))
    return total - math.log(n * (n - 1 + k))


def torch_chunked(x, bank, s, chunk):
    from torch.utils.checkpoint import checkpoint

    u, b = F.normalize(x, dim=1), F.normalize(bank, dim=1)
    n, k = u.shape[0], b.shape[0]
    parts = [checkpoint(_block_logsumexp, u, u, s, True, use_reentrant=False)]
    for j0 in range(0, k, chunk):
        cj = b[j0 : j0 + chunk]
        parts.append(checkpoint(_block_logsumexp, u, cj, s, False, use_reentrant=False))
    return torch.logsumexp(torch.stack(parts), 0) - math.log(n * (n - 1 + k))


def torch_direct(x, bank, s, chunk):
    u, b = F.normalize(x, dim=1), F.normalize(bank, dim=1)
    n, k = u.shape[0], b.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    # the zero self-distances are replaced before the log (their log's gradient would be 0/0)
    d_uu = torch.cdist(u, u, compute_mode="donot_use_mm_for_euclid_dist").masked_fill(eye, 1.0)
    l_uu = (torch.log(d_uu) * (-s)).masked_fill(eye, -math.inf)
    d_ub = torch.cdist(u, b, compute_mode="donot_use_mm_for_euclid_dist")
    l_ub = torch.log(d_ub.clamp_min(math.sqrt(_tiny(u.dtype)))) * (-s)
    total = torch.logaddexp(torch.logsumexp(l_uu.flatten(), 0), torch.logsumexp(l_ub.flatten(), 0))
    return total - math.log(n * (n - 1 + k))


def poissonflow_loss(x, bank, s, chunk):
    from poissonflow import losses

    return losses.riesz_uniformity_loss(x, s, bank=bank)


def uniform(x, bank, s, chunk):
    from poissonflow import metrics

    return metrics.uniform_loss(torch.cat([F.normalize(x, dim=1), F.normalize(bank, dim=1)]), 2.0)


FUNCS = {
    "poissonflow": poissonflow_loss,
    "torch dense": torch_dense,
    "torch chunked": torch_chunked,
    "torch direct": torch_direct,
    "uniform_loss": uniform,
}


def work(impl, n, k):
    """What the time grows with: pairs N (N + K), or (N + K)^2 for uniform_loss."""
    return (n + k) ** 2 if impl == "uniform_loss" else n * (n + k)


# ----------------------------------------------------------------------------- one cell


def inputs(n, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    bank = F.normalize(torch.randn(k, d, generator=g), dim=1)  # a bank holds unit features
    return x, bank


def run_cell(impl, n, k, d, s, repeats, chunk, seed, errors):
    fn = FUNCS[impl]
    x, bank = inputs(n, k, d, seed)
    xs = x[:8].clone().requires_grad_()
    fn(xs, bank[:16], s, chunk).backward()  # load the extension, warm up allocators
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd, total = [], []
    for _ in range(repeats):
        xt = x.clone().requires_grad_()
        t0 = time.perf_counter()
        loss = fn(xt, bank, s, chunk)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        total.append(t2 - t0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "impl": impl,
        "N": n,
        "K": k,
        "D": d,
        "s": s,
        "seconds": min(total),
        "forward_seconds": min(fwd),
        "all_seconds": total,
        "peak_mb": (after - before) / 1024.0,  # ru_maxrss is in KiB on Linux
        "value": float(loss.detach()),
        "finite_grad": bool(torch.isfinite(xt.grad).all()),
    }
    if errors:
        x64 = x.double().requires_grad_()
        if impl == "uniform_loss":
            ref = uniform(x64, bank.double(), s, chunk)
        else:
            ref = poissonflow_loss(x64, bank.double(), s, chunk)
        ref.backward()
        g64 = x64.grad
        out["value_rel_err"] = abs(out["value"] - float(ref.detach())) / abs(float(ref.detach()))
        out["grad_rel_err"] = float((xt.grad.double() - g64).abs().max() / g64.abs().max())
    return out


def child(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    res = run_cell(
        args.impl,
        args.n,
        args.k,
        args.dim,
        args.s,
        args.repeats,
        args.chunk,
        args.seed,
        not args.no_errors,
    )
    print(json.dumps(res))


def spawn(impl, n, k, args, repeats, errors):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--impl",
        impl,
        "--n",
        str(n),
        "--k",
        str(k),
        "--dim",
        str(args.dim),
        "--s",
        str(args.s),
        "--repeats",
        str(repeats),
        "--chunk",
        str(args.chunk),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    if not errors:
        cmd.append("--no-errors")
    env = dict(os.environ)
    if args.threads:  # torch's pool and the extension's OpenMP pool alike
        env["OMP_NUM_THREADS"] = str(args.threads)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"impl": impl, "N": n, "K": k, "error": p.stderr.strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def estimate(impl, n, k, measured):
    """Time and (for dense implementations) memory of a cell, extrapolated linearly in the
    work from the implementation's largest measured cell; None when nothing was measured."""
    done = [r for r in measured if r["impl"] == impl and "seconds" in r]
    if not done:
        return None
    last = max(done, key=lambda r: work(impl, r["N"], r["K"]))
    scale = work(impl, n, k) / work(impl, last["N"], last["K"])
    mem = last["peak_mb"] * scale if impl in DENSE else None
    return {
        "seconds": last["seconds"] * scale,
        "peak_mb": mem,
        "from": f"N={last['N']}, K={last['K']}",
    }


def run_all(args, ceil=None):
    """Every cell, `--rounds` times over: a cell's time is its minimum over all rounds and
    repeats, so that each figure had several chances, minutes apart, at a quiet machine (the
    cores are shared, and a busy spell inflates every repeat of a cell run back to back). The
    skip decisions are made in the first round; peak memory is the largest over the rounds."""
    configs = [(args.n, k, args.repeats, True) for k in args.banks]
    if args.large:
        configs.append((args.large_n, args.large_k, 1, False))
    rows = {}
    for rnd in range(args.rounds):
        for n, k, repeats, errors in configs:
            for impl in args.impls:
                key = (impl, n, k)
                if rnd > 0 and (key not in rows or "seconds" not in rows[key]):
                    continue  # skipped or failed in the first round
                if rnd > 0 and rows[key]["seconds"] > args.long_seconds:
                    continue  # a long cell is measured once: busy spells matter less there
                if rnd == 0:
                    reason = skip_reason(impl, n, k, list(rows.values()), args)
                    if reason:
                        rows[key] = reason
                        continue
                est = estimate(impl, n, k, list(rows.values())) if rnd == 0 else None
                reps = 1 if est and est["seconds"] > args.long_seconds else repeats
                res = spawn(impl, n, k, args, reps, errors and rnd == 0)
                if key in rows and "seconds" in res:
                    res = merge(rows[key], res)
                rows[key] = res
                took = f"{res['seconds']:.3f} s" if "seconds" in res else "failed"
                print(f"  round {rnd + 1}/{args.rounds}: {impl}, N={n}, K={k}: {took}", flush=True)
    out = list(rows.values())
    for r in out:
        if ceil is not None and r["impl"] == "poissonflow" and "seconds" in r:
            r["ceiling_seconds"] = ceil.riesz_seconds(r["N"], (r["N"], r["K"]), args.dim, args.s)
            r["of_ceiling"] = r["ceiling_seconds"] / r["seconds"]
    for r in out:
        print(format_row(r, out))
    return out


def skip_reason(impl, n, k, measured, args):
    est = estimate(impl, n, k, measured)
    reason = None
    if est and est["peak_mb"] is not None and est["peak_mb"] > args.budget_gb * 1024:
        reason = (
            f"would need ~{est['peak_mb'] / 1024:.1f} GB (budget "
            f"{args.budget_gb:g} GB; extrapolated from {est['from']})"
        )
    elif est and est["seconds"] > args.max_seconds:
        reason = (
            f"would take ~{est['seconds']:.0f} s per forward + backward (limit "
            f"{args.max_seconds:g} s; extrapolated from {est['from']})"
        )
    if reason is None:
        return None
    return {
        "impl": impl,
        "N": n,
        "K": k,
        "skipped": reason,
        "estimate_seconds": est["seconds"],
        "estimate_peak_mb": est["peak_mb"],
    }


def merge(old, new):
    out = dict(old)
    out["seconds"] = min(old["seconds"], new["seconds"])
    out["forward_seconds"] = min(old["forward_seconds"], new["forward_seconds"])
    out["all_seconds"] = old["all_seconds"] + new["all_seconds"]
    out["peak_mb"] = max(old["peak_mb"], new["peak_mb"])
    out["finite_grad"] = old["finite_grad"] and new["finite_grad"]
    return out


def format_row(r, rows):
    head = f"N={r['N']:>5} K={r['K']:>6} {r['impl']:<14}"
    if "skipped" in r:
        return f"{head} not run: {r['skipped']}"
    if "error" in r:
        return f"{head} failed: {r['error']}"
    base = next(
        (
            b
            for b in rows
            if b["impl"] == "poissonflow"
            and b["N"] == r["N"]
            and b["K"] == r["K"]
            and "seconds" in b
        ),
        None,
    )
    ratio = ""
    if base and r["impl"] != "poissonflow":
        ratio = (
            f"  time x{r['seconds'] / base['seconds']:6.2f}"
            f"  mem x{r['peak_mb'] / max(base['peak_mb'], 1e-9):7.1f}"
        )
    if "of_ceiling" in r:
        ratio = f"  {r['of_ceiling']:.3f} of the ceiling ({1e3 * r['ceiling_seconds']:.1f} ms)"
    err = ""
    if "value_rel_err" in r:
        err = f"  err value {r['value_rel_err']:.1e} grad {r['grad_rel_err']:.1e}"
    return (
        f"{head} fwd+bwd {r['seconds']:8.3f} s (fwd {r['forward_seconds']:.3f})"
        f"  peak +{r['peak_mb']:8.1f} MB{ratio}{err}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--banks", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--s", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3, help="forward + backward passes per cell")
    ap.add_argument("--rounds", type=int, default=3, help="passes over all cells (see run_all)")
    ap.add_argument("--chunk", type=int, default=4096, help="bank columns per checkpointed block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads per cell (0: torch's default); 1 avoids thread-barrier "
        "stalls when other processes load the cores",
    )
    ap.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    ap.add_argument("--budget-gb", type=float, default=3.0)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument(
        "--long-seconds",
        type=float,
        default=10.0,
        help="cells estimated longer than this run once, with one repeat",
    )
    ap.add_argument(
        "--large",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the row N = --large-n, K = --large-k (one repeat, no errors)",
    )
    ap.add_argument("--large-n", type=int, default=4096)
    ap.add_argument("--large-k", type=int, default=65536)
    ap.add_argument("--quick", action="store_true", help="banks 1024 and 4096, no large row")
    ap.add_argument("--json", help="write the rows and the settings to this file")
    # one cell, in a child process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-errors", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.banks, args.large, args.rounds = [1024, 4096], False, 1
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()
    t0 = time.time()
    threads = args.threads or torch.get_num_threads()
    rec = machine.machine_record(threads)
    ceil = ceiling.measure(threads)
    print(
        f"riesz_uniformity_loss benchmark, D = {args.dim}, s = {args.s:g}, float32, "
        f"{threads} threads, load average {load0[0]:.1f}\n# {machine.cpu_line(rec)}",
        flush=True,
    )
    rows = run_all(args, ceil)
    meta = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "started_utc": started.isoformat(timespec="seconds"),
        "wall_seconds": time.time() - t0,
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "machine": rec,
        "ceiling_rates": ceil.rates,
        "cpus": os.cpu_count(),
        "load_average_start": load0,
        "load_average_end": os.getloadavg(),
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k not in ("child", "impl", "k", "no_errors", "json")
        },
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(
        f"done in {meta['wall_seconds']:.0f} s; load average at the end "
        f"{meta['load_average_end'][0]:.1f}"
    )


if __name__ == "__main__":
    main()
