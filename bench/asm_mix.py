"""The instruction mix of the CPU kernels' inner loops, counted from the built extension.

    python bench/asm_mix.py                       # field_tile<float, true> etc. of the avx512 copy
    python bench/asm_mix.py --isa avx2 --function 'backward_item<float>'

Disassembles the kernels' object file of that copy (`objdump -d -C`; the installed extension is
stripped, and the object files under build/ are what was linked into it), takes one function of the
chosen instruction-set
copy, finds its loops (a branch back to an earlier address inside the function) and, for every
innermost loop, counts the vector instructions by the pipe class they use: FMA, add/sub, mul,
max/min/compare, div, sqrt, permutes, vector loads (including memory operands and broadcasts)
and stores. docs/performance.md reads the kernels' per-pair, per-dimension mix off these
counts; bench/ceiling.py turns the mix into a ceiling.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess

CLASSES = (
    ("fma", re.compile(r"^v(p)?f(n)?m(add|sub)(sub|add)?\d{3}[ps][sd]")),
    ("div", re.compile(r"^vdiv[ps][sd]|^vrcp")),
    ("sqrt", re.compile(r"^vsqrt[ps][sd]|^vrsqrt")),
    ("mul", re.compile(r"^vmul[ps][sd]")),
    ("add", re.compile(r"^v(add|sub)[ps][sd]")),
    ("max", re.compile(r"^v(max|min)[ps][sd]|^vcmp[ps][sd]|^vblendm|^vpcmp|^vpblendm")),
    ("cvt", re.compile(r"^vcvt|^vround|^vrndscale|^vgetexp|^vscalef")),
    (
        "int",
        re.compile(r"^vp(add|sub|and|or|xor|sll|srl|sra|mul|max|min)|^vpternlog|^vand|^vor|^vxor"),
    ),
    ("perm", re.compile(r"^v(perm|shuf|unpck|pshuf|insert|extract|valign|palign|pblend|blend)")),
    ("bcast", re.compile(r"^v(p)?broadcast")),
    ("mov", re.compile(r"^v(mov|pmov)")),
)

LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
BRANCH = re.compile(r"^j[a-z]+$")


def disassemble(path: str) -> list[str]:
    objdump = shutil.which("objdump")
    if not objdump:
        raise SystemExit("objdump not found")
    out = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.splitlines()


def function_bodies(lines: list[str], isa: str, pattern: re.Pattern) -> list[list]:
    """The bodies of every function of the ISA's copy whose demangled name `pattern` finds."""
    ns = f"isa_{isa}::"
    bodies, body = [], None
    for ln in lines:
        if ln.endswith(">:") and re.match(r"^[0-9a-f]+ <", ln):
            body = [] if ns in ln and pattern.search(ln) else None
            if body is not None:
                bodies.append(body)
            continue
        m = LINE.match(ln) if body is not None else None
        if m:
            body.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return [b for b in bodies if b]


def function_body(lines: list[str], isa: str, function: str) -> list[tuple[int, str, str]]:
    """Instructions of the first function whose demangled name contains both the ISA's namespace
    and `function` (e.g. 'field_tile<float, true>')."""
    bodies = function_bodies(lines, isa, re.compile(re.escape(function)))
    return bodies[0] if bodies else []


def classify(mn: str, ops: str) -> list[str]:
    """Pipe classes of one instruction, plus 'load' for a memory source and 'store' for a
    memory destination (AT&T syntax: the destination is the last operand)."""
    out = []
    if mn.startswith("v") or mn.startswith("kmov") or mn.startswith("k"):
        for name, pat in CLASSES:
            if pat.match(mn):
                out.append(name)
                break
        else:
            out.append("other_vec" if mn.startswith("v") else "mask")
    else:
        out.append("scalar")
    if "(" in ops and mn.startswith("v"):
        parts = [p.strip() for p in re.split(r",(?![^(]*\))", ops)]
        if "(" in parts[-1] and (mn.startswith("vmov") or mn.startswith("vextract")):
            out.append("store")
        elif any("(" in p for p in parts):
            out.append("load")
    return out


def loops(body):
    """(start, end) address ranges of the loops: a branch whose target lies before it."""
    found = []
    for addr, mn, ops in body:
        if BRANCH.match(mn):
            m = re.match(r"([0-9a-f]+)", ops)
            if m:
                tgt = int(m.group(1), 16)
                if tgt <= addr and tgt >= body[0][0]:
                    found.append((tgt, addr))
    return found


def innermost(found):
    return [
        lp for lp in found if not any(o != lp and o[0] >= lp[0] and o[1] <= lp[1] for o in found)
    ]


def mix(body, lo, hi) -> dict:
    counts: dict = {}
    for addr, mn, ops in body:
        if lo <= addr <= hi:
            for c in classify(mn, ops):
                counts[c] = counts.get(c, 0) + 1
    return counts


# The micro-benchmark's copies of the kernels' inner loops (csrc/cpu/pipe_bench.cpp, the loop_*
# operations) and the kernel functions that hold the loops they stand for: {T} the precision,
# {embed} phase A's broadcast form (true: each coordinate a broadcast operand).
BENCH_LOOPS = {
    "loop_A": (r"distance_calls<{T}, \d+, false, {embed}>", r"scores_tile<{T}, true, {embed}>"),
    "loop_C": (r"accumulate_calls<{T}, false>", r"field_tile<{T}, true>"),
    "loop_A'": (
        r"distance_calls<{T}, \d+, true, {embed}>",
        r"backward_item<{T}>|backward_pairs_tile<{T}, {embed}>",
    ),
    "loop_C'": (r"accumulate_calls<{T}, true>", r"backward_item<{T}>"),
}
# what a loop's signature counts: the vector instructions by class and their memory operands
# (scalar bookkeeping, an lea where the other has an add, is left out)
SIGNATURE = (
    "fma",
    "add",
    "mul",
    "max",
    "div",
    "sqrt",
    "cvt",
    "int",
    "perm",
    "bcast",
    "load",
    "store",
    "mov",
    "other_vec",
)


