"""Triton backward of the Poisson field (docs/ARCHITECTURE.md, FlashAttention-2 style).

With g = g_v (upstream gradient of v), g_l (of log_scale), delta_i = g_i . v_i and

    a_ij  = g_i . (x_i - y_j)                              by differences, never g.x - g.y
    q_ij  = 2^(-(p/2) log2 r2_ij - lse2_i) = pi_ij / w_j    (finite at w_j = 0)
    pi_ij = w_j q_ij,    gs_ij = pi_ij (a_ij - delta_i + g_l,i),    c_ij = p gs_ij / r2_ij

the gradients are

    dL/dx_i = g_i - sum_j c_ij (x_i - y_j)                 kernel over query tiles
    dL/dy_j = sum_i c_ij (x_i - y_j) - sum_i pi_ij g_i      kernel over charge tiles
    dL/dw_j = sum_i q_ij (a_ij - delta_i + g_l,i) - sum_i g_l,i / sum_k w_k
    dL/de_i = -e_i sum_j c_ij     (per-query softening eps_rows; poissonflow.ops obtains it
                                   from dL/dx of the augmented problem (x, e), (y, 0))

Both kernels recompute r2 and the weights from the saved log-sum-exp (lse2, log2 units); no
N x B buffer exists and no atomics are used: every output row is owned by one program and
summed in a fixed order, so results are bit-identical run to run. Where r2 + e^2 fell below the
floor `tiny` the floor is constant, so that pair contributes no r2 derivative (as the reference's
clamp). Rows no charge reaches (lse2 = -inf) have v = 0 identically: they get dL/dx = 0.
Accumulators over D live in scratch rows owned by the program, as in the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._field_fwd import (
    _zero_rows,
    autotune,
    charge_terms,
    compute_dtype,
    index_rows,
    launch_guard,
    make_configs,
    scalar_params,
    size_class,
    softening_sq,
    wrap_triton,
)

# (rows of the program's own axis, rows of the streamed axis, BLOCK_D, num_warps): the shapes
# that compile for sm_90 without register spills at D = 129 (two [BLOCK_D, BLOCK_M, BLOCK_N]
# partial sums, r2 and the projection, live across the D sweep, hence BLOCK_D = 4).
_DX_SHAPES = ((32, 32, 4, 4), (64, 32, 4, 8), (32, 64, 4, 8))
_DY_SHAPES = ((32, 32, 4, 4), (32, 64, 4, 8))
# float64: more warps or smaller tiles, the same budget (no spills on sm_80 and sm_90)
_DX_SHAPES_F64 = ((32, 32, 2, 8), (32, 32, 4, 8), (32, 16, 4, 4))
_DY_SHAPES_F64 = ((32, 32, 2, 8), (16, 32, 4, 4))


@triton.jit
def _sq_dist_proj(
    x_cols,
    g_cols,
    mask_m,
    y_cols,
    mask_n,
    D,
    cdt: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(||x_i - y_j||^2, g_i . (x_i - y_j)) of a [BLOCK_M, BLOCK_N] tile from one pass over D.

    Pointers are [1, rows] row starts, chunks are loaded transposed and partial sums kept per
    dimension lane until the end (see _sq_dist); g_cols may be None (then the projection is 0).
    """
    r2 = tl.zeros([BLOCK_D, BLOCK_M, BLOCK_N], cdt)
    proj = tl.zeros([BLOCK_D, BLOCK_M, BLOCK_N], cdt)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        in_d = (dims < D)[:, None]
        xt = tl.load(x_cols + dims[:, None], mask=in_d & mask_m[None, :], other=0.0).to(cdt)
        yt = tl.load(y_cols + dims[:, None], mask=in_d & mask_n[None, :], other=0.0).to(cdt)
        diff = xt[:, :, None] - yt[:, None, :]
        r2 += diff * diff
        if g_cols is not None:
            gt = tl.load(g_cols + dims[:, None], mask=in_d & mask_m[None, :], other=0.0).to(cdt)
            proj += gt[:, :, None] * diff
    return tl.sum(r2, axis=0), tl.sum(proj, axis=0)


