"""Loading of the compiled extensions.

Nothing here touches a GPU at import: the CUDA module is imported only when asked for, and
Triton only when installed and asked for.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

__all__ = ["cpu_module", "cpu_isas", "default_cpu_isa"]


@functools.cache
def cpu_module():
    """The C++ CPU extension (`poissonflow._C`); raises ImportError with a hint if unbuilt.

    One OpenMP runtime with torch: the extension is linked against libgomp.so.1 and torch's
    wheel ships its own copy under that soname, so importing torch first makes the dynamic
    loader bind the extension to torch's copy (a soname already loaded is reused). The kernels'
    parallel regions then run on the same thread team as torch's intra-op work: alternating
    torch ops and field calls never puts two sets of spinning threads on the cores
    (`openmp_runtimes()` lists what is loaded; tests/test_cpu_threads.py checks it)."""
    import torch  # noqa: F401  (imported before the extension: see above)

    try:
        return importlib.import_module("poissonflow._C")
    except ImportError as err:
        here = os.path.dirname(os.path.abspath(__file__))
        raise ImportError(
            f"poissonflow was imported from {here}, which holds no compiled C++ extension "
            "(poissonflow._C), and no installed poissonflow was found on sys.path. Run "
            "`pip install .` in the repository root (it compiles the extension), or "
            "`pip install --no-build-isolation -e .` for development."
        ) from err


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; [] elsewhere)."""
    names = ("libgomp", "libiomp", "libomp")
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if any(n in line for n in names)}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(names))


def cpu_isas() -> list[str]:
    """Instruction sets of the CPU kernels usable on this machine, best first."""
    return list(cpu_module().available_isas())


# The CPU kernels' softmax weights (csrc/cpu/power_form.h): "auto" takes the power form wherever
# it applies (2p an integer, bounded range), "log" forces the log domain, "power" asks for the
# power form wherever it applies. For tests and benchmarks; results agree to rounding.
WEIGHT_FORMS = {"auto": 0, "log": 1, "power": 2}


def _forced_form(variable: str, forms: dict[str, int]) -> int:
    """The kernels' code of the form named by $variable ("auto" when unset or empty); a
    ValueError naming the variable for any other name."""
    forced = os.environ.get(variable, "").strip() or "auto"
    if forced not in forms:
        raise ValueError(f"{variable}={forced!r} is not one of {sorted(forms)}")
    return forms[forced]


def cpu_weight_form() -> int:
    """The weight form for the CPU kernels: $POISSONFLOW_CPU_WEIGHTS (auto, log, power)."""
    return _forced_form("POISSONFLOW_CPU_WEIGHTS", WEIGHT_FORMS)


# Phase A's broadcast operands in the avx512 kernels (csrc/cpu/simd.h vsub_broadcast): "auto"
# chooses by CPU (embedded on Zen 4, shared elsewhere), the others force one. For tests and
# benchmarks; results are bit-identical.
BROADCAST_FORMS = {"auto": 0, "shared": 1, "embedded": 2}


def cpu_broadcasts() -> int:
    """Phase A's broadcasts for the CPU kernels: $POISSONFLOW_CPU_BROADCASTS (auto, shared,
    embedded)."""
    return _forced_form("POISSONFLOW_CPU_BROADCASTS", BROADCAST_FORMS)


def default_cpu_isa() -> str:
    """The CPU kernel copy to use: $POISSONFLOW_CPU_ISA if set (for testing), else the best."""
    forced = os.environ.get("POISSONFLOW_CPU_ISA", "").strip()
    if forced and forced != "auto":
        if forced not in cpu_isas():
            raise ValueError(
                f"POISSONFLOW_CPU_ISA={forced!r} is not available here; choose one of {cpu_isas()}"
            )
        return forced
    return "auto"


@functools.cache
def _cuda_module():
    try:
        return importlib.import_module("poissonflow._cuda")
    except ImportError:
        return None


def cuda_extension_built() -> bool:
    """True when the CUDA kernels were compiled into this install (says nothing about a GPU)."""
    return importlib.util.find_spec("poissonflow._cuda") is not None
