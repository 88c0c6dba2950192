"""Every Triton kernel configuration the package can launch, compiled for sm_80 and sm_90 without
a GPU, with ptxas's figures and the budgets they must meet.

(Over 600 lines, kept whole: the enumeration of the launch variants, their specialisation, the
reading of ptxas's figures and the budget table are one check, run as one subprocess.)

    python -m poissonflow.kernels.triton.build_budget [--arch 80 90] [--jobs 2] [--json FILE]
    [--markdown]

Each launch variant is specialised exactly as a launch would specialise it (Triton's own binder,
on CPU tensors of the launch's dtypes and the launch's integer values: an integer argument equal
to 1 becomes a constant, one divisible by 16 gets that attribute), compiled by Triton's compiler
for the target, and assembled by the ptxas that Triton bundles, whose -v figures are read back:
registers, stack frame, spill stores and loads, static shared memory; Triton adds the dynamic
shared memory its layouts need. Budgets per variant:

    registers <= 255; no spill stores or loads unless the variant is listed in ACCEPTED_SPILLS
    (with the bytes accepted); static + dynamic shared memory <= the architecture's per-block
    limit (SMEM_LIMIT, the opt-in maximum).

Needs triton (>= 3.4) and must run without TRITON_INTERPRET=1 (the kernels have to be decorated
for compilation): tests/test_gpu_build_budget.py runs it in a subprocess. Results are cached per
variant in $POISSONFLOW_BUDGET_CACHE (default: a directory under the system temp dir) keyed by
the hash of the kernel's source, its specialisation, the options, the target and Triton's
version, so an unchanged kernel is not compiled twice.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

ARCHS = (80, 90)
_PKG = __package__ or "poissonflow.kernels.triton"  # the kernels' package, wherever it lives
# Shared memory one block may use (static + dynamic, after the opt-in), bytes.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REG_LIMIT = 255

# (kernel, variant label, dtype, arch) -> spill bytes (stores + loads) accepted, with the
# reason. Configurations that spilled at the generic sizes were removed from the kernels' lists
# (docs/gpu.md); what is left spills a few bytes only where Triton specialises an integer
# argument to a constant, i.e. for degenerate problems whose whole cost is the launch.
_DEGENERATE = "a specialisation for a degenerate size (one charge or one dimension): tens of bytes"
_SIXTEEN = (
    "N, B and D all multiples of 16 on sm_80: 4 bytes (one value) on the default GEMM-form "
    "config; the other TF32 configs are autotuned beside it"
)
ACCEPTED_SPILLS: dict[tuple, tuple[int, str]] = {
    ("_flow_kernel", "(32,32,4) w8 s1 rk4 B=1", "float32", 80): (116, _DEGENERATE),
    ("_flow_kernel", "(32,32,4) w8 s1 rk4 B=1", "float32", 90): (8, _DEGENERATE),
    ("_gemm_fwd_kernel", "(32,32,16,2) w8 s2 tf32 D=1", "float32", 80): (64, _DEGENERATE),
    ("_gemm_fwd_kernel", "(32,32,16,2) w8 s2 tf32 N,B,D divisible by 16", "float32", 80): (
        8,
        _SIXTEEN,
    ),
}


@dataclass
class Variant:
    kernel: str  # module:attribute of the (autotuned) kernel
    label: str  # what the row says: config, dtype, specialisation
    dtype: str
    args: dict  # how to build the launch's arguments (see _launch_args)
    config: dict  # constexpr block sizes
    num_warps: int
    num_stages: int
    constexprs: dict = field(default_factory=dict)


@dataclass
class Row:
    kernel: str
    label: str
    dtype: str
    arch: int
    registers: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    static_smem: int = -1
    dynamic_smem: int = -1
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None

    @property
    def smem(self) -> int:
        return self.static_smem + self.dynamic_smem

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def key(self) -> tuple:
        return (self.kernel.split(":")[1], self.label, self.dtype, self.arch)

    def problems(self) -> list[str]:
        """Budget violations of this row (empty when it meets every budget)."""
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.registers > REG_LIMIT:
            out.append(f"{self.registers} registers > {REG_LIMIT}")
        accepted = ACCEPTED_SPILLS.get(self.key(), (0, ""))[0]
        if self.spills > accepted:
            out.append(
                f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded "
                f"(stack {self.stack} B), {accepted} B accepted"
            )
        limit = SMEM_LIMIT[self.arch]
        if self.smem > limit:
            out.append(
                f"shared memory {self.static_smem} static + {self.dynamic_smem} dynamic > {limit} B"
            )
        return out


# --------------------------------------------------------------------------------------------
# The launch variants
# --------------------------------------------------------------------------------------------

DTYPES = ("float16", "bfloat16", "float32", "float64")
# A generic size: no integer is 1, none divisible by 16 (the worst case for alignment), D as
# the benchmark's; the specialisations the package can also meet are listed separately.
GENERIC = dict(N=1001, B=999, D=129, n_steps=3)
SPECIAL = (
    ("N=1", dict(N=1)),
    ("B=1", dict(B=1)),
    ("D=1", dict(D=1)),
    ("N,B,D divisible by 16", dict(N=64, B=64, D=32)),
)
# the flow's own: one step, and everything 1
SPECIAL_FLOW = (
    ("n_steps=1", dict(n_steps=1)),
    ("N=B=D=n_steps=1", dict(N=1, B=1, D=1, n_steps=1)),
)


def _configs(kernel, dtype="float32"):
    import torch

    cdt = torch.float64 if dtype == "float64" else torch.float32
    return [
        (dict(c.kwargs), c.num_warps, c.num_stages)
        for c in kernel.configs
        if cdt in getattr(c, "compute_dtypes", (cdt,))
    ]


def _label(cfg, nw, ns, extra=""):
    blocks = ",".join(str(v) for v in cfg.values())
    return f"({blocks}) w{nw} s{ns}" + (f" {extra}" if extra else "")


def variants() -> list[Variant]:
    """Every (kernel, configuration, dtype) the package can launch, plus the integer
    specialisations (N, B, D, n_steps = 1; all divisible by 16) on each kernel's first
    configuration in float32."""
    from . import _field_bwd, _field_fwd, _flow, _gemm

    out: list[Variant] = []

    def add(kernel_name, kernel, dtypes, extra_constexprs=(({}, ""),), specials=True):
        for dt in dtypes:
            for cfg, nw, ns in _configs(kernel, dt):
                for cx, tag in extra_constexprs:
                    out.append(
                        Variant(
                            kernel_name,
                            _label(cfg, nw, ns, tag),
                            dt,
                            dict(GENERIC),
                            cfg,
                            nw,
                            ns,
                            dict(cx),
                        )
                    )
        if specials:
            cfg, nw, ns = _configs(kernel)[0]
            special = SPECIAL + (SPECIAL_FLOW if kernel_name.endswith("_flow_kernel") else ())
            for cx, tag in extra_constexprs:
                for name, sizes in special:
                    out.append(
                        Variant(
                            kernel_name,
                            _label(cfg, nw, ns, f"{tag} {name}".strip()),
                            "float32",
                            dict(GENERIC, **sizes),
                            cfg,
                            nw,
                            ns,
                            dict(cx),
                        )
                    )

    add(f"{_PKG}._field_fwd:_field_fwd_kernel", _field_fwd._field_fwd_kernel, DTYPES)
    add(f"{_PKG}._field_bwd:_field_bwd_dx_kernel", _field_bwd._field_bwd_dx_kernel, DTYPES)
    add(f"{_PKG}._field_bwd:_field_bwd_dy_kernel", _field_bwd._field_bwd_dy_kernel, DTYPES)
    add(
        f"{_PKG}._flow:_flow_kernel",
        _flow._flow_kernel,
        DTYPES,
        (({"N_STAGES": 1}, "euler"), ({"N_STAGES": 4}, "rk4")),
    )
    # The GEMM form: float16/bfloat16/float32 (float64 goes to the exact kernel); TF32 (the
    # default) over every config, the other precisions on the one config they are given
    # (_gemm.prune_gemm_configs).
    gemm_name = f"{_PKG}._gemm:_gemm_fwd_kernel"
    cx = {"RECOMPUTE": True, "FALLBACK": True}
    add(
        gemm_name,
        _gemm._gemm_fwd_kernel,
        ("float16", "bfloat16", "float32"),
        ((dict(cx, PREC=_gemm.PRECISIONS["tf32"][0]), "tf32"),),
    )
    cfg, nw, ns = _configs(_gemm._gemm_fwd_kernel)[0]
    for name, (code, _) in _gemm.PRECISIONS.items():
        if name != "tf32":
            out.append(
                Variant(
                    gemm_name,
                    _label(cfg, nw, ns, name),
                    "float32",
                    dict(GENERIC),
                    cfg,
                    nw,
                    ns,
                    dict(cx, PREC=code),
                )
            )
    for name, (code, _) in _gemm.PRECISIONS.items():
        cfg = dict(BLOCK_M=_gemm.R2_BLOCK, BLOCK_N=_gemm.R2_BLOCK, BLOCK_K=_gemm.R2_BLOCK_K)
        out.append(
            Variant(
                f"{_PKG}._gemm:_r2_bounds_kernel",
                _label(cfg, _gemm.R2_WARPS, 3, name),
                "float32",
                dict(GENERIC),
                cfg,
                _gemm.R2_WARPS,
                3,
                {"PREC": code},
            )
        )
    return out


def _launch_args(kernel_name: str, v: Variant):
    """(positional args, constexpr kwargs) of one launch on small CPU tensors (only dtypes and
    integer values matter to the specialisation; the sizes of the tensors do not)."""
    import torch

    dt = getattr(torch, v.dtype)
    cdt = torch.float64 if dt == torch.float64 else torch.float32
    N, B, D, n_steps = (v.args[k] for k in ("N", "B", "D", "n_steps"))

    def t(*shape, dtype=dt):
        return torch.zeros(*shape, dtype=dtype)

    scal = t(8, dtype=cdt)
    idx = t(4, dtype=torch.int64)
    name = kernel_name.split(":")[1]
    size_class = 5
    if name == "_field_fwd_kernel":
        args = (
            t(4, 4),
            t(4, 4),
            t(4, dtype=cdt),
            idx,
            t(4, dtype=cdt),
            scal,
            t(4, 4, dtype=cdt),
            t(4, 4),
            t(4, dtype=cdt),
            N,
            B,
            D,
            1,
            size_class,
        )
    elif name == "_field_bwd_dx_kernel":
        args = (
            t(4, 4),
            t(4, 4),
            t(4, dtype=cdt),
            idx,
            t(4, dtype=cdt),
            scal,
            t(4, dtype=cdt),
            t(4, 4),
            t(4, dtype=cdt),
            t(4, dtype=cdt),
            t(4, 4, dtype=cdt),
            t(4, 4),
            N,
            B,
            D,
            1,
            size_class,
        )
    elif name == "_field_bwd_dy_kernel":
        args = (
            t(4, 4),
            t(4, 4),
            t(4, dtype=cdt),
            idx,
            t(4, dtype=cdt),
            scal,
            t(4, dtype=cdt),
            t(4, 4),
            t(4, dtype=cdt),
            t(4, dtype=cdt),
            t(4, 4, dtype=cdt),
            t(4, 4),
            t(4, dtype=cdt),
            N,
            B,
            D,
            1,
            size_class,
        )
    elif name == "_flow_kernel":
        f64 = torch.float64
        args = (
            t(4, 4),
            t(4, dtype=cdt),
            idx,
            scal,
            t(4, dtype=f64),
            t(4, dtype=f64),
            t(4, 4, dtype=cdt),
            t(3, 4, 4, dtype=cdt),
            N,
            B,
            D,
            n_steps,
            size_class,
        )
    elif name == "_gemm_fwd_kernel":
        f32 = torch.float32
        args = (
            t(4, 4),
            t(4, 4),
            t(4, dtype=f32),
            t(4, dtype=f32),
            t(4, dtype=f32),
            idx,
            t(4, dtype=f32),
            64.5,
            1e-38,
            2e-3,
            20.0,
            3e-6,
            1e-6,
            1e-6,
            t(4, 4, dtype=f32),
            t(4, 4),
            t(4, dtype=f32),
            t(4, 2, dtype=f32),
            t(4, 6, dtype=torch.int32),
            N,
            B,
            D,
            1,
            size_class,
        )
    elif name == "_r2_bounds_kernel":
        f32 = torch.float32
        args = (
            t(4, 4),
            t(4, 4),
            t(4, dtype=f32),
            t(4, dtype=f32),
            t(4, 4, dtype=f32),
            t(4, 4, dtype=f32),
            N,
            B,
            D,
            1e-3,
        )
    else:
        raise KeyError(name)
    return args, dict(v.constexprs, **v.config)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads"
)


def _compile_one(item) -> dict:
    """Compiles one (variant, arch) in this process; returns a Row as a dict."""
    try:
        return _compile(*item)
    except Exception as exc:  # noqa: BLE001 - a broken harness is a row too
        v, arch, _ = item
        return asdict(
            Row(v.kernel, v.label, v.dtype, arch, error=f"{type(exc).__name__}: {exc}"[:400])
        )


def _compile(v: Variant, arch: int, cache_dir: str) -> dict:
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    mod_name, attr = v.kernel.split(":")
    kernel = getattr(importlib.import_module(mod_name), attr)
    fn = kernel
    while not isinstance(fn, JITFunction):  # through the autotuner
        fn = fn.fn
    row = Row(v.kernel, v.label, v.dtype, arch)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    args, kwargs = _launch_args(v.kernel, v)
    kwargs = dict(kwargs, num_warps=v.num_warps, num_stages=v.num_stages)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    src = ASTSource(fn, sig, constexprs, attrs)
    key = hashlib.sha256(
        f"{CACHE_VERSION}|{src.hash()}|{sorted(options.__dict__.items())}|{arch}|"
        f"{triton.__version__}".encode()
    ).hexdigest()
    path = os.path.join(cache_dir, key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        cached.update(kernel=v.kernel, label=v.label, dtype=v.dtype, arch=arch, cached=True)
        return cached
    t0 = time.perf_counter()
    buf = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - a failed compile is a row, not the end
        msg = str(exc).strip().splitlines()
        row.error = f"{type(exc).__name__}: {' / '.join(msg[-3:])}"[:400]
        row.seconds = time.perf_counter() - t0
        return asdict(row)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    row.seconds = time.perf_counter() - t0
    log = buf.getvalue()
    regs = _PTXAS_REGS.findall(log)
    frame = _PTXAS_FRAME.findall(log)
    smem = _PTXAS_SMEM.findall(log)
    row.registers = int(regs[-1]) if regs else -1
    if frame:
        row.stack, row.spill_stores, row.spill_loads = (int(x) for x in frame[-1])
    if not regs or not frame:
        # Triton found the cubin in its own cache and ran no ptxas: run it on the PTX
        log = _ptxas_log(compiled.asm["ptx"], arch)
        regs = _PTXAS_REGS.findall(log)
        frame = _PTXAS_FRAME.findall(log)
        smem = _PTXAS_SMEM.findall(log)
        row.registers = int(regs[-1]) if regs else -1
        if frame:
            row.stack, row.spill_stores, row.spill_loads = (int(x) for x in frame[-1])
    # static shared memory as the binary holds it (ptxas -v for sm_90a does not print it)
    res = cubin_resources(compiled.asm["cubin"])
    row.static_smem = max(res["SHARED"]) if res else (int(smem[-1]) if smem else 0)
    row.dynamic_smem = int(compiled.metadata.shared)
    if row.registers < 0 or row.stack < 0:
        row.error = f"ptxas -v figures not found in: {log[-300:]!r}"
    out = asdict(row)
    if row.error is None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, path)
    return out


CACHE_VERSION = 2
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_resources(cubin: bytes | str, cuobjdump: str | None = None) -> dict | None:
    """{"REG": [...], "STACK": [...], "SHARED": [...], "LOCAL": [...]} per function of a cubin
    (bytes, or a path), read by cuobjdump -res-usage (Triton's bundled one by default)."""
    import subprocess

    if cuobjdump is None:
        from triton import knobs

        cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = cubin
        if isinstance(cubin, bytes):
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
        res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True)
    found = _RES_USAGE.findall(res.stdout)
    if not found:
        return None
    cols = list(zip(*[[int(v) for v in row] for row in found]))
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), (list(c) for c in cols)))


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v of PTX text with the options Triton assembles with (Triton's bundled ptxas)."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    sm = sm_arch_from_capability(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [
                get_ptxas(arch).path,
                "-lineinfo",
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm}",
                src,
                "-o",
                os.path.join(tmp, "k.o"),
            ],
            capture_output=True,
            text=True,
        )
    return res.stdout + res.stderr