@triton.jit
def _query_terms(
    rows, mask_m, E2, e2_stride, LSE2, DELTA, GL, EXCL, cdt: tl.constexpr, BLOCK_M: tl.constexpr
):
    """Per-query inputs of the weight recomputation: e^2, alive, lse2 (0 where dead),
    g_l - delta, excluded charge (-1 when EXCL is None)."""
    e2 = tl.load(E2 + rows * e2_stride, mask=mask_m, other=0.0)
    lse2 = tl.load(LSE2 + rows, mask=mask_m, other=float("-inf"))
    alive = lse2 > float("-inf")
    lse_ref = tl.where(alive, lse2, 0.0)
    base = tl.zeros([BLOCK_M], cdt)
    if GL is not None:
        base += tl.load(GL + rows, mask=mask_m, other=0.0)
    if DELTA is not None:
        base -= tl.load(DELTA + rows, mask=mask_m, other=0.0)
    if EXCL is not None:
        excl = tl.load(EXCL + rows, mask=mask_m, other=-1)
    else:
        excl = tl.full([BLOCK_M], -1, tl.int64)
    return e2, alive, lse_ref, base, excl


@triton.jit
def _pair_weights(
    r2, e2, alive, lse_ref, excl, lw, cols_n, mask_n, half_p, tiny, WITH_Q: tl.constexpr
):
    """(pi, q, floored, r2f) of a tile: pi = 2^(lw_j - (p/2) log2 r2f - lse2_i) (lw None: all
    weights 1), q = pi / w = 2^(-(p/2) log2 r2f - lse2_i) when WITH_Q (else None); 0 for dead
    rows, padding and excluded pairs (q is pi when not WITH_Q). floored marks r2 + e^2 < tiny,
    r2f = max(r2 + e^2, tiny).

    pi is its own exponential, never q * w: q of a zero-weight charge much closer to a query
    than every live charge overflows to inf, and inf * 0 = NaN (such a charge has pi = 0 and no
    gradient through v or log_scale but its dL/dw)."""
    r2e = r2 + e2[:, None]
    floored = r2e < tiny
    r2f = tl.maximum(r2e, tiny)
    score = -half_p * tl.log2(r2f) - lse_ref[:, None]
    live = mask_n[None, :] & alive[:, None] & (cols_n[None, :] != excl[:, None])
    score = tl.where(live, score, float("-inf"))
    if lw is not None:
        pi = tl.exp2(score + lw[None, :])
        q = pi  # (a jit function cannot return None)
        if WITH_Q:
            q = tl.exp2(score)
    else:
        pi = tl.exp2(score)
        q = pi
    return pi, q, floored, r2f


