"""Every GPU build, checked without a GPU.

Triton: every kernel configuration the package can launch (exact forward, backward dL/dx and
dL/dy, fused Euler/RK4 flow, GEMM form at every precision, the r2-bounds helper; float16,
bfloat16, float32, float64 where the kernel takes it) plus the integer specialisations a launch
can meet (N, B, D, n_steps = 1; all multiples of 16) compiled for sm_80 and sm_90 by Triton's
compiler and assembled by its bundled ptxas (python -m poissonflow.kernels.triton.build_budget, in a
subprocess without TRITON_INTERPRET, compiles cached by kernel-source hash).

CUDA: the four kernel files compiled by nvcc for sm_80 and sm_90 as CMakeLists.txt compiles
them, with ptxas -v and cuobjdump -res-usage figures per instance.

Budgets, the same for both: at most 255 registers; no spill stores or loads unless the variant
is listed as accepted (poissonflow.kernels.triton.build_budget.ACCEPTED_SPILLS, CUDA_ACCEPTED_SPILLS
below, each with its reason and bytes); static + dynamic shared memory within the
architecture's per-block opt-in limit (CUDA: the static part within the reserve the launch plan
keeps free, csrc/cuda/block_plan.h kStaticSmemReserve, and every plan within the rest).

    python tests/test_gpu_build_budget.py      # prints both tables as markdown
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = (80, 90)
# per-block shared memory after the opt-in (A100, H100/H200)
SMEM_OPTIN = {80: 166912, 90: 232448}
REG_LIMIT = 255

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_rows(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("budget") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "poissonflow.kernels.triton.build_budget", "--json", str(out)],
        cwd=tempfile.gettempdir(),
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.perf_counter() - t0
    print(res.stdout[-3000:], f"\nbuild_budget took {wall:.1f} s")
    assert out.exists(), res.stdout[-2000:] + res.stderr[-4000:]
    from poissonflow.kernels.triton.build_budget import Row

    data = json.loads(out.read_text())
    fields = Row.__dataclass_fields__
    return [Row(**{k: d[k] for k in fields if k in d}) for d in data["rows"]]


def test_every_triton_configuration_compiles(triton_rows):
    errors = [(r.kernel, r.label, r.dtype, r.arch, r.error) for r in triton_rows if r.error]
    assert not errors, errors[:10]


def test_triton_budgets(triton_rows):
    bad = [
        (r.kernel.split(":")[1], r.label, r.dtype, f"sm_{r.arch}", p)
        for r in triton_rows
        for p in r.problems()
    ]
    assert not bad, bad


def test_triton_table_covers_every_kernel_dtype_and_arch(triton_rows):
    seen = {(r.kernel.split(":")[1], r.dtype, r.arch) for r in triton_rows}
    for arch in ARCHS:
        for kernel in (
            "_field_fwd_kernel",
            "_field_bwd_dx_kernel",
            "_field_bwd_dy_kernel",
            "_flow_kernel",
        ):
            for dtype in ("float16", "bfloat16", "float32", "float64"):
                assert (kernel, dtype, arch) in seen, (kernel, dtype, arch)
        for dtype in ("float16", "bfloat16", "float32"):
            assert ("_gemm_fwd_kernel", dtype, arch) in seen
        assert ("_r2_bounds_kernel", "float32", arch) in seen


@pytest.mark.parametrize(
    "special", ["N=1", "B=1", "D=1", "n_steps=1", "N=B=D=n_steps=1", "divisible by 16"]
)
def test_integer_specialisations_compile(triton_rows, special):
    """Triton turns an integer argument equal to 1 into a constant (N = 1 once broke the fused
    flow kernel: `N.to(...)` on a Python int) and marks multiples of 16; each kernel compiles
    with them for both architectures."""
    rows = [r for r in triton_rows if r.label.endswith(special) or f" {special}" in r.label]
    assert rows
    kernels = {r.kernel.split(":")[1] for r in rows}
    if not special.startswith(("n_steps", "N=B=D")):
        assert {
            "_field_fwd_kernel",
            "_field_bwd_dx_kernel",
            "_field_bwd_dy_kernel",
            "_flow_kernel",
            "_gemm_fwd_kernel",
        } <= kernels
    else:
        assert kernels == {"_flow_kernel"}
    assert {r.arch for r in rows} == set(ARCHS)
    assert not [r for r in rows if r.error], [(r.label, r.arch, r.error) for r in rows]


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------

# (arch, mode, type, upt) -> spill bytes (stores + loads) accepted, with the reason
# (docs/bench/cuda_ptxas.md: both predate this test). ptxas holds both instances at 128
# registers (__launch_bounds__(256)) and keeps a few values of phase C on the stack (L1).
_BOUND = "ptxas keeps this instance at 128 registers; a few values on the stack (L1), small"
CUDA_ACCEPTED_SPILLS: dict[tuple, tuple[int, str]] = {
    (80, "backward_x", "float", 2): (108, _BOUND),
    (90, "forward", "double", 4): (28, _BOUND),
}

_MODES = {0: "forward", 1: "flow", 2: "backward_x", 3: "backward_y"}
_ENTRY = re.compile(
    r"Function properties for (_ZN11poissonflow4cuda12field_kernelI([fd])Li(\d)ELi(\d)E\S*)"
)
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _nvcc():
    return shutil.which("nvcc")


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001
        return None


def _cuda_source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(
        list(CUDA_DIR.glob("*.cu*"))
        + list(CUDA_DIR.glob("*.h"))
        + list((ROOT / "csrc" / "common").glob("*.h"))
    ):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _compile_cuda(src: Path, arch: int, workdir: Path) -> list[dict]:
    """Rows (arch, mode, type, upt, regs, stack, spill stores/loads, static smem) of one .cu."""
    cubin = workdir / f"{src.stem}.sm{arch}.cubin"
    cmd = [
        _nvcc(),
        "-std=c++17",
        "-O3",
        "-lineinfo",
        "-cubin",
        f"-arch=sm_{arch}",
        "-Xptxas=-v,-warn-spills,-warn-lmem-usage",
        f"-I{ROOT / 'csrc'}",
        f"-I{CUDA_DIR}",
        str(src),
        "-o",
        str(cubin),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src.name} sm_{arch}:\n{res.stderr[-3000:]}")
    log = res.stdout + res.stderr
    dump = subprocess.run(
        [_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True
    ).stdout
    shared = {m.group(1): int(m.group(4)) for m in _RES.finditer(dump)}
    rows = []
    for block in log.split("Compiling entry function")[1:]:
        m = _ENTRY.search(block)
        frame = _FRAME.search(block)
        regs = _REGS.search(block)
        if not (m and frame and regs):
            continue
        name, t, upt, mode = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
        rows.append(
            dict(
                arch=arch,
                mode=_MODES[mode],
                type="float" if t == "f" else "double",
                upt=upt,
                registers=int(regs.group(1)),
                stack=int(frame.group(1)),
                spill_stores=int(frame.group(2)),
                spill_loads=int(frame.group(3)),
                static_smem=shared.get(name, -1),
            )
        )
    return rows


def cuda_rows(jobs: int | None = None) -> list[dict]:
    """Every CUDA kernel instance for sm_80 and sm_90 (cached by the sources' hash and nvcc's
    version in the system temp dir)."""
    version = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256((_cuda_source_hash() + version).encode()).hexdigest()[:20]
    cache = Path(
        os.environ.get("POISSONFLOW_BUDGET_CACHE")
        or Path(tempfile.gettempdir()) / "poissonflow-gpu-build-budget"
    )
    path = cache / f"cuda-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    sources = sorted(CUDA_DIR.glob("kernels_*.cu"))
    with (
        tempfile.TemporaryDirectory() as tmp,
        ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool,
    ):
        parts = pool.map(
            lambda sa: _compile_cuda(sa[0], sa[1], Path(tmp)),
            [(s, a) for a in ARCHS for s in sources],
        )
        rows = [r for part in parts for r in part]
    rows.sort(
        key=lambda r: (r["arch"], list(_MODES.values()).index(r["mode"]), r["type"], r["upt"])
    )
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return rows


@pytest.fixture(scope="module")
def cuda_table():
    if _nvcc() is None or _cuobjdump() is None:
        pytest.skip("nvcc (and cuobjdump, or triton's) needed to compile the CUDA kernels")
    return cuda_rows()


def _static_reserve() -> int:
    text = (CUDA_DIR / "block_plan.h").read_text()
    return int(re.search(r"kStaticSmemReserve = (\d+);", text).group(1))


def test_cuda_every_instance_compiled(cuda_table):
    # float: 4 UPT instances, double: 3, per mode and arch
    assert len(cuda_table) == len(ARCHS) * 4 * (4 + 3), len(cuda_table)
    assert all(r["static_smem"] >= 0 for r in cuda_table)


def test_cuda_budgets(cuda_table):
    reserve = _static_reserve()
    bad = []
    for r in cuda_table:
        key = (r["arch"], r["mode"], r["type"], r["upt"])
        if r["registers"] > REG_LIMIT:
            bad.append((key, f"{r['registers']} registers"))
        spills = r["spill_stores"] + r["spill_loads"]
        if spills > CUDA_ACCEPTED_SPILLS.get(key, (0, ""))[0]:
            bad.append((key, f"spills {r['spill_stores']}/{r['spill_loads']} B"))
        if r["static_smem"] > reserve:
            bad.append(
                (key, f"static shared memory {r['static_smem']} B > the plan's reserve {reserve} B")
            )
    assert not bad, bad


def _planner():
    """plan(mode, is_double, D, smem_limit) from the compiled module, else the host emulator."""
    if importlib.util.find_spec("poissonflow._cuda") is not None:
        import poissonflow._cuda as mod

        return lambda *a: mod.plan(*a, 0)
    sys.path.insert(0, str(ROOT / "tests"))
    from cuda_emulation import emulator as emu

    if emu.compiler() is None:
        pytest.skip("neither poissonflow._cuda nor a C++ compiler for the emulator")
    e = emu.Emulator(emu.build())
    return lambda mode, dbl, D, lim: e.plan(mode, dbl, D, lim, 0)


def test_cuda_plans_leave_room_for_the_static_shared_memory(cuda_table):
    """For every mode, type and D up to 1,100 (splits included), the plan keeps the static
    reserve free and its dynamic shared memory plus the largest static part of the instances
    fits the opt-in limit of sm_80 and sm_90. Before the reserve, plans went up to the limit
    itself (sm_80 backward_x float D = 177: 400 bytes below it; sm_90 backward_y float
    D = 237: 1,728 bytes, of which the kernel's static 1,024 left 704)."""
    reserve = _static_reserve()
    plan = _planner()
    static = {}
    for r in cuda_table:
        k = (r["arch"], r["mode"], r["type"])
        static[k] = max(static.get(k, 0), r["static_smem"])
    bad = []
    for arch in ARCHS:
        for mode in range(4):
            for dbl in (False, True):
                s = static[(arch, _MODES[mode], "double" if dbl else "float")]
                for D in list(range(1, 300)) + list(range(300, 1101, 7)):
                    if mode == 1:
                        try:
                            p = plan(mode, dbl, D, SMEM_OPTIN[arch])
                        except ValueError:
                            continue  # wide flows go to per-stage passes
                    else:
                        p = plan(mode, dbl, D, SMEM_OPTIN[arch])
                    if p["smem_bytes"] + max(s, reserve) > SMEM_OPTIN[arch]:
                        bad.append((arch, _MODES[mode], dbl, D, p["smem_bytes"], s))
    assert not bad, bad[:10]


def cuda_markdown(rows) -> str:
    lines = [
        "| arch | mode | type | UPT | regs | stack / spill-st / spill-ld B | static smem B |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| sm_{r['arch']} | {r['mode']} | {r['type']} | {r['upt']} | "
            f"{r['registers']} | {r['stack']}/{r['spill_stores']}/{r['spill_loads']} | "
            f"{r['static_smem']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(cuda_markdown(cuda_rows()))
