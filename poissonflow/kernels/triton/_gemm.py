"""Triton forward of the Poisson field with r2 in GEMM form and a certified error
(docs/DESIGN.md, "A tensor-core field with a certified error").

(Over 600 lines, kept whole: the bound derived below, the pre-pass, the kernel that relies on
the bound and its launcher are one argument; split, the proof would sit apart from its code.)

Per tile of BLOCK_M queries x BLOCK_N charges:

    q_ij   = nx_i + ny_j - 2 x_i . y_j          tl.dot at an explicit precision (PRECISIONS)
    r2g_ij = q_ij + e_i^2
    err_ij = C_S (nx_i + ny_j)                  |q_ij - |x_i - y_j|^2| <= err_ij

with nx, ny the squared norms (float64 on the host, rounded to float32). From the bound, the
logit s = log2 w - h log2 r2 (h = p/2) lies in [s_lo, s_hi]:

    t      = err / r2g
    s_hi   = s_g + h t / ((1 - t) ln 2)          (-log(1 - t) <= t / (1 - t));  when
                                                 r2g - err <= tiny, s_hi = log2 w - h log2 tiny,
                                                 the largest logit the floor allows
    s_lo   = s_g - h t / ln 2                    (log(1 + t) <= t); where s_hi is capped,
                                                 s_lo = log2 w - h log2 (r2g + err)

m_lo, the row's largest lower bound (a GEMM-form pre-pass over all charges, then raised by the
exact logits as they are recomputed), is a lower bound of the row's largest logit. A live
pair is *near* when s_hi >= m_lo - K (margin K in log2 units). Near pairs are kept:
recomputed exactly by direct differences (float32) unless their logit interval is narrower
than `tight` (then the GEMM value is kept, an error of at most (2^s_hi - 2^s_lo)).
Pairs that are not near are dropped: their weight is at most 2^(s_hi - m_lo) <= 2^-K times
the row's largest, and they are bounded, not summed (the online softmax starts from m_lo - K,
so that such a bound is never lost to a rescale from -inf). v is accumulated over the kept pairs by
direct differences, sum p (y - x), as the exact kernel does (docs/DESIGN.md, "The field operator"),
in
tiles that hold at least one kept pair (the other tiles skip the D sweep).

The certificate of row i, in units of the kept sum Z' = sum_kept 2^s:

    E_Z = sum_dropped 2^s_hi + sum_kept-approx (2^s_hi - 2^s_lo)
    E_N = the same terms times |x - y|_hi = sqrt(q + err)
    rz = E_Z / Z',   |v' - v| <= (E_N / Z' + |v'| rz) / (1 - rz),   |lse' - lse| <= rz / (1 - rz)

(natural-log units for lse). These bound the difference from the same field computed with the
exact r2: the float32 rounding of the exactly computed pairs is the exact kernel's own (the
tolerance of poissonflow.testing covers it). A row whose bound exceeds tau_v |v'| or tau_ls is
recomputed by the exact kernel's tile (_field_tile of _field_fwd) inside the same launch
(FALLBACK), and its certificate is then 0.

The rounding bound (docs/DESIGN.md, "A tensor-core field with a certified error"), for unit roundoff
u of the operands (TF32
2^-11, bf16 2^-8; the operands are rounded to nearest in the kernel by a bit mask, so the
tensor cores' own truncation of float32 inputs never applies, and products of two rounded
operands are exact in float32), u32 = 2^-24 and S = |x|^2 + |y|^2:

    2 |g - x.y| <= (eps_prod + gamma (1 + eps_sum)) S,   |x_k y_k| summed <= |x||y| <= S / 2
      eps_prod = 2u + u^2 (operand rounding), eps_sum = 2u + u^2,
      gamma    = 2 n u32 / (1 - 2 n u32) for n accumulated products, each addition rounded
                 by at most one float32 ulp (truncation, as tensor cores may), n = D
    tf32x3: a = a_hi + a_lo + e with a_hi, a_lo TF32 (round to nearest), |e| <= u^2 |a|;
      a b - (a_hi b_hi + a_hi b_lo + a_lo b_hi) <= 3.01 u^2 |a b|: eps_prod = 3.01 u^2,
      eps_sum = 5u, n = 3D
    ieee: eps_prod = eps_sum = 0, n = D
    + 5 u32 S (norms rounded to float32, nx + ny, q = S - 2g with |q| <= 2S)

    C_S = (eps_prod + gamma (1 + eps_sum) + 5 u32) (1 + 2^-16)

so err = c u S with c = C_S / u: for TF32 c = 2 + 2^-11 + D 2^-12 + 5 2^-13 (about 2.03 at
D = 129, 2.13 at D = 513). The factor 1 + 2^-16 covers the float32 evaluation of err and t.
The last rounding, r2g = q + e^2, is one float32 ulp relative to r2 itself: the exact kernel
rounds its own r2 + e^2 the same way, and that relative error is the tolerance's (as it is
for the exact kernel), not the certificate's.

Margin and tolerances: K = log2(B) + log2(4 / tau_v) by default, so that the dropped pairs'
share of Z' is at most tau_v / 4 whatever the data; `tight` = tau_v / (4 ln 2) bounds the
kept-approximate pairs' share by tau_v / 4; tau_v = tau_ls = a tenth of the float32 tolerance
of poissonflow.testing (the exact kernel's own rounding needs the rest at D = 513).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._field_fwd import (
    INTERPRETED,
    _accumulate_differences,
    _field_tile,
    _finish_rows,
    _sq_dist,
    _store_field,
    _zero_rows,
    charge_terms,
    index_rows,
    launch_guard,
    log_scale_from_lse2,
    size_class,
    softening_sq,
    wrap_triton,
)

__all__ = ["PRECISIONS", "rounding_constants", "gemm_field_forward", "gemm_r2_bounds", "GemmResult"]

# precision name -> (kernel code, operand unit roundoff u)
PRECISIONS = {
    "ieee": (0, 0.0),
    "tf32": (1, 2.0**-11),
    "tf32x3": (2, 2.0**-11),
    "bf16": (3, 2.0**-8),
}
U32 = 2.0**-24
_BF16_OPERANDS = tl.constexpr(not INTERPRETED)
LN2 = math.log(2.0)
# Relative error allowed for one GPU exp2 (ex2.approx.ftz.f32: about 2^-22) and for the float32
# products that form a certificate term: each term is inflated by (1 + EXP2_REL) per factor
# (docs/DESIGN.md, "The certificate under approximate exp2").
EXP2_REL = 2.0**-20
_EXP2_SAFE = tl.constexpr(1.0 + EXP2_REL)
_WIDTH_SAFE = tl.constexpr(LN2 * (1.0 + EXP2_REL))
# The r2-bounds helper's tiles (a 1-D grid over them: no grid-y limit of 65,535) and warps
# (8: 4 spilled 36 bytes on sm_80).
R2_BLOCK = 16 if INTERPRETED else 64
R2_BLOCK_K = 16 if INTERPRETED else 32
R2_WARPS = 8

# (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages) on the GPU: BLOCK_K is the dot's
# reduction chunk, BLOCK_D the direct-difference chunk of the recomputed tiles ([BLOCK_D,
# BLOCK_M, BLOCK_N] partial sums, as the exact kernel's). Compiled offline for sm_80 and sm_90
# (python -m poissonflow.kernels.triton.build_budget, Triton's ptxas, no GPU; not yet run or timed
# on
# one): none spills at TF32. The first also compiles without spills at every other precision
# and is the only one they get (prune_gemm_configs); the 64-row shapes with BLOCK_D = 1 that
# used wgmma spilled 72-1,660 bytes on sm_80 and sm_90.
_GPU_SHAPES = (
    (32, 32, 16, 2, 8, 2),
    (32, 32, 32, 2, 8, 2),
    (64, 32, 32, 2, 8, 2),
)
# The interpreter: one config whose tiles the tests' inputs span several times (tl.dot needs
# every side >= 16).
_INTERPRETER_SHAPE = (16, 16, 16, 32, 1, 1)


def _configs():
    shapes = (_INTERPRETER_SHAPE,) if INTERPRETED else _GPU_SHAPES
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd},
            num_warps=nw,
            num_stages=ns,
        )
        for bm, bn, bk, bd, nw, ns in shapes
    ]


def prune_gemm_configs(configs, named_args, **kwargs):
    """TF32 (the default) tunes over every config; the other precisions get the first, the one
    that compiles without spills for all of them. With torch.use_deterministic_algorithms(True)
    only the first, as for the exact kernels (no timing decides the summation order)."""
    if kwargs.get("PREC", PRECISIONS["tf32"][0]) != PRECISIONS["tf32"][0]:
        return configs[:1]
    if torch.are_deterministic_algorithms_enabled():
        return configs[:1]
    return configs


def rounding_constants(precision: str, D: int) -> float:
    """C_S of the module docstring: |q - |x - y|^2| <= C_S (|x|^2 + |y|^2)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    u = PRECISIONS[precision][1]
    if precision == "tf32x3":
        eps_prod, eps_sum, n = 3.01 * u * u, 5.0 * u, 3 * D
    else:
        eps_prod, eps_sum, n = 2 * u + u * u, 2 * u + u * u, D
    gamma = 2 * n * U32 / (1 - 2 * n * U32)
    safety = 1 + 2.0**-16
    return (eps_prod + gamma * (1 + eps_sum) + 5 * U32) * safety


