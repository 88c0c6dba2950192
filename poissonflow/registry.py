"""The registry of field backends: the one table every dispatch site reads.

(Named `registry`, not `backends`: `poissonflow.backends()`, this module's `backends`, is the
public report function.)

A backend is a module implementing the protocol of docs/ARCHITECTURE.md ("The backend
protocol": `field_forward`, `field_backward`, `flow_steps`) plus what the rest of the package
needs to know about it: the devices and dtypes it takes, how to tell whether it can run here
(and why not), and which torch operator differentiates it.

    >>> from poissonflow import registry
    >>> registry.get("cpu").module().field_forward          # doctest: +SKIP
    >>> registry.resolve("auto", torch.device("cpu"))         # doctest: +SKIP
    'cpu'

Adding a backend means adding one `Backend` entry to `REGISTRY` (and, if "auto" should pick it,
to `AUTO_ORDER`) next to the backend's own files; nothing else in the package names backends.

Nothing here imports a backend module, triton or the CUDA extension: modules load on first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Backend", "REGISTRY", "AUTO_ORDER", "names", "get", "resolve", "available", "backends"]

_HALF_AND_UP = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """One entry of the registry.

    module_name: the module implementing the protocol functions.
    devices: device types whose tensors it takes (`devices_fn`, when given, decides at call
        time: Triton takes CPU tensors only under its interpreter).
    dtypes: input dtypes it takes (outputs come back in the input dtype).
    op: how autograd reaches it. "field" is the device-dispatched op pair
        `poissonflow::field` / `poissonflow::field_backward`: `poissonflow.ops` registers this
        backend's functions as the kernels for each of its devices. Any other name is an op pair
        of the same schema `poissonflow::<op>` / `poissonflow::<op>_backward` that
        `op_module` registers when imported (built with `poissonflow.ops.define_field_ops`).
        None: plain autograd through PyTorch operations (the reference).
    probe: () -> (available, detail), cheap, never raises, never touches a GPU kernel.
    """

    name: str
    module_name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    summary: str
    probe: Callable[[], tuple[bool, str]]
    op: str | None = "field"
    op_module: str | None = None
    devices_fn: Callable[[], tuple[str, ...]] | None = field(default=None, compare=False)

    def module(self):
        """The protocol module (imported on first use)."""
        return importlib.import_module(self.module_name)

    def supported_devices(self) -> tuple[str, ...]:
        return self.devices_fn() if self.devices_fn is not None else self.devices

    def availability(self) -> tuple[bool, str]:
        return self.probe()

    def op_qualname(self) -> str | None:
        """Name of the forward op in torch.ops.poissonflow (registered on return), or None."""
        if self.op is None:
            return None
        if self.op_module is not None:
            importlib.import_module(self.op_module)
        return self.op


# -------------------------------------------------------------------------------------------
# Availability probes (cheap; the reasons are what poissonflow.backends() prints)


def _probe_reference() -> tuple[bool, str]:
    return True, "pure PyTorch, float64"


def _probe_cpu() -> tuple[bool, str]:
    from . import _ext

    try:
        isas = _ext.cpu_isas()
        return True, f"C++ kernels, isas={isas}, openmp={bool(_ext.cpu_module().has_openmp)}"
    except ImportError as err:
        return False, str(err)


@functools.cache
def _triton_installed() -> bool:
    # cached: an install does not change under a running process, and resolve() runs per call
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _cuda_built() -> bool:
    from . import _ext

    return _ext.cuda_extension_built()


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _probe_triton() -> tuple[bool, str]:
    if not _triton_installed():
        return False, "not installed (pip install 'poissonflow[triton]')"
    if torch.cuda.is_available():
        return True, "CUDA device"
    if _triton_interpreting():
        return True, "interpreter on CPU tensors"
    return False, "no GPU"


def _triton_devices() -> tuple[str, ...]:
    # Triton's interpreter (TRITON_INTERPRET=1, for testing) runs the kernels on CPU tensors.
    return ("cuda", "cpu") if _triton_interpreting() else ("cuda",)


def _probe_cuda() -> tuple[bool, str]:
    built = _cuda_built()
    gpu = torch.cuda.is_available()
    detail = ("compiled" if built else "not compiled (no CUDA compiler at build time)") + (
        "" if gpu else ", no GPU"
    )
    return built and gpu, detail


# -------------------------------------------------------------------------------------------
# The registry


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "reference",
            "poissonflow.kernels.reference",
            ("cpu", "cuda"),
            _HALF_AND_UP,
            "float64 pure-PyTorch oracle (any device, any float dtype, autograd)",
            _probe_reference,
            op=None,
        ),
        Backend(
            "cpu",
            "poissonflow.kernels.cpu",
            ("cpu",),
            (torch.float32, torch.float64),
            "C++ kernels (OpenMP, one copy per ISA)",
            _probe_cpu,
        ),
        Backend(
            "triton",
            "poissonflow.kernels.triton",
            ("cuda",),
            _HALF_AND_UP,
            "Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)",
            _probe_triton,
            op="field_triton",
            op_module="poissonflow.kernels.triton.ops",
            devices_fn=_triton_devices,
        ),
        Backend(
            "triton-gemm",
            "poissonflow.kernels.triton_gemm",
            ("cuda",),
            _HALF_AND_UP,
            "Triton, r2 in GEMM form on tensor cores (TF32) with a certified error; near "
            "pairs recomputed exactly "
            "(docs/DESIGN.md, 'A tensor-core field with a certified error'; float64: exact kernel)",
            _probe_triton,
            op="field_triton_gemm",
            op_module="poissonflow.kernels.triton.gemm_ops",
            devices_fn=_triton_devices,
        ),
        Backend(
            "cuda",
            "poissonflow.kernels.cuda",
            ("cuda",),
            _HALF_AND_UP,
            "hand-written CUDA kernels (poissonflow._cuda)",
            _probe_cuda,
        ),
    )
}

# What backend="auto" tries, per device type, in order ($POISSONFLOW_GPU_BACKEND names a GPU
# backend to try first; which of cuda and triton is faster on a given GPU is measured by
# bench/gpu_check.py).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def names() -> tuple[str, ...]:
    """Every registered backend, in registry order."""
    return tuple(REGISTRY)


def get(name: str) -> Backend:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {('auto',) + names()}, got {name!r}") from None


def available(name: str) -> bool:
    return get(name).availability()[0]


def auto_order(device_type: str) -> tuple[str, ...]:
    order = AUTO_ORDER.get(device_type, ())
    preferred = os.environ.get("POISSONFLOW_GPU_BACKEND", "").strip()
    if device_type == "cuda" and preferred in order:
        order = (preferred,) + tuple(n for n in order if n != preferred)
    return order


def resolve(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for `backend` on tensors of `device` (and `dtype`, when given).

    "auto" is the first available entry of AUTO_ORDER for the device type. An explicit name is
    honoured or refused with an error naming what is missing. Errors are ValueError (unknown
    name, wrong device, unavailable) or TypeError (dtype the backend does not take).
    """
    if not isinstance(backend, str) or (backend != "auto" and backend not in REGISTRY):
        raise ValueError(f"backend must be one of {('auto',) + names()}, got {backend!r}")
    if backend == "auto":
        order = auto_order(device.type)
        if not order:
            raise ValueError(f"no backend runs on tensors on {device}")
        if torch.compiler.is_compiling() and len(order) == 1:
            # Availability probes import modules (a graph break for torch.compile); a single
            # candidate needs no probe: an unbuilt kernel raises its own error when called.
            which = order[0]
        else:
            ready = [n for n in order if available(n)]
            if not ready:
                why = "; ".join(f"{n}: {get(n).availability()[1]}" for n in order)
                raise ValueError(f"backend='auto' found no kernel for tensors on {device} ({why})")
            which = ready[0]
    else:
        which = backend
        entry = get(which)
        if device.type not in entry.supported_devices():
            hint = (
                " (set TRITON_INTERPRET=1 before first use to run the kernels on CPU "
                "tensors through Triton's interpreter, for testing)"
                if which == "triton" and device.type == "cpu"
                else ""
            )
            raise ValueError(
                f"backend={which!r} needs tensors on {' or '.join(entry.supported_devices())}, "
                f"got tensors on {device}{hint}"
            )
        if not torch.compiler.is_compiling():
            ok, detail = entry.availability()
            if not ok:
                raise ValueError(f"backend={which!r} is not available: {detail}")
    if dtype is not None:
        check_dtype(which, dtype)
    return which


def check_dtype(name: str, dtype: torch.dtype) -> None:
    entry = get(name)
    if dtype not in entry.dtypes:
        takes = " or ".join(str(d).replace("torch.", "") for d in entry.dtypes)
        raise TypeError(
            f"x has dtype {dtype}; the {name} backend computes in {takes} "
            "(convert with x.float(), or use backend='reference')"
        )


def backends() -> dict[str, dict[str, object]]:
    """Every registered backend with whether it can run here and why not, the devices and dtypes
    it takes and a one-line summary: {name: {available, detail, devices, dtypes, summary}}.

    Public as `poissonflow.backends()`.

    >>> sorted(backends())
    ['cpu', 'cuda', 'reference', 'triton', 'triton-gemm']
    """
    out: dict[str, dict[str, object]] = {}
    for name, entry in REGISTRY.items():
        ok, detail = entry.availability()
        out[name] = {
            "available": ok,
            "detail": detail,
            "devices": list(entry.supported_devices()),
            "dtypes": [str(d).replace("torch.", "") for d in entry.dtypes],
            "summary": entry.summary,
        }
    return out