@autotune(make_configs(_DX_SHAPES, _DX_SHAPES_F64))
@triton.jit(do_not_specialize=["size_class"])
def _field_bwd_dx_kernel(
    X,
    Y,
    LW,
    EXCL,
    E2,
    SCAL,
    LSE2,
    GV,
    DELTA,
    GL,
    ACC,
    DX,
    N,
    B,
    D,
    e2_stride,
    size_class,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_M queries: DX = dL/dx. ACC holds sum_j c_ij (x_i - y_j) in the
    compute dtype (may alias DX)."""
    cdt: tl.constexpr = SCAL.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < N
    half_p = tl.load(SCAL)
    tiny = tl.load(SCAL + 1)
    e2, alive, lse_ref, base, excl = _query_terms(
        rows, mask_m, E2, e2_stride, LSE2, DELTA, GL, EXCL, cdt, BLOCK_M
    )
    x_rows = X + rows[:, None] * D
    g_cols = None
    if GV is not None:
        g_cols = tl.trans(GV + rows[:, None] * D)
    acc_rows = ACC + rows[:, None] * D
    _zero_rows(acc_rows, mask_m, D, BLOCK_M, BLOCK_D)
    for j0 in range(0, B, BLOCK_N):
        cols_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = cols_n < B
        y_rows = Y + cols_n.to(tl.int64)[:, None] * D
        r2, proj = _sq_dist_proj(
            tl.trans(x_rows),
            g_cols,
            mask_m,
            tl.trans(y_rows),
            mask_n,
            D,
            cdt,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        lw = None
        if LW is not None:
            lw = tl.load(LW + cols_n, mask=mask_n, other=float("-inf"))
        pi, _, floored, r2f = _pair_weights(
            r2, e2, alive, lse_ref, excl, lw, cols_n, mask_n, half_p, tiny, False
        )
        c = tl.where(floored, 0.0, (2.0 * half_p) * pi * (proj + base[:, None]) / r2f)
        ct = tl.trans(c)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            in_d = (dims < D)[None, :]
            mask = mask_m[:, None] & in_d
            xk = tl.load(x_rows + dims[None, :], mask=mask, other=0.0).to(cdt)
            yk = tl.load(y_rows + dims[None, :], mask=mask_n[:, None] & in_d, other=0.0).to(cdt)
            contrib = tl.sum(ct[:, :, None] * (xk[None, :, :] - yk[:, None, :]), axis=0)
            a = tl.load(acc_rows + dims[None, :], mask=mask, other=0.0)
            tl.store(acc_rows + dims[None, :], a + contrib, mask=mask)
        tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = mask_m[:, None] & (dims < D)[None, :]
        offs = rows[:, None] * D + dims[None, :]
        dx = -tl.load(ACC + offs, mask=mask, other=0.0)
        if GV is not None:
            g = tl.load(GV + offs, mask=mask & alive[:, None], other=0.0).to(cdt)
            dx += g
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@autotune(make_configs(_DY_SHAPES, _DY_SHAPES_F64, row_block="BLOCK_N", col_block="BLOCK_M"))
@triton.jit(do_not_specialize=["size_class"])
def _field_bwd_dy_kernel(
    X,
    Y,
    LW,
    EXCL,
    E2,
    SCAL,
    LSE2,
    GV,
    DELTA,
    GL,
    ACC,
    DY,
    DW,
    N,
    B,
    D,
    e2_stride,
    size_class,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_N charges, streaming all queries: DY = dL/dy (if not None) and
    DW = sum_i q_ij (a_ij - delta_i + g_l,i) (if not None; the host subtracts the sum-of-weights
    term). ACC holds dL/dy in the compute dtype (may alias DY). LW: log2 weights or None."""
    cdt: tl.constexpr = SCAL.dtype.element_ty
    cols_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = cols_n < B
    half_p = tl.load(SCAL)
    tiny = tl.load(SCAL + 1)
    lw = None
    if LW is not None:
        lw = tl.load(LW + cols_n, mask=mask_n, other=float("-inf"))
    y_rows = Y + cols_n[:, None] * D
    if DY is not None:
        acc_rows = ACC + cols_n[:, None] * D
        _zero_rows(acc_rows, mask_n, D, BLOCK_N, BLOCK_D)
    dw = tl.zeros([BLOCK_N], cdt)
    for i0 in range(0, N, BLOCK_M):
        rows = (i0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rows < N
        e2, alive, lse_ref, base, excl = _query_terms(
            rows, mask_m, E2, e2_stride, LSE2, DELTA, GL, EXCL, cdt, BLOCK_M
        )
        x_rows = X + rows[:, None] * D
        g_rows = None
        g_cols = None
        if GV is not None:
            g_rows = GV + rows[:, None] * D
            g_cols = tl.trans(g_rows)
        r2, proj = _sq_dist_proj(
            tl.trans(x_rows),
            g_cols,
            mask_m,
            tl.trans(y_rows),
            mask_n,
            D,
            cdt,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        pi, q, floored, r2f = _pair_weights(
            r2, e2, alive, lse_ref, excl, lw, cols_n, mask_n, half_p, tiny, DW is not None
        )
        t = proj + base[:, None]
        if DW is not None:
            dw += tl.sum(q * t, axis=0)
        if DY is not None:
            c = tl.where(floored, 0.0, (2.0 * half_p) * pi * t / r2f)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                in_d = (dims < D)[None, :]
                mask = mask_n[:, None] & in_d
                xk = tl.load(x_rows + dims[None, :], mask=mask_m[:, None] & in_d, other=0.0).to(cdt)
                yk = tl.load(y_rows + dims[None, :], mask=mask, other=0.0).to(cdt)
                term = c[:, :, None] * (xk[:, None, :] - yk[None, :, :])
                if GV is not None:
                    gk = tl.load(g_rows + dims[None, :], mask=mask_m[:, None] & in_d, other=0.0).to(
                        cdt
                    )
                    term -= pi[:, :, None] * gk[:, None, :]
                contrib = tl.sum(term, axis=0)
                a = tl.load(acc_rows + dims[None, :], mask=mask, other=0.0)
                tl.store(acc_rows + dims[None, :], a + contrib, mask=mask)
            tl.debug_barrier()
    if DW is not None:
        tl.store(DW + cols_n, dw, mask=mask_n)
    if DY is not None:
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = mask_n[:, None] & (dims < D)[None, :]
            offs = cols_n[:, None] * D + dims[None, :]
            tl.store(DY + offs, tl.load(ACC + offs, mask=mask).to(DY.dtype.element_ty), mask=mask)


def field_backward_launch(
    x, y, w, power, eps, lse2, v, gv, gl, *, need_x, need_y, need_w, exclude=None, eps_rows=None
):
    """Gradients (gx, gy, gw) of the field from lse2 (log2 units, compute dtype).

    v is the forward's field, in x's dtype or (better for float16/bfloat16 input) in the
    compute dtype; it only enters delta_i = g_i . v_i. gx (N, D), gy (B, D) and gw (B,) are in
    x's dtype; each is None when not asked for (gw also when w is None). gv and gl may be None
    (zero upstream gradient). dL/d eps_rows is formed by poissonflow.ops from these kernels on
    the augmented problem. Traceable by make_fx, as torch.library.triton_op requires.
    """
    N, D = x.shape
    B = y.shape[0]
    dev = x.device
    cdt = compute_dtype(x.dtype)
    need_w = need_w and w is not None
    gx = torch.empty((N, D), dtype=x.dtype, device=dev) if need_x else None
    gy = torch.empty((B, D), dtype=x.dtype, device=dev) if need_y else None
    gw = None
    x = x.detach().contiguous()
    y = y.detach().contiguous()
    lw, _ = charge_terms(y, w, cdt)
    scal = scalar_params(power, x.dtype, dev)
    e2, e2_stride = softening_sq(x, eps, eps_rows, cdt)
    excl = index_rows(exclude)
    lse2 = lse2.detach().to(cdt).contiguous()
    delta = None
    if gv is not None:
        gv = gv.detach().contiguous()
        delta = (gv.to(cdt) * v.detach().to(cdt)).sum(dim=1).contiguous()
    gl_c = None if gl is None else gl.detach().to(cdt).contiguous()

    def launch(kernel, blocks, outputs):
        # both kernels take the same inputs, then their outputs, then the sizes
        with launch_guard(x):
            wrap_triton(kernel)[blocks](
                x, y, lw, excl, e2, scal, lse2, gv, delta, gl_c,
                *outputs,
                N, B, D, e2_stride, size_class(N, B),
            )  # fmt: skip

    if need_x and N > 0:
        acc = gx if cdt == x.dtype else torch.empty((N, D), dtype=cdt, device=dev)

        def grid_q(meta):
            return (triton.cdiv(N, meta["BLOCK_M"]),)

        launch(_field_bwd_dx_kernel, grid_q, (acc, gx))

    if need_y or need_w:
        accy = None
        if need_y:
            accy = gy if cdt == x.dtype else torch.empty((B, D), dtype=cdt, device=dev)
        dw = torch.empty((B,), dtype=cdt, device=dev) if need_w else None
        if N > 0:

            def grid_c(meta):
                return (triton.cdiv(B, meta["BLOCK_N"]),)

            launch(_field_bwd_dy_kernel, grid_c, (accy, gy, dw))
        else:
            if need_y:
                gy.zero_()
            if need_w:
                dw.zero_()
        if need_w:
            if gl is not None:
                # d(-log sum_k w_k)/dw_j, summed over the queries, in float64.
                wsum = w.detach().to(torch.float64).sum()
                dw = dw - (gl.detach().to(torch.float64).sum() / wsum).to(cdt)
            gw = dw.to(w.dtype)
    return gx, gy, gw
