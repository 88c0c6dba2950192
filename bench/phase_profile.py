"""Where a CPU kernel's time goes, loop by loop: `perf` samples of one call mapped onto the
innermost loops of the kernels' object file (bench/asm_mix.py finds and counts them).

    python bench/phase_profile.py                    # forward and backward, N = B = 8192, D = 129
    python bench/phase_profile.py --D 33 --calls 8

A development aid for docs/performance.md ("Where the time goes"), not part of the package: it
needs Linux `perf` (sampling by the cpu-clock timer, so it runs in a virtual machine without
hardware counters) and the build tree's object files (pip install -e .). It runs one thread, so
that every sample belongs to the loop being timed, and prints for the forward and the backward
(dx and dy) each hot loop's function, address range and vector instruction mix, its share of
the call's samples and the milliseconds that share is of the call's CPU time measured without
the profiler. Set those milliseconds against `bench/ceiling.py` (the same phase's model, and
the same loop alone from L1) to see how much of a phase's distance from its ceiling the loop
itself costs and how much the caches and the tiles' set-up around it.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import asm_mix  # noqa: E402
import machine  # noqa: E402

KEYS = ("fma", "add", "mul", "max", "div", "load", "store")

WORKLOAD = """
import sys, time, torch, poissonflow
torch.set_num_threads(1)
kind, N, D, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
x = torch.randn(N, D, generator=g).requires_grad_(kind == "backward")
y = torch.randn(N, D, generator=g).requires_grad_(kind == "backward")
def call():
    v, ls = poissonflow.poisson_field(x, y, backend="cpu")
    if kind == "backward":
        (v.sum() + ls.sum()).backward()
call()
ts = []
for _ in range(calls):
    c = time.process_time(); call(); ts.append(time.process_time() - c)
print(min(ts))
"""


def symbols(path: str, dynamic: bool) -> dict:
    out = subprocess.run(
        ["nm", "-C"] + (["-D"] if dynamic else []) + [path], capture_output=True, text=True
    ).stdout
    found = {}
    for ln in out.splitlines():
        parts = ln.split(" ", 2)
        if len(parts) == 3 and parts[0] and parts[1] in ("t", "T"):
            found[parts[2]] = int(parts[0], 16)
    return found


def functions(lines: list[str], isa: str):
    """(short name, instructions) of every function of one ISA's copy in a disassembly."""
    ns = f"isa_{isa}::"
    name, body = None, []
    for ln in lines + ["0 <end>:"]:
        if ln.endswith(">:") and re.match(r"^[0-9a-f]+ <", ln):
            if name and body:
                yield name, body
            full = ln[ln.index("<") + 1 : -2]
            name = short_name(full) if ns in full else None
            body = []
            continue
        if name:
            m = asm_mix.LINE.match(ln)
            if m:
                body.append((int(m.group(1), 16), m.group(2), m.group(3)))


def short_name(full: str) -> str:
    """'field_tile<float, true>' out of the demangled signature."""
    s = full.split("::")[-1] if "(" not in full else full[: full.index("(")].split("::")[-1]
    return s[:40]


def samples(script: str, args: list[str], data: str) -> collections.Counter:
    """Offsets into the extension of every sample that fell in it."""
    import poissonflow._C as C

    so = os.path.realpath(C.__file__)
    subprocess.run(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-o", data, sys.executable]
        + [script]
        + args,
        check=True,
        capture_output=True,
    )
    lines = subprocess.run(
        ["perf", "script", "-i", data, "-F", "ip,dso", "--show-mmap-events"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    base, offs = None, collections.Counter()
    name = os.path.basename(so)
    for ln in lines:
        if "PERF_RECORD_MMAP" in ln:
            if name in ln and "r-xp" in ln:
                m = re.search(r"\[(0x[0-9a-f]+)\((0x[0-9a-f]+)\) @ (0x[0-9a-f]+|0)", ln)
                base = int(m.group(1), 16) - int(m.group(3), 16)
            continue
        if ln.strip() and name in ln and base is not None:
            offs[int(ln.split()[0], 16) - base] += 1
    return offs


def profile(kind: str, N: int, D: int, calls: int, isa: str) -> list[str]:
    import poissonflow._C as C

    so = os.path.realpath(C.__file__)
    obj = asm_mix.object_file(isa)
    key = f"poissonflow::isa_{isa}::field_forward(poissonflow::FieldArgs const&)"
    delta = symbols(so, True)[key] - symbols(obj, False)[key]
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "workload.py")
        with open(script, "w") as f:
            f.write(WORKLOAD)
        seconds = float(
            subprocess.run(
                [sys.executable, script, kind, str(N), str(D), str(calls)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[-1]
        )
        offs = samples(script, [kind, str(N), str(D), str(calls)], os.path.join(tmp, "d"))
    in_ext = sum(offs.values())
    rows = []
    covered = 0
    for fn, body in functions(asm_mix.disassemble(obj), isa):
        lo_f, hi_f = body[0][0] + delta, body[-1][0] + delta
        in_fn = sum(n for a, n in offs.items() if lo_f <= a <= hi_f)
        if in_fn < 0.01 * in_ext:
            continue
        in_loops = 0
        for lo, hi in sorted(asm_mix.innermost(asm_mix.loops(body))):
            n = sum(c for a, c in offs.items() if lo + delta <= a <= hi + delta)
            if n < 0.01 * in_ext:
                continue
            in_loops += n
            m = asm_mix.mix(body, lo, hi)
            rows.append((fn, f"{lo:x}-{hi:x}", " ".join(f"{k} {m.get(k, 0)}" for k in KEYS), n))
        rows.append((fn, "rest of the function", "", in_fn - in_loops))
        covered += in_fn
    rows.append(("(other code of the extension)", "", "", in_ext - covered))
    what = "forward" if kind == "forward" else "forward + backward (dx, dy)"
    out = [
        f"{what}, N = B = {N}, D = {D}, float32, one thread, {isa}: {seconds * 1e3:.1f} ms "
        f"CPU per call (best of {calls}, without the profiler); {in_ext} samples in the extension"
    ]
    for fn, where, m, n in rows:
        share = n / in_ext if in_ext else 0.0
        out.append(f"  {share:6.1%} {share * seconds * 1e3:8.1f} ms  {fn:30} {where:22} {m}")
    return out


def main(argv=None):
    import poissonflow._C as C

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--D", type=int, action="append", help="repeatable; default 129")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--isa", default=C.chosen_isa())
    ap.add_argument("--txt", help="also write the report to this file")
    args = ap.parse_args(argv)
    if not shutil.which("perf"):
        raise SystemExit("phase_profile.py needs Linux perf")
    lines = ["# " + machine.cpu_line(machine.machine_record(1))]
    for D in args.D or [129]:
        for kind in ("forward", "backward"):
            lines += profile(kind, args.N, D, args.calls, args.isa)
    print("\n".join(lines))
    if args.txt:
        with open(args.txt, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