# --------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------


@triton.jit
def _round_nearest(x, DROP: tl.constexpr):
    """x (float32) rounded to nearest, ties to even, keeping 23 - DROP mantissa bits (DROP = 13:
    TF32, 16: bfloat16), by integer arithmetic on the bit pattern (the same on the GPU and in
    the interpreter, whose own float32 -> bfloat16 conversion truncates)."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + ((1 << (DROP - 1)) - 1) + ((b >> DROP) & 1)) & (-(1 << DROP))
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _dot_prec(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b at precision PREC (PRECISIONS): operands rounded here, products exact."""
    if PREC == 0:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif PREC == 1:
        acc = tl.dot(_round_nearest(a, 13), _round_nearest(b, 13), acc, input_precision="tf32")
    elif PREC == 2:
        ah = _round_nearest(a, 13)
        bh = _round_nearest(b, 13)
        al = _round_nearest(a - ah, 13)  # a - ah is exact (Sterbenz)
        bl = _round_nearest(b - bh, 13)
        acc = tl.dot(al, bh, acc, input_precision="tf32")
        acc = tl.dot(ah, bl, acc, input_precision="tf32")
        acc = tl.dot(ah, bh, acc, input_precision="tf32")
    elif _BF16_OPERANDS:
        acc = tl.dot(
            _round_nearest(a, 16).to(tl.bfloat16), _round_nearest(b, 16).to(tl.bfloat16), acc
        )
    else:
        # The interpreter's dot mishandles bfloat16 operands; the rounded values are exact in
        # float32, so the float32 dot of them is the product a bf16 tensor core forms.
        acc = tl.dot(_round_nearest(a, 16), _round_nearest(b, 16), acc, input_precision="ieee")
    return acc


