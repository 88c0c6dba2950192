"""Loading of the compiled extensions and the list of backends that can run here.

Nothing here touches a GPU at import: the CUDA module is imported only when asked for, and
Triton only when installed and asked for.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

__all__ = ["cpu_module", "cpu_isas", "default_cpu_isa", "backends"]


# Our OpenMP runtime (the system libgomp, separate from the copy bundled with torch) reads its
# wait policy when it loads. By default idle threads spin for ~0.3 ms: with torch's own threads
# also spinning, a training loop that alternates torch ops with small field calls was measured
# 2-3x slower when one other process shared the 2 cores (10.5 against 3.9 ms per iteration). A
# short spin keeps quiet-machine speed (2.8-4.0 against 2.8-3.6 ms) and avoids most of the
# collapse (5.1 ms). The user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT always win.
_DEFAULT_SPINCOUNT = "1000"


@functools.cache
def cpu_module():
    """The C++ CPU extension (`poissonflow._C`); raises ImportError with a hint if unbuilt."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = _DEFAULT_SPINCOUNT
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


def cpu_isas() -> list[str]:
    """Instruction sets of the CPU kernels usable on this machine, best first."""
    return list(cpu_module().available_isas())


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


def backends() -> dict[str, dict[str, object]]:
    """Every registered backend (poissonflow/registry.py) with whether it can run here and why
    not, the devices and dtypes it takes and a one-line summary.

    >>> sorted(backends())
    ['cpu', 'cuda', 'reference', 'triton', 'triton-gemm']
    """
    from . import registry

    return registry.report()