def signature(m: dict) -> tuple:
    return tuple(m.get(k, 0) for k in SIGNATURE)


def arithmetic(m: dict) -> int:
    return sum(m.get(k, 0) for k in ("fma", "add", "mul", "max", "div", "sqrt"))


def agreement(bench: list[str], kernels: list[str], isa: str, dtype: str, embed: bool) -> dict:
    """For each loop_* found in the micro-benchmark's disassembly `bench`: (its innermost
    loop's signature as a dict, whether one of the kernel function's innermost loops in
    `kernels` has the same signature)."""
    form = "true" if embed else "false"
    out = {}
    for op, (bench_fn, kernel_fn) in BENCH_LOOPS.items():
        sigs = []
        for lines, fn in ((bench, bench_fn), (kernels, kernel_fn)):
            found = function_bodies(lines, isa, re.compile(fn.format(T=dtype, embed=form)))
            if not found and "{embed}" in fn:
                # where both forms compile to the same code (no embedded broadcasts in the
                # ISA), the compiler's identical-code folding keeps one of the two
                other = "false" if embed else "true"
                found = function_bodies(lines, isa, re.compile(fn.format(T=dtype, embed=other)))
            mixes = [mix(b, lo, hi) for b in found for lo, hi in innermost(loops(b))]
            sigs.append([signature(m) for m in mixes if arithmetic(m) >= 4])
        if not sigs[0]:
            continue
        # the micro-benchmark's function holds one loop of the kind: its busiest
        mine = max(sigs[0], key=lambda sg: sum(sg[:6]))
        out[op] = (dict(zip(SIGNATURE, mine)), mine in sigs[1])
    return out


def loop_agreement(isa: str, dtype: str = "float", embed: bool = True) -> dict:
    """`agreement` on the build tree's object files of one instruction-set copy. The
    micro-benchmark's rates stand for the kernels' loops only where they are the same
    instructions: compiled in another context the same source came out with other registers
    spilled (docs/performance.md, "The loops alone")."""
    bench = disassemble(object_file(isa, "pipe_bench"))
    return agreement(bench, disassemble(object_file(isa)), isa, dtype, embed)


def object_file(isa: str, source: str = "field_cpu") -> str:
    """The kernels' object file (or the micro-benchmark's: source="pipe_bench") of one
    instruction-set copy in the build tree."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hits = sorted(
        glob.glob(
            os.path.join(
                root,
                "build",
                "*",
                "CMakeFiles",
                f"pf_cpu_{isa}.dir",
                "csrc",
                "cpu",
                f"{source}.cpp.o",
            )
        ),
        key=os.path.getmtime,
    )
    if not hits:
        raise SystemExit(
            f"no build/*/CMakeFiles/pf_cpu_{isa}.dir object: build the extension "
            "(pip install -e .) first, or pass --obj"
        )
    return hits[-1]


def main(argv=None):
    import poissonflow._C as C

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", default=C.chosen_isa())
    ap.add_argument("--obj", help="object file to read (default: the build tree's copy)")
    ap.add_argument(
        "--function",
        action="append",
        help="demangled name fragment (repeatable); default: the field's kernels",
    )
    ap.add_argument(
        "--min-vector",
        type=int,
        default=4,
        help="show loops with at least this many vector arithmetic instructions",
    )
    ap.add_argument(
        "--loops",
        action="store_true",
        help="check that the micro-benchmark's loop_* are the kernels' loops, instruction for "
        "instruction class",
    )
    args = ap.parse_args(argv)
    if args.loops:
        # the embedded form exists on avx512 only (dispatch.cpp, resolve_broadcasts)
        for embed in (True, False) if args.isa == "avx512" else (False,):
            for op, (sig, same) in loop_agreement(args.isa, embed=embed).items():
                counts = " ".join(f"{k} {v}" for k, v in sig.items() if v)
                verdict = "the kernel's loop" if same else "NOT the kernel's loop"
                form = "embedded" if embed else "shared  "
                print(f"{op:8} broadcasts {form}: {verdict} ({counts})")
        return
    functions = args.function or [
        "field_tile<float, true>",
        "field_tile<float, false>",
        "backward_item<float>",
    ]
    lines = disassemble(args.obj or object_file(args.isa))
    keys = tuple(k for k in SIGNATURE if k != "other_vec") + ("scalar",)
    for fn in functions:
        body = function_body(lines, args.isa, fn)
        print(f"\n{fn} ({args.isa}): {len(body)} instructions")
        print(f"  {'loop':>13} " + " ".join(f"{k:>6}" for k in keys))
        for lo, hi in sorted(innermost(loops(body))):
            m = mix(body, lo, hi)
            arith = sum(m.get(k, 0) for k in ("fma", "add", "mul", "max", "div", "sqrt"))
            if arith < args.min_vector:
                continue
            print(f"  {lo:6x}-{hi:6x} " + " ".join(f"{m.get(k, 0):6d}" for k in keys))


if __name__ == "__main__":
    main()