@triton.jit
def _gemm_q(
    x_rows,
    mask_m,
    Y,
    cols,
    mask_n,
    D,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """x_i . y_j of a [BLOCK_M, BLOCK_N] tile at precision PREC, over BLOCK_K chunks of D."""
    dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    y_cols = Y + cols.to(tl.int64)[None, :] * D
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        in_k = kk < D
        a = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(y_cols + kk[:, None], mask=in_k[:, None] & mask_n[None, :], other=0.0)
        dot = _dot_prec(a.to(tl.float32), b.to(tl.float32), dot, PREC)
    return dot


@triton.jit
def _pair_error_bound(s_hi, width, m_ref, approx, dropped):
    """The certificate's term of each pair, in units of 2^m_ref, safe under approximate exp2:
    dropped pairs 2^(s_hi - m_ref), kept-approximate ones 2^s_hi - 2^s_lo bounded from above by
    2^s_hi (1 - 2^-width) <= 2^s_hi width ln 2 (width = s_hi - s_lo = d_hi + d_lo, formed without
    cancellation), each exponential and product inflated by 1 + EXP2_REL. The difference of two
    approximate exponentials (2^s_hi - 2^s_lo, 2.5e-6 apart, each off by up to ~2.4e-7) could
    understate the term by ~20%."""
    w_hi = tl.exp2(tl.where(approx | dropped, s_hi, float("-inf")) - m_ref[:, None]) * _EXP2_SAFE
    rel = tl.minimum(width * _WIDTH_SAFE, 1.0)
    return tl.where(approx, w_hi * rel, tl.where(dropped, w_hi, 0.0))


@triton.jit
def _gemm_tile(
    x_rows,
    mask_m,
    nx,
    Y,
    NY,
    LW,
    EXCL,
    excl,
    cols,
    mask_n,
    D,
    NEG: tl.constexpr,
    cdt: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """What both passes of the GEMM-form forward need of one tile of charges: q = |x|^2 + |y|^2
    - 2 x.y (GEMM form, no softening), s_norm = |x|^2 + |y|^2 (the rounding bound's scale), the
    log2 weights lw (1, BLOCK_N), and the live pairs (in range, non-zero weight, not
    excluded)."""
    dot = _gemm_q(x_rows, mask_m, Y, cols, mask_n, D, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    ny = tl.load(NY + cols, mask=mask_n, other=0.0)
    s_norm = nx[:, None] + ny[None, :]
    if LW is not None:
        lw = tl.load(LW + cols, mask=mask_n, other=NEG)[None, :]
    else:
        lw = tl.zeros([1, BLOCK_N], cdt)
    live = mask_n[None, :] & (lw > NEG) & mask_m[:, None]
    if EXCL is not None:
        live = live & (cols[None, :] != excl[:, None])
    return s_norm - 2.0 * dot, s_norm, lw, live


@triton.jit
def _r2_bounds_kernel(
    X,
    Y,
    NX,
    NY,
    R2G,
    ERR,
    N,
    B,
    D,
    c_s,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(q = nx + ny - 2 x.y, C_S (nx + ny)) of every pair, for tests and bench/gpu_check.py.
    One program per tile on a 1-D grid (a grid's y extent stops at 65,535 tiles)."""
    tiles_n = tl.cdiv(B, BLOCK_N)
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < N
    mask_n = cols < B
    dot = _gemm_q(
        X + rows[:, None] * D, mask_m, Y, cols, mask_n, D, PREC, BLOCK_M, BLOCK_N, BLOCK_K
    )
    nx = tl.load(NX + rows, mask=mask_m, other=0.0)
    ny = tl.load(NY + cols, mask=mask_n, other=0.0)
    s = nx[:, None] + ny[None, :]
    offs = rows[:, None] * B + cols[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(R2G + offs, s - 2.0 * dot, mask=mask)
    tl.store(ERR + offs, c_s * s, mask=mask)


@triton.autotune(
    configs=_configs(),
    key=["D", "size_class", "PREC", "RECOMPUTE", "FALLBACK"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
    cache_results=True,
)
@triton.jit(do_not_specialize=["size_class"])
def _gemm_fwd_kernel(
    X,
    Y,
    NX,
    NY,
    LW,
    EXCL,
    E2,
    half_p,
    tiny,
    c_s,
    margin,
    tight,
    tau_v,
    tau_ls,
    ACC,
    V,
    LSE2,
    CERT,
    STATS,
    N,
    B,
    D,
    e2_stride,
    size_class,
    PREC: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    FALLBACK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_M queries: v, lse2 (log2 units), the certificate CERT (N, 2) =
    (bound on |v - v_exact|, on |lse - lse_exact| in natural-log units) and STATS (N, 6) int32 =
    (pairs recomputed, pairs kept, fell back, and on each block's first row: charge tiles,
    tiles recomputed, tiles accumulated). The parameters half_p ... tau_ls are float32 scalars
    (kernel arguments, no device buffer to fill per call); size_class keys the autotuner."""
    cdt: tl.constexpr = tl.float32
    NEG: tl.constexpr = float("-inf")
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < N
    # tl.cast: the interpreter passes Python floats through as they are
    half_p = tl.cast(half_p, cdt)
    tiny = tl.cast(tiny, cdt)
    c_s = tl.cast(c_s, cdt)
    margin = tl.cast(margin, cdt)
    tight = tl.cast(tight, cdt)
    tau_v = tl.cast(tau_v, cdt)
    tau_ls = tl.cast(tau_ls, cdt)
    s_cap_rel = -half_p * tl.log2(tiny)  # the largest logit the r2 floor allows, before log2 w
    inv_ln2 = 1.4426950408889634
    e2 = tl.load(E2 + rows * e2_stride, mask=mask_m, other=0.0)
    nx = tl.load(NX + rows, mask=mask_m, other=0.0)
    x_rows = X + rows[:, None] * D
    acc_rows = ACC + rows[:, None] * D
    _zero_rows(acc_rows, mask_m, D, BLOCK_M, BLOCK_D)
    if EXCL is not None:
        excl = tl.load(EXCL + rows, mask=mask_m, other=-1)
    else:
        excl = tl.full([BLOCK_M], -1, tl.int64)  # unused: _gemm_tile reads it only with EXCL
    m = tl.full([BLOCK_M], NEG, cdt)
    # Pre-pass, GEMM form only: the row's largest lower bound over all charges, so that which
    # pairs are near does not depend on the charges' order (a running maximum would keep every
    # pair of the tiles before the first close one, e.g. for points sorted by cluster).
    m_lo = tl.full([BLOCK_M], NEG, cdt)
    for j0 in range(0, B, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        mask_n = cols < B
        q, s_norm, lw, live = _gemm_tile(
            x_rows,
            mask_m,
            nx,
            Y,
            NY,
            LW,
            EXCL,
            excl,
            cols,
            mask_n,
            D,
            NEG,
            cdt,
            PREC,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        r2_up = q + e2[:, None] + c_s * s_norm
        s_lo = tl.where(live, lw - half_p * tl.log2(tl.maximum(r2_up, tiny)), NEG)
        m_lo = tl.maximum(m_lo, tl.max(s_lo, axis=1))
    # The online softmax starts at m_lo - K, not -inf: a dropped pair (s_hi < m_lo - K) met
    # before the first kept one is then bounded in units of a finite reference, which later
    # rescales (alpha) keep; from -inf they would be multiplied by alpha = 0.
    m = tl.where(m_lo > NEG, m_lo - margin, NEG)
    l = tl.zeros([BLOCK_M], cdt)
    ez = tl.zeros([BLOCK_M], cdt)
    en = tl.zeros([BLOCK_M], cdt)
    n_redo = tl.zeros([BLOCK_M], tl.int32)
    n_kept = tl.zeros([BLOCK_M], tl.int32)
    tiles = 0
    tiles_redo = 0
    tiles_acc = 0
    for j0 in range(0, B, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        mask_n = cols < B
        q, s_norm, lw, live = _gemm_tile(
            x_rows,
            mask_m,
            nx,
            Y,
            NY,
            LW,
            EXCL,
            excl,
            cols,
            mask_n,
            D,
            NEG,
            cdt,
            PREC,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        err = c_s * s_norm
        r2g = q + e2[:, None]
        r2g_f = tl.maximum(r2g, tiny)
        s_g = lw - half_p * tl.log2(r2g_f)
        unbounded = (r2g - err) <= tiny
        t = tl.where(unbounded, 0.0, err / r2g_f)
        d_hi = half_p * inv_ln2 * t / (1.0 - t)
        d_lo = half_p * inv_ln2 * t
        s_hi = tl.where(unbounded, lw + s_cap_rel, s_g + d_hi)
        # where the interval reaches the floor, t is not small: the lower bound from r2g + err
        s_lo = tl.where(unbounded, lw - half_p * tl.log2(tl.maximum(r2g + err, tiny)), s_g - d_lo)
        s_hi = tl.where(live, s_hi, NEG)
        s_lo = tl.where(live, s_lo, NEG)
        m_lo_t = tl.maximum(m_lo, tl.max(s_lo, axis=1))
        near = live & (s_hi >= (m_lo_t - margin)[:, None])
        approx = near & (~unbounded) & ((d_hi + d_lo) <= tight)
        s_use = s_g
        redo = near & (~approx)
        if RECOMPUTE:
            if tl.max(tl.max(redo.to(tl.int32), axis=1), axis=0) > 0:
                y_rows = Y + cols.to(tl.int64)[:, None] * D
                r2e = _sq_dist(
                    tl.trans(x_rows),
                    mask_m,
                    tl.trans(y_rows),
                    mask_n,
                    D,
                    cdt,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_D,
                )
                s_e = lw - half_p * tl.log2(tl.maximum(r2e + e2[:, None], tiny))
                s_use = tl.where(redo, s_e, s_g)
                tiles_redo += 1
        else:
            # Plain GEMM form for the near pairs (for tests that show what the recomputation
            # saves): they are kept approximate and bounded like the tight ones.
            approx = near
            redo = near & (~near)
        s_kept = tl.where(near, s_use, NEG)
        m_lo = tl.maximum(m_lo_t, tl.max(tl.where(redo, s_use, NEG), axis=1))
        m_new = tl.maximum(m, tl.max(s_kept, axis=1))
        m_ref = tl.where(m_new == NEG, 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s_kept - m_ref[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        # What the pairs not recomputed can change, in units of 2^m_ref. Only the lanes the
        # select below keeps are exponentiated (the others at -inf, 2^-inf = 0): a recomputed
        # pair's interval can reach far above m_ref (at the r2 floor, s_hi = log2 w + s_cap_rel),
        # and its 2^(s_hi - m_ref) would overflow to inf only to be dropped.
        dropped = live & (~near)
        # the interval's width: d_hi + d_lo as formed (s_hi - s_lo would cancel), or where it
        # reaches the floor (plain GEMM form only: such pairs are recomputed otherwise) s_hi - s_lo
        wide = approx & unbounded
        width = tl.where(wide, tl.where(wide, s_hi, 0.0) - tl.where(wide, s_lo, 0.0), d_hi + d_lo)
        e_pair = _pair_error_bound(s_hi, width, m_ref, approx, dropped)
        dist_hi = tl.sqrt(tl.maximum(q + err, 0.0)) * (1.0 + 2.0**-20)
        ez = ez * alpha + tl.sum(e_pair, axis=1)
        en = en * alpha + tl.sum(tl.where(e_pair > 0.0, e_pair * dist_hi, 0.0), axis=1)
        m = m_new
        n_redo += tl.sum(redo.to(tl.int32), axis=1)
        n_kept += tl.sum(near.to(tl.int32), axis=1)
        tiles += 1
        # acc += sum_j p_ij (y_j - x_i), by differences, only in tiles with a kept pair (in the
        # others every p is 0 and m did not move, so alpha = 1).
        if tl.max(tl.max(near.to(tl.int32), axis=1), axis=0) > 0:
            tiles_acc += 1
            y_rows = Y + cols.to(tl.int64)[:, None] * D
            _accumulate_differences(
                acc_rows, x_rows, y_rows, mask_m, mask_n, p, alpha, D, cdt, BLOCK_D
            )
            tl.debug_barrier()
    neg_inv, lse2 = _finish_rows(m, l)
    vsq = tl.zeros([BLOCK_M], cdt)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = mask_m[:, None] & (dims < D)[None, :]
        vv = tl.load(acc_rows + dims[None, :], mask=mask, other=0.0) * neg_inv[:, None]
        vsq += tl.sum(vv * vv, axis=1)
    vnorm = tl.sqrt(vsq)
    alive = l > 0.0
    l_safe = tl.where(alive, l, 1.0)
    rz = ez / l_safe
    below = rz < 1.0
    one_m = tl.where(below, 1.0 - rz, 1.0)
    b_v = tl.where(below, (en / l_safe + vnorm * rz) / one_m, float("inf"))
    b_ls = tl.where(below, rz / one_m, float("inf"))
    b_v = tl.where(alive, tl.where(b_v == b_v, b_v, float("inf")), 0.0)  # NaN: no bound
    b_ls = tl.where(alive, tl.where(b_ls == b_ls, b_ls, float("inf")), 0.0)
    ok = (b_v <= tau_v * tl.maximum(vnorm - b_v, 0.0)) & (b_ls <= tau_ls)
    fell = mask_m & (~ok)
    if FALLBACK:
        if tl.max(fell.to(tl.int32), axis=0) > 0:
            # Rows the certificate does not cover: the exact kernel's tile on those rows only
            # (its scratch rows are the same; the other rows are left as they are).
            m2, l2 = _field_tile(
                X,
                Y,
                LW,
                EXCL,
                ACC,
                rows,
                fell,
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
            m = tl.where(fell, m2, m)
            l = tl.where(fell, l2, l)
            neg_inv, lse2 = _finish_rows(m, l)
            b_v = tl.where(fell, 0.0, b_v)
            b_ls = tl.where(fell, 0.0, b_ls)
    else:
        fell = fell & (~fell)
    tl.store(LSE2 + rows, lse2, mask=mask_m)
    tl.store(CERT + rows * 2, b_v, mask=mask_m)
    tl.store(CERT + rows * 2 + 1, b_ls, mask=mask_m)
    tl.store(STATS + rows * 6, n_redo, mask=mask_m)
    tl.store(STATS + rows * 6 + 1, n_kept, mask=mask_m)
    tl.store(STATS + rows * 6 + 2, fell.to(tl.int32), mask=mask_m)
    # every row is written (0 but on the block's first row): autotuning runs other block sizes
    # first, whose first rows differ
    first = tl.arange(0, BLOCK_M) == 0
    zero_i = tl.zeros([BLOCK_M], tl.int32)
    tl.store(STATS + rows * 6 + 3, tl.where(first, zero_i + tiles, 0), mask=mask_m)
    tl.store(STATS + rows * 6 + 4, tl.where(first, zero_i + tiles_redo, 0), mask=mask_m)
    tl.store(STATS + rows * 6 + 5, tl.where(first, zero_i + tiles_acc, 0), mask=mask_m)
    _store_field(ACC, V, rows, mask_m, neg_inv, D, cdt, BLOCK_D)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


class GemmResult(tuple):
    """(v, log_scale, lse2, v_c, certificate, stats) of gemm_field_forward, with the
    statistics as properties (the fraction of pairs recomputed, of tiles touched, ...)."""

    __slots__ = ()

    def __new__(cls, *items):
        return super().__new__(cls, items)

    v = property(lambda self: self[0])
    log_scale = property(lambda self: self[1])
    lse2 = property(lambda self: self[2])
    v_c = property(lambda self: self[3])
    certificate = property(lambda self: self[4])
    stats = property(lambda self: self[5])

    def summary(self, B: int) -> dict:
        """Fractions over the N x B pairs (recomputed exactly, kept), over the rows (fell back
        to the exact kernel), over the charge tiles (recomputed, accumulated); the largest
        certified bounds."""
        st = self.stats.to("cpu", torch.int64)
        N = st.shape[0]
        pairs = max(N * B, 1)
        tiles = max(int(st[:, 3].sum()), 1)
        cert = self.certificate.detach().to("cpu", torch.float64)
        return {
            "pairs_recomputed": int(st[:, 0].sum()) / pairs,
            "pairs_kept": int(st[:, 1].sum()) / pairs,
            "rows_fell_back": int(st[:, 2].sum()) / max(N, 1),
            "tiles_recomputed": int(st[:, 4].sum()) / tiles,
            "tiles_accumulated": int(st[:, 5].sum()) / tiles,
            "max_bound_v": float(cert[:, 0].max()) if N else 0.0,
            "max_bound_log_scale": float(cert[:, 1].max()) if N else 0.0,
        }


def default_margin(B: int, tau_v: float) -> float:
    """K = log2(B) + log2(4 / tau_v): the dropped pairs then hold at most tau_v / 4 of Z'."""
    return math.log2(max(B, 1)) + math.log2(4.0 / tau_v)


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Squared row norms in float64, rounded once to float32 (error <= u32 |t|^2)."""
    return t.detach().to(torch.float64).pow(2).sum(1).to(torch.float32).contiguous()


def gemm_field_forward(
    x,
    y,
    w,
    power,
    eps,
    exclude=None,
    eps_rows=None,
    *,
    precision="tf32",
    margin=None,
    tight=None,
    tau_v=1e-5,
    tau_ls=1e-5,
    recompute=True,
    fallback=True,
) -> GemmResult:
    """The certified GEMM-form forward (module docstring) on float16/bfloat16/float32 inputs,
    computed in float32: returns GemmResult(v, log_scale, lse2, v_c, certificate (N, 2),
    stats (N, 6) int32); lse2 and v_c as _field_fwd.field_forward_launch returns them.

    precision: "tf32" (default), "tf32x3", "bf16" operands, or "ieee" (float32 products).
    margin: K in log2 units (default_margin); tight: the logit-interval width below which a
    kept pair keeps its GEMM value (default tau_v / (4 ln 2)); tau_v, tau_ls: the certified
    bounds a row must meet (relative to |v|, absolute on log_scale), else `fallback` recomputes
    it with the exact kernel. recompute=False keeps the near pairs in plain GEMM form (still
    bounded): for tests of what the recomputation saves.
    """
    if x.dtype == torch.float64:
        raise TypeError(
            "the GEMM-form kernel computes in float32; float64 input goes to the "
            "exact kernel (poissonflow.kernels.triton_gemm.field_forward does so)"
        )
    prec_code = PRECISIONS[precision][0] if precision in PRECISIONS else None
    if prec_code is None:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    N, D = x.shape
    B = y.shape[0]
    cdt = torch.float32
    v = torch.empty((N, D), dtype=x.dtype, device=x.device)
    lse2 = torch.empty((N,), dtype=cdt, device=x.device)
    cert = torch.zeros((N, 2), dtype=cdt, device=x.device)
    stats = torch.zeros((N, 6), dtype=torch.int32, device=x.device)
    lw, log_wsum = charge_terms(y, w, cdt)
    acc = v if x.dtype == cdt else torch.empty((N, D), dtype=cdt, device=x.device)
    v_c = None if acc is v else acc
    if N == 0:
        return GemmResult(
            v, torch.empty((0,), dtype=x.dtype, device=x.device), lse2, v_c, cert, stats
        )
    x = x.detach().contiguous()
    y = y.detach().contiguous()
    e2, e2_stride = softening_sq(x, eps, eps_rows, cdt)
    c_s = rounding_constants(precision, D)
    K = default_margin(B, tau_v) if margin is None else float(margin)
    tight = tau_v / (4 * LN2) if tight is None else float(tight)
    # p/2 and the r2 floor as scalar_params gives them, as float32 kernel arguments (no host
    # to device copy per call: CUDA-graph safe)
    half_p, tiny = 0.5 * float(power), torch.finfo(x.dtype).tiny

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]),)

    with launch_guard(x):
        wrap_triton(_gemm_fwd_kernel)[grid](
            x,
            y,
            _norms(x),
            _norms(y),
            lw,
            index_rows(exclude),
            e2,
            half_p,
            tiny,
            c_s,
            K,
            tight,
            float(tau_v),
            float(tau_ls),
            acc,
            v,
            lse2,
            cert,
            stats,
            N,
            B,
            D,
            e2_stride,
            size_class(N, B),
            PREC=prec_code,
            RECOMPUTE=bool(recompute),
            FALLBACK=bool(fallback),
        )
    return GemmResult(v, log_scale_from_lse2(lse2, log_wsum, x.dtype), lse2, v_c, cert, stats)


def gemm_r2_bounds(x, y, precision="tf32"):
    """(q, err) of every pair (N x B, float32): q = |x|^2 + |y|^2 - 2 x.y with the kernel's dot
    at `precision` and err its rounding bound, |q - |x - y|^2| <= err (tests, gpu_check)."""
    N, D = x.shape
    B = y.shape[0]
    x = x.detach().contiguous()
    y = y.detach().contiguous()
    q = torch.empty((N, B), dtype=torch.float32, device=x.device)
    err = torch.empty((N, B), dtype=torch.float32, device=x.device)
    c_s = rounding_constants(precision, D)
    with launch_guard(x):
        _r2_bounds_kernel[r2_grid(N, B)](
            x,
            y,
            _norms(x),
            _norms(y),
            q,
            err,
            N,
            B,
            D,
            c_s,
            PREC=PRECISIONS[precision][0],
            BLOCK_M=R2_BLOCK,
            BLOCK_N=R2_BLOCK,
            BLOCK_K=R2_BLOCK_K,
            num_warps=R2_WARPS,
        )
    return q, err


def r2_grid(N: int, B: int) -> tuple[int]:
    """The r2-bounds launch grid: one program per R2_BLOCK x R2_BLOCK tile, on axis 0 only."""
    return (triton.cdiv(N, R2_BLOCK) * triton.cdiv(B, R2_BLOCK),)
