"""Where a figure was measured: the record every benchmark stores beside its numbers.

    python bench/machine.py          # prints the record of this machine as JSON

A ratio to torch.mm or an absolute rate means nothing without the CPU it ran on: the project's
machines are of one kind but not of one CPU (docs/performance.md). `machine_record()` names the
CPU (model name, vendor, family/model/stepping and the microarchitecture they imply, the
vector-instruction flags, the cache sizes), the instruction set poissonflow's dispatcher chose
and its vector width, the thread count, torch's version, its BLAS and the instruction set it
runs, and the load average; `load_average()` is taken again around each measurement.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (vendor, family) -> [(first model, last model, name)]: the microarchitecture a CPUID family and
# model imply (AMD's published ranges; unknown pairs give None).
_UARCH = {
    ("AuthenticAMD", 23): [(0x00, 0x2F, "Zen / Zen+"), (0x30, 0xFF, "Zen 2")],
    ("AuthenticAMD", 25): [
        (0x00, 0x0F, "Zen 3"),
        (0x10, 0x1F, "Zen 4"),
        (0x20, 0x5F, "Zen 3"),
        (0x60, 0xAF, "Zen 4"),
    ],
    ("AuthenticAMD", 26): [(0x00, 0xFF, "Zen 5")],
}

_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512dq",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
)


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared: every figure carries them)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _cpuinfo() -> dict:
    out: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
    except OSError:
        pass
    return out


def _caches() -> dict:
    """Cache sizes of CPU 0 by level and type, and how many CPUs share each."""
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return out
    for e in entries:
        if not e.startswith("index"):
            continue

        def read(name, e=e):
            try:
                with open(os.path.join(base, e, name)) as f:
                    return f.read().strip()
            except OSError:
                return ""

        level, kind = read("level"), read("type")
        name = f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")
        out[name] = {"size": read("size"), "shared_cpu_list": read("shared_cpu_list")}
    return out


def _hypervisor() -> str | None:
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^Hypervisor vendor:\s*(.+)$", out, re.MULTILINE)
    return m.group(1).strip() if m else None


def cpu_record() -> dict:
    info = _cpuinfo()
    vendor = info.get("vendor_id", platform.machine())
    fam = int(info["cpu family"]) if info.get("cpu family", "").isdigit() else None
    model = int(info["model"]) if info.get("model", "").isdigit() else None
    uarch = None
    for lo, hi, name in _UARCH.get((vendor, fam), []):
        if model is not None and lo <= model <= hi:
            uarch = name
    flags = set(info.get("flags", "").split())
    return {
        "model_name": info.get("model name", platform.processor() or platform.machine()),
        "vendor": vendor,
        "family": fam,
        "model": model,
        "stepping": int(info["stepping"]) if info.get("stepping", "").isdigit() else None,
        "uarch": uarch,
        "flags": [f for f in _FLAGS if f in flags],
        "caches": _caches(),
        "cpu_count": os.cpu_count(),
        "hypervisor": _hypervisor(),
        "machine": platform.machine(),
    }


@functools.lru_cache(maxsize=1)
def blas_banner() -> str | None:
    """MKL's own banner (MKL_VERBOSE) from a small torch.mm in a subprocess: which MKL build and
    which processor branch it runs (on a non-Intel CPU it names no instruction set)."""
    code = "import torch; a = torch.randn(64, 64); torch.mm(a, a)"
    env = dict(os.environ, MKL_VERBOSE="1")
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("MKL_VERBOSE") and "GEMM" not in line:
            return line[len("MKL_VERBOSE") :].strip()
    return None


def torch_record() -> dict:
    cfg = torch.__config__.show()
    m = re.search(r"BLAS_INFO=([^,\s]+)", cfg)
    mkl = re.search(r"Math Kernel Library Version ([^\n]+)", cfg)
    return {
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": m.group(1) if m else None,
        "mkl": mkl.group(1).strip() if mkl else None,
        "mkl_banner": blas_banner() if (m and m.group(1) == "mkl") else None,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None


def poissonflow_record() -> dict:
    import poissonflow
    from poissonflow import _ext

    C = _ext.cpu_module()
    isa = _ext.default_cpu_isa()
    rec = {
        "version": poissonflow.__version__,
        "commit": _git_commit(),
        "isa": isa,
        "isas": _ext.cpu_isas(),
    }
    if hasattr(C, "vector_bytes"):
        rec["isa_chosen"] = C.chosen_isa(isa)
        rec["vector_bytes"] = C.vector_bytes(isa)
    if hasattr(C, "openmp_library"):
        rec["openmp"] = C.openmp_library()
    return rec


def machine_record(threads: int | None = None) -> dict:
    """Everything a figure needs to say where it was measured (docs/performance.md)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_record(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "poissonflow": poissonflow_record(),
        "torch": torch_record(),
        "load_average": load_average(),
        "python": platform.python_version(),
    }


def cpu_line(rec: dict) -> str:
    """One line naming the CPU and the instruction sets, for printed tables."""
    c, p, t = rec["cpu"], rec["poissonflow"], rec["torch"]
    fam = f"family {c['family']} model {c['model']}" if c.get("family") is not None else ""
    ua = f", {c['uarch']}" if c.get("uarch") else ""
    l2 = c.get("caches", {}).get("L2", {}).get("size", "?")
    l3 = c.get("caches", {}).get("L3", {}).get("size", "?")
    la = rec.get("load_average") or []
    return (
        f"{c['model_name']} ({fam}{ua}), L2 {l2}/core, L3 {l3}; {rec['threads']} threads; "
        f"poissonflow {p.get('isa_chosen', p['isa'])} ({p.get('vector_bytes', '?')}-byte "
        f"vectors); torch {t['version']} {t['blas']} (capability {t['cpu_capability']}); "
        f"load {la[0] if la else '?'}"
    )


if __name__ == "__main__":
    json.dump(machine_record(), sys.stdout, indent=2)
    print()
