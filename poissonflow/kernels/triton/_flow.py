"""Triton fused steps of the Poisson flow (docs/DESIGN.md, "The flow").

In t = log z, with the charges on the plane z = 0 of R^(d+1),

    dx/dt = v(x; e = z = e^t, p = d + 1)         (the forward field's v at height z)

Euler:  x <- x + dt k1
RK4:    k1 = v(x, t)              x2 = x + dt/2 k1
        k2 = v(x2, t + dt/2)      x3 = x + dt/2 k2
        k3 = v(x3, t + dt/2)      x4 = x + dt k3
        k4 = v(x4, t + dt)        x <- x + dt/6 (k1 + 2 k2 + 2 k3 + k4)

Every query's trajectory depends only on itself and the (fixed) charges, so one launch does the
whole integration: a program takes BLOCK_M queries through all n_steps and all stages. Each
stage is one field pass (_field_tile) whose epilogue forms the next stage input and the k-sum
in the same chunked sweep over D. The state, the stage input, the k-sum and the field
accumulator are rows [BLOCK_M, D] of a scratch buffer owned by the program (in L1/L2): the
state is read from DRAM once at the start and written once at the end, whatever n_steps is.
t = t0 + step * dt is recomputed each step (not accumulated), in float64, so that long runs do
not drift.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ode import RK4_A, RK4_B, RK4_B_DIV, RK4_C
from ._field_fwd import (
    _field_tile,
    _finish_rows,
    autotune,
    charge_terms,
    compute_dtype,
    index_rows,
    launch_guard,
    make_configs,
    scalar_params,
    size_class,
    wrap_triton,
)

SOLVER_STAGES = {"euler": 1, "rk4": 4}

# The classic RK4 tableau of the Python driver (poissonflow.flow; tests/conformance checks it
# against the compiled kernels' poissonflow._C.numerics()): stage s is evaluated at
# t + RK4_C[s] dt on x + RK4_A[s] dt k_(s-1); the step adds dt / RK4_B_DIV * sum_s RK4_B[s] k_s.
# Here as compile-time constants of the kernel (stage is a run-time loop index).
_C1, _C2, _C3 = tl.constexpr(RK4_C[1]), tl.constexpr(RK4_C[2]), tl.constexpr(RK4_C[3])
_A1, _A2, _A3 = tl.constexpr(RK4_A[1]), tl.constexpr(RK4_A[2]), tl.constexpr(RK4_A[3])
_B0, _B1 = tl.constexpr(RK4_B[0]), tl.constexpr(RK4_B[1])
_B2, _B3 = tl.constexpr(RK4_B[2]), tl.constexpr(RK4_B[3])
_B_DIV = tl.constexpr(RK4_B_DIV)
# Shapes without spills on sm_80 and sm_90 for Euler and RK4 (build_budget): the forward's,
# with BLOCK_D = 8 or 4 warps, spilled 16-48 bytes on sm_80.
_FLOW_SHAPES = ((32, 32, 4, 8), (32, 32, 2, 4), (32, 64, 4, 8))
_FLOW_SHAPES_F64 = ((32, 32, 2, 8), (32, 32, 4, 8))


# The kernel integrates STATE in place: autotuning must restore it after each timed run. Keyed
# on N_STAGES too: RK4 does not reuse Euler's choice.
@autotune(
    make_configs(_FLOW_SHAPES, _FLOW_SHAPES_F64), restore_value=("STATE",), key_extra=("N_STAGES",)
)
@triton.jit(do_not_specialize=["size_class"])
def _flow_kernel(
    Y,
    LW,
    EXCL,
    SCAL,
    T0,
    DT,
    STATE,
    WORK,
    N,
    B,
    D,
    n_steps,
    size_class,
    N_STAGES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """STATE (N, D), in and out, and WORK (slots, N, D) in the compute dtype: slot 0 the field
    accumulator, for RK4 slot 1 the stage input and slot 2 the k-sum."""
    cdt: tl.constexpr = SCAL.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < N
    half_p = tl.load(SCAL)
    tiny = tl.load(SCAL + 1)
    # Flow time in float64 (T0, DT are float64): t = t0 + step dt and the stage times are exact
    # to float64 however many steps; the heights z^2 = e^(2 tau) and the step dt used in the
    # state updates are then rounded once to the compute dtype.
    t0 = tl.load(T0 + rows, mask=mask_m, other=0.0)
    dt64 = tl.load(DT + rows, mask=mask_m, other=0.0)
    dt = dt64.to(cdt)
    # tl.cast, not N.to: an integer argument equal to 1 reaches the kernel as a constant
    slot = tl.cast(N, tl.int64) * D
    ACC = WORK
    XS = WORK + slot
    KS = WORK + 2 * slot
    for step in range(n_steps):
        t = t0 + step * dt64
        for stage in range(N_STAGES):
            # Stage times t + C[stage] dt; the first stage reads the state itself.
            frac = tl.where(
                stage == 1, _C1, tl.where(stage == 2, _C2, tl.where(stage == 3, _C3, 0.0))
            )
            tau = t + frac * dt64
            e2 = tl.exp(2.0 * tau).to(cdt)
            if stage == 0:
                x_in = STATE
            else:
                x_in = XS
            m, l = _field_tile(
                x_in,
                Y,
                LW,
                EXCL,
                ACC,
                rows,
                mask_m,
                e2,
                half_p,
                tiny,
                B,
                D,
                cdt,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
            neg_inv, lse2 = _finish_rows(m, l)
            # RK4 coefficients of this stage: weight B[stage] of k in the k-sum and step
            # A[stage + 1] dt to the next stage input.
            k_weight = tl.where(
                stage == 0, _B0, tl.where(stage == 1, _B1, tl.where(stage == 2, _B2, _B3))
            )
            next_step = dt * tl.where(stage == 0, _A1, tl.where(stage == 1, _A2, _A3))
            more = stage < N_STAGES - 1
            last = stage == N_STAGES - 1
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                mask = mask_m[:, None] & (dims < D)[None, :]
                offs = rows[:, None] * D + dims[None, :]
                k = tl.load(ACC + offs, mask=mask, other=0.0) * neg_inv[:, None]
                x = tl.load(STATE + offs, mask=mask, other=0.0)
                if N_STAGES == 1:
                    tl.store(STATE + offs, x + dt[:, None] * k, mask=mask)
                else:
                    ks = tl.load(KS + offs, mask=mask & (stage > 0), other=0.0) + k_weight * k
                    tl.store(KS + offs, ks, mask=mask & more)
                    tl.store(XS + offs, x + next_step[:, None] * k, mask=mask & more)
                    tl.store(STATE + offs, x + (dt / _B_DIV)[:, None] * ks, mask=mask & last)
            tl.debug_barrier()


def flow_steps_launch(x, y, w, t0, dt, n_steps, solver, exclude=None):
    """Integrates the flow for n_steps from per-query log-heights t0 with per-query steps dt.

    Returns the end state in x's dtype (computed in float32, or float64 for float64 input).
    Traceable by make_fx, as torch.library.triton_op requires.
    """
    N, D = x.shape
    B = y.shape[0]
    cdt = compute_dtype(x.dtype)
    n_stages = SOLVER_STAGES[solver]
    state = x.detach().to(dtype=cdt, copy=True).contiguous()
    if N == 0:
        return state.to(x.dtype)
    work = torch.empty((1 if n_stages == 1 else 3, N, D), dtype=cdt, device=x.device)
    lw, _ = charge_terms(y, w, cdt)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]),)

    with launch_guard(x):
        wrap_triton(_flow_kernel)[grid](
            y.detach().contiguous(),
            lw,
            index_rows(exclude),
            scalar_params(D + 1, x.dtype, x.device),
            t0.detach().to(torch.float64).contiguous(),
            dt.detach().to(torch.float64).contiguous(),
            state,
            work,
            N,
            B,
            D,
            int(n_steps),
            size_class(N, B),
            N_STAGES=n_stages,
        )
    return state.to(x.dtype)
