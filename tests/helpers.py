"""Shared testing constants and comparisons for the test suite.

The error measure and the table of tolerances, each argued, live in poissonflow/testing.py (one
definition, importable by bench/gpu_check.py as well); this module re-exports them, adds the
assertions the tests use and the CPU-ISA helpers. No test file defines its own tolerance.
"""

from __future__ import annotations

import os

import torch

from poissonflow.kernels.reference import poisson_field_reference
from poissonflow.testing import (  # noqa: F401  (re-exported)
    ROW_FLOOR,
    TOLERANCES,
    field_errors,
    flow_errors,
    row_errors,
    tolerance,
)

TOL_V = {dt: t.v for dt, t in TOLERANCES.items()}
TOL_LS = {dt: t.log_scale for dt, t in TOLERANCES.items()}
TOL_GRAD = {dt: t.grad for dt, t in TOLERANCES.items()}
TOL_FLOW = {dt: t.flow for dt, t in TOLERANCES.items()}


def cpu_isas() -> list[str]:
    from poissonflow import _ext  # imported here: the package loads it lazily

    return _ext.cpu_isas()


def assert_field_close(x, y, v, ls, dtype=None, *, cancelling=False, **kw):
    """Asserts max row-relative error of v <= TOL_V and the log_scale bound. For inputs built
    so that v cancels (`cancelling=True`) the bound applies to the error scaled by
    sum pi |x - y| (always <= the relative error, by the triangle inequality)."""
    dtype = dtype or x.dtype
    rel, cond, ls_err = field_errors(x, y, v, ls, **kw)
    tol_v, tol_ls = TOL_V[dtype], TOL_LS[dtype]
    if cancelling:
        assert cond <= tol_v, f"v error scaled by sum pi|x-y| = {cond:.3e} > {tol_v:.0e}"
    else:
        assert rel <= tol_v, f"v row-relative error {rel:.3e} > {tol_v:.0e}"
    assert ls_err <= tol_ls, f"log_scale error {ls_err:.3e} > {tol_ls:.0e}"
    return rel, cond, ls_err


class forced_env:
    """Context manager setting one environment variable (the CPU kernels' test hooks)."""

    def __init__(self, name: str, value: str):
        self.name, self.value = name, value

    def __enter__(self):
        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value
        return self

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


def forced_weights(form: str) -> forced_env:
    """The CPU kernels' softmax weights forced through $POISSONFLOW_CPU_WEIGHTS (log, power)."""
    return forced_env("POISSONFLOW_CPU_WEIGHTS", form)


def forced_broadcasts(form: str) -> forced_env:
    """Phase A's broadcast operands forced through $POISSONFLOW_CPU_BROADCASTS (shared,
    embedded)."""
    return forced_env("POISSONFLOW_CPU_BROADCASTS", form)


class forced_isa:
    """Context manager selecting one CPU kernel copy through $POISSONFLOW_CPU_ISA."""

    def __init__(self, isa: str):
        self.isa = isa

    def __enter__(self):
        self.old = os.environ.get("POISSONFLOW_CPU_ISA")
        os.environ["POISSONFLOW_CPU_ISA"] = self.isa
        return self

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("POISSONFLOW_CPU_ISA", None)
        else:
            os.environ["POISSONFLOW_CPU_ISA"] = self.old


def reference_gradients(case, gv, gl):
    """(dx, dy, dw, de) of <v, gv> + <log_scale, gl> by autograd in float64 (None where the
    input is absent), with the r2 floor of the inputs' dtype."""
    cpu = {k: (t.cpu() if isinstance(t, torch.Tensor) else t) for k, t in case.items()}
    floor = torch.finfo(cpu["x"].dtype).tiny
    leaves = [
        None if cpu[k] is None else cpu[k].double().requires_grad_()
        for k in ("x", "y", "w", "eps_rows")
    ]
    v, ls = poisson_field_reference(
        leaves[0],
        leaves[1],
        leaves[2],
        cpu["power"],
        cpu["eps"],
        exclude=cpu["exclude"],
        eps_rows=leaves[3],
        r2_floor=floor,
    )
    loss = v.new_zeros(())
    if gv is not None:
        loss = loss + (v * gv.cpu().double()).sum()
    if gl is not None:
        loss = loss + torch.where(torch.isfinite(ls), ls * gl.cpu().double(), 0.0).sum()
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present, allow_unused=True))
    out = []
    for t in leaves:
        if t is None:
            out.append(None)
            continue
        g = next(grads)
        out.append(torch.zeros_like(t) if g is None else g)
    return out