def default_cache_dir() -> str:
    return os.environ.get("POISSONFLOW_BUDGET_CACHE") or os.path.join(
        tempfile.gettempdir(), "poissonflow-gpu-build-budget"
    )


def run(archs=ARCHS, jobs=None, cache_dir=None, select=None) -> list[Row]:
    """Compiles every variant for every arch (in `jobs` processes); returns the rows."""
    cache_dir = cache_dir or default_cache_dir()
    items = [
        (v, a, cache_dir) for a in archs for v in variants() if select is None or select in v.kernel
    ]
    jobs = jobs or min(len(items), os.cpu_count() or 1)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            done = list(pool.map(_compile_one, items, chunksize=1))
    else:
        done = [_compile_one(i) for i in items]
    fields = Row.__dataclass_fields__
    return [Row(**{k: d[k] for k in fields if k in d}) for d in done]


def markdown(rows: list[Row]) -> str:
    lines = [
        "| kernel | configuration | dtype | arch | regs | stack | spill st/ld B | "
        "smem static + dynamic B | budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r.kernel.split(":")[1]
        if r.error:
            lines.append(
                f"| {name} | {r.label} | {r.dtype} | sm_{r.arch} | - | - | - | - | {r.error} |"
            )
            continue
        verdict = "; ".join(r.problems()) or "ok"
        lines.append(
            f"| {name} | {r.label} | {r.dtype} | sm_{r.arch} | {r.registers} | "
            f"{r.stack} | {r.spill_stores}/{r.spill_loads} | "
            f"{r.static_smem} + {r.dynamic_smem} | {verdict} |"
        )
    return "\n".join(lines)


def markdown_by_arch(rows: list[Row]) -> str:
    """One line per (kernel, variant, dtype) with sm_80 and sm_90 side by side: registers,
    spill bytes (stores/loads), shared memory static + dynamic; accepted spills marked *."""
    archs = sorted({r.arch for r in rows})
    table: dict[tuple, dict[int, Row]] = {}
    for r in rows:
        table.setdefault((r.kernel.split(":")[1], r.label, r.dtype), {})[r.arch] = r
    head = " | ".join(f"sm_{a} regs | sm_{a} spill st/ld B | sm_{a} smem B" for a in archs)
    lines = [
        f"| kernel | configuration (blocks) warps stages [variant] | dtype | {head} |",
        "|---|---|---|" + "---|" * (3 * len(archs)),
    ]
    for (name, label, dtype), by in table.items():
        cells = []
        for a in archs:
            r = by.get(a)
            if r is None or r.error:
                cells += ["-", "error" if r else "-", "-"]
                continue
            mark = "*" if r.spills and r.key() in ACCEPTED_SPILLS else ""
            cells += [
                str(r.registers),
                f"{r.spill_stores}/{r.spill_loads}{mark}",
                f"{r.static_smem} + {r.dynamic_smem}",
            ]
        lines.append(f"| {name} | {label} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument(
        "--by-arch",
        action="store_true",
        help="print the markdown table with the architectures side by side",
    )
    ap.add_argument("--select", help="only kernels whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        print("build_budget needs TRITON_INTERPRET unset (the kernels must be compiled)")
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    t0 = time.perf_counter()
    rows = run(args.arch, args.jobs, select=args.select)
    wall = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_seconds": wall, "rows": [asdict(r) for r in rows]}, f, indent=1)
    bad = [(r, p) for r in rows for p in r.problems()]
    if args.by_arch:
        print(markdown_by_arch(rows))
    elif args.markdown:
        print(markdown(rows))
    compiled = sum(not r.cached for r in rows)
    print(
        f"{len(rows)} variants ({compiled} compiled, {len(rows) - compiled} cached) "
        f"in {wall:.1f} s; {len(bad)} budget violations"
    )
    for r, p in bad:
        print(f"  {r.kernel.split(':')[1]} {r.label} {r.dtype} sm_{r.arch}: {p}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
