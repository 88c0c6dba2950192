"""Time and peak memory per training step of `losses.RieszLoss` over a gloo process group,
against gathering the banks and using the single-process loss.

    python bench/riesz_module_distributed.py                  # 2 ranks, K = 65536/rank, D = 128
    python bench/riesz_module_distributed.py --batch 256 --repeats 3 --out docs/bench

Two ways to compute the same global loss (the global batch against the union of every rank's
bank, float32, s = 2), one step = forward + backward, the banks fixed:

* module: `RieszLoss(s, bank_size=K, gather_distributed=True)` (mode "ring"): each rank scores
  its own rows against the global batch and against every bank shard as it travels around the
  ring; no rank holds the gathered banks.
* gather: `torch.distributed.nn.all_gather` of the batches (differentiable) and a plain
  all_gather of the banks, then `losses.riesz_uniformity_loss` on the gathered batch and banks
  on every rank (each rank computes the whole global loss; the all_gather's backward sums the
  ranks' gradients, R times the global loss's gradient: a timing baseline, not a recipe).

Method: each way runs in its own world of fresh processes (one thread per rank, so the two
ranks take one core each), so that one way's peak memory cannot hide the other's. Blocks of
64 KiB and more are mmapped (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the resident set.
After the inputs are built (the bank filled) the peak resident size is reset to the current
one (/proc/self/clear_refs) and that is the baseline; one warm-up step runs, then `--repeats`
timed steps, the peak reset once more after the warm-up (whose peak also holds one-time
set-ups: gloo's buffers, autograd's; reported apart in the JSON); "peak MB" is the largest
growth of the peak resident size (VmHWM) over the ranks during the timed steps: what a step
adds over the inputs (gathered banks, copies, the kernels' buffers). "time" is
the minimum over the
repeats of the slowest rank's step (this machine's cores are shared; the minimum is the least
disturbed figure; the two ways' worlds alternate, `--rounds` times each, so that both meet
the same spells of load). Both ways' loss values are printed: they must agree to float32 rounding.

Ceiling: each way's step beside its fraction of this machine's ceiling for the kernel work a
rank does (bench/ceiling.py, Ceiling.riesz_seconds, one thread): with R ranks, b batch rows and
K bank rows per rank, the module's rank runs its b rows against the global batch (R b) and the
R bank shards (R K); the gather way's rank computes the whole loss, R b rows against R b and
R K. The rest of a step (the ring's transfers, the gathers, autograd) is outside the ceiling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceiling  # noqa: E402
import machine  # noqa: E402


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(rank: int, world: int, port: int, way: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # the autograd all_gather's notice
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnn

    from poissonflow import losses as L
    from poissonflow.distributed import end_process_group

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    g = torch.Generator().manual_seed(1000 + rank)
    d, n, k = args.dim, args.batch, args.bank
    bank = torch.randn(k, d, generator=g)
    x0 = torch.randn(n, d, generator=g)
    # the extension and allocator warmed on a tiny problem before the baseline
    L.riesz_uniformity_loss(torch.randn(4, d), 2.0, bank=torch.randn(4, d))
    mod = None
    if way == "module":
        mod = L.RieszLoss(s=args.s, bank_size=k, gather_distributed=True, mode="ring")
        fb = L.FeatureBank(k, d)
        fb.push(bank)
        mod.load_state_dict({"_extra_state": {"bank": fb.state_dict()}})  # the bank, filled
        del bank, fb
    dist.barrier()
    exact_peak = _reset_peak()  # the setup's transient copies must not count as the step's
    base = _status_mb("VmRSS")
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def step():
        x = x0.clone().requires_grad_()
        if way == "module":
            loss = mod(x, update_bank=False)
        else:
            xs = torch.cat(dnn.all_gather(x))
            parts = [torch.empty_like(bank) for _ in range(world)]
            dist.all_gather(parts, bank)
            loss = L.riesz_uniformity_loss(xs, args.s, bank=torch.cat(parts))
        loss.backward()
        return float(loss.detach())

    times, value, first = [], None, 0.0
    for i in range(args.repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        value = step()
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
        elif exact_peak:  # the warm-up step's peak holds one-time set-ups (gloo, autograd)
            first = _status_mb("VmHWM") - base
            _reset_peak()
            base = _status_mb("VmRSS")
    if exact_peak:
        peak = _status_mb("VmHWM") - base
    else:  # the growth of the lifetime peak: a lower bound
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base_max
    res = {
        "rank": rank,
        "times": times,
        "peak_mb": peak,
        "first_step_peak_mb": first,
        "loss": value,
        "exact_peak": exact_peak,
    }
    Path(out, f"{way}_rank{rank}.json").write_text(json.dumps(res))
    end_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_way(way: str, args: argparse.Namespace, tmp: Path) -> dict:
    # large blocks are mmapped and handed back to the system when freed, so the resident size
    # is what is live and its peak (VmHWM, reset after the setup) what a step adds
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(r), str(port), way, str(tmp)]
            + _forward_args(args),
            env=env,
        )
        for r in range(args.world)
    ]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a {way} worker failed (exit {p.returncode})")
    ranks = [json.loads(Path(tmp, f"{way}_rank{r}.json").read_text()) for r in range(args.world)]
    per_step = [max(r["times"][i] for r in ranks) for i in range(args.repeats)]
    return {
        "time_s": min(per_step),
        "times_s": per_step,
        "peak_mb": max(r["peak_mb"] for r in ranks),
        "peak_mb_by_rank": [r["peak_mb"] for r in ranks],
        "first_step_peak_mb": max(r["first_step_peak_mb"] for r in ranks),
        "loss": ranks[0]["loss"],
    }


def _forward_args(args: argparse.Namespace) -> list[str]:
    return [
        "--world",
        str(args.world),
        "--bank",
        str(args.bank),
        "--batch",
        str(args.batch),
        "--dim",
        str(args.dim),
        "--s",
        str(args.s),
        "--repeats",
        str(args.repeats),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--bank", type=int, default=65536, help="bank rows per rank")
    p.add_argument("--batch", type=int, default=256, help="batch rows per rank")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--s", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per world")
    p.add_argument("--rounds", type=int, default=3, help="worlds per way, alternating")
    p.add_argument("--out", default=None, help="folder for riesz_module_distributed.{txt,json}")
    p.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        rank, port, way, out = args.worker
        worker(int(rank), args.world, int(port), way, args, out)
        return
    import tempfile

    runs: dict[str, list[dict]] = {"module": [], "gather": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):  # the ways alternate, so both meet the same spells of load
            for way in runs:
                runs[way].append(run_way(way, args, Path(tmp)))
    results = {}
    for way, rs in runs.items():
        best = min(rs, key=lambda r: r["time_s"])
        every = sorted(t for r in rs for t in r["times_s"])
        results[way] = dict(
            best,
            peak_mb=max(r["peak_mb"] for r in rs),
            times_s=every,
            median_s=every[len(every) // 2],
        )
    m, g = results["module"], results["gather"]
    ceil = ceiling.measure(threads=1)
    R, b, K = args.world, args.batch, args.bank
    m["ceiling_s"] = ceil.riesz_seconds(b, (R * b, R * K), args.dim, args.s)
    g["ceiling_s"] = ceil.riesz_seconds(R * b, (R * b, R * K), args.dim, args.s)
    rec = machine.machine_record(1)
    lines = [
        f"# {machine.cpu_line(rec)}",
        f"RieszLoss over {args.world} gloo processes (1 thread each), bank {args.bank} rows per "
        f"rank, batch {args.batch} rows per rank, D = {args.dim}, float32, s = {args.s}; "
        f"one step = forward + backward, min over {args.rounds} x {args.repeats} steps of the "
        f"slowest rank; peak = largest growth of the peak resident size (VmHWM) in the timed "
        f"steps over ranks and rounds",
        f"{'way':<40} {'min s/step':>11} {'median s':>9} {'peak MB (max rank)':>19} {'loss':>10}"
        f" {'ceiling s':>10} {'of it':>6}",
        f"{'module (ring, banks never gathered)':<40} {m['time_s']:>11.2f} "
        f"{m['median_s']:>9.2f} {m['peak_mb']:>19.1f} {m['loss']:>10.6f}"
        f" {m['ceiling_s']:>10.3f} {m['ceiling_s'] / m['time_s']:>6.2f}",
        f"{'gather banks + single-process loss':<40} {g['time_s']:>11.2f} "
        f"{g['median_s']:>9.2f} {g['peak_mb']:>19.1f} {g['loss']:>10.6f}"
        f" {g['ceiling_s']:>10.3f} {g['ceiling_s'] / g['time_s']:>6.2f}",
        f"ratio gather/module: time {g['time_s'] / m['time_s']:.2f}x (min), "
        f"{g['median_s'] / m['median_s']:.2f}x (median); peak memory "
        f"{g['peak_mb'] / max(m['peak_mb'], 1e-9):.2f}x",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": rec,
            "ceiling_rates": ceil.rates,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_avg": os.getloadavg(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
            "runs": runs,
            "results": results,
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "riesz_module_distributed.txt").write_text(text + "\n")
        Path(args.out, "riesz_module_distributed.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
