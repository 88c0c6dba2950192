"""Triton forward of the Poisson field, and the tile primitive the flow kernels reuse.

For a tile of BLOCK_M queries against all charges (docs/DESIGN.md, "The field operator"):

    r2_ij = max(sum_k (x_ik - y_jk)^2 + e_i^2, tiny)      direct differences, never expanded;
                                                          tiny of the input dtype
    s_ij  = log2 w_j - (p/2) log2 r2_ij                   (-inf: zero weight, excluded, padding)
    online softmax in base 2 over charge tiles: running max m_i, running sum l_i,
    acc_i = sum_j 2^(s_ij - m_i) (y_j - x_i)              again by differences
    v_i   = -acc_i / l_i,   lse2_i = m_i + log2 l_i

Why the accumulator lives in a global scratch buffer. D is a run-time value (1 to 513 and more)
while a Triton register tensor needs a power-of-two shape fixed at compile time and cannot be
sliced. Holding acc in registers would mean padding D to the next power of two (256 columns for
D = 129: twice the accumulation work) and a [BLOCK_N, BLOCK_M, 256] broadcast per charge tile.
Instead each program owns rows [BLOCK_M, D] of a scratch buffer (the output itself when the
output dtype is the compute dtype) and read-modify-writes them in BLOCK_D column chunks once per
charge tile. That traffic is BLOCK_M * D * 8 bytes per BLOCK_M * BLOCK_N * D * 4 flops, stays in
L1/L2 (the tile's rows are ~16-33 KB at BLOCK_M = 32-64, D = 129), and costs no padding beyond
the last BLOCK_D chunk. A barrier after each charge tile makes the writes of one thread visible
to the others of the program before the rows are read again.

Both D sweeps are [BLOCK_D or BLOCK_N, BLOCK_M, ...] broadcasts reduced over their first axis:
Triton's default layouts spread threads over the trailing axes, so these reductions stay inside
each thread (checked in the TTGIR for sm_90) instead of costing cross-lane shuffles.

Numbers are computed in the compute dtype: float32 for float16/bfloat16/float32 inputs (loads
are upcast inside the kernel), float64 for float64 inputs. The compute dtype reaches the kernel
as the element type of the scalar-parameter tensor, and the parameters p/2 and the r2 floor come
as tensor elements rather than Python floats, which Triton would round to float32.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

try:
    # Launching through wrap_triton inside a torch.library.triton_op lets torch.compile see the
    # kernels (and torch find them by name for its caches).
    from torch.library import wrap_triton
except ImportError:  # torch < 2.6

    def wrap_triton(kernel):
        return kernel


# How this module's kernels were decorated: under TRITON_INTERPRET=1 they run on CPU tensors
# through the numpy interpreter; otherwise they are compiled for the GPU.
INTERPRETED = bool(triton.knobs.runtime.interpret)

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# Autotuning
# --------------------------------------------------------------------------------------------

# GPU configs (BLOCK_M, BLOCK_N, BLOCK_D, num_warps). The [BLOCK_D, BLOCK_M, BLOCK_N] partial sums
# of r2 are what occupies registers; these are the shapes that compile for sm_80 and sm_90 with
# no spills (python -m poissonflow.kernels.triton.build_budget, run by
# tests/test_gpu_build_budget.py).
# float64 computation (float64 input) has its own list: twice the registers per value.
_GPU_SHAPES = (
    (32, 32, 4, 4),
    (32, 32, 8, 4),
    (64, 32, 8, 8),
    (32, 64, 8, 8),
    (64, 64, 4, 8),
)
_GPU_SHAPES_F64 = ((32, 32, 4, 4), (64, 32, 2, 8), (32, 64, 2, 8))
# The interpreter runs each tile as numpy arrays: a single config (autotuning would need a GPU
# benchmarker) with tiles small enough that the tests' 70-point inputs span several of them.
_INTERPRETER_SHAPE = (16, 16, 32, 1)


def make_configs(
    shapes=None, f64_shapes=None, *, row_block: str = "BLOCK_M", col_block: str = "BLOCK_N"
):
    """triton.Config list for the kernels: `shapes` for float32 computation, `f64_shapes` for
    float64 (each config carries the compute dtypes it serves in .compute_dtypes, which
    prune_configs reads); the interpreter gets exactly one, for both."""
    if INTERPRETED:
        shapes, f64_shapes = (_INTERPRETER_SHAPE,), (_INTERPRETER_SHAPE,)
    elif shapes is None:
        shapes, f64_shapes = _GPU_SHAPES, _GPU_SHAPES_F64
    out = {}
    for shape_list, cdt in ((shapes, torch.float32), (f64_shapes or shapes, torch.float64)):
        for shape in shape_list:
            out.setdefault(shape, []).append(cdt)
    configs = []
    for (bm, bn, bd, nw), cdts in out.items():
        c = triton.Config({row_block: bm, col_block: bn, "BLOCK_D": bd}, num_warps=nw, num_stages=1)
        c.compute_dtypes = tuple(cdts)
        configs.append(c)
    return configs


def configs_for(configs, cdt: torch.dtype):
    """The configs of a kernel that serve compute dtype cdt (make_configs)."""
    return [c for c in configs if cdt in getattr(c, "compute_dtypes", (cdt,))]


def prune_configs(configs, named_args, **kwargs):
    """Keeps the configs of the launch's compute dtype (the element type of SCAL) and drops
    those whose BLOCK_D exceeds the padded dimension (pure waste for small D).

    With torch.use_deterministic_algorithms(True) only the first config is kept, so the block
    sizes (and hence the summation order) do not depend on a timing measurement.
    """
    if len(configs) == 1:
        return configs
    configs = configs_for(configs, named_args["SCAL"].dtype)
    if torch.are_deterministic_algorithms_enabled():
        return configs[:1]
    d_pad = max(4, triton.next_power_of_2(int(named_args["D"])))
    kept = [c for c in configs if c.kwargs["BLOCK_D"] <= d_pad]
    return kept or configs[:1]


def size_class(N: int, B: int) -> int:
    """The autotuning size bucket of a launch: ceil(log2) of N and of B in steps of 2 (factor-4
    buckets), packed in one integer. A configuration tuned on a 70-point test call is not
    reused (nor read back from the disk cache) at N = B = 65,536."""

    def bucket(n):
        return min((max(int(n), 1) - 1).bit_length() // 2, 31)

    return bucket(N) * 32 + bucket(B)


def autotune(configs, restore_value=(), key_extra=()):
    """triton.autotune keyed on D, the size bucket (size_class) and key_extra (the autotuner
    adds the dtypes, hence which optional arguments are present). cache_results keeps a
    machine's choice across processes: results are bit-identical run to run as long as the
    chosen block sizes are. Kernels that update a buffer in place name it in restore_value."""
    return triton.autotune(
        configs=configs,
        key=["D", "size_class", *key_extra],
        prune_configs_by={"early_config_prune": prune_configs},
        restore_value=list(restore_value),
        cache_results=True,
    )


# --------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------


@triton.jit
def _zero_rows(PTR_ROWS, mask_rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Zeroes the scratch rows (torch.empty may hold NaN, which 0 * NaN would keep)."""
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = mask_rows[:, None] & (dims < D)[None, :]
        zero = tl.zeros([BLOCK_R, BLOCK_D], PTR_ROWS.dtype.element_ty)
        tl.store(PTR_ROWS + dims[None, :], zero, mask=mask)
    tl.debug_barrier()


@triton.jit
def _sq_dist(
    x_cols,
    mask_m,
    y_cols,
    mask_n,
    D,
    cdt: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """||x_i - y_j||^2 of a [BLOCK_M, BLOCK_N] tile, summed over BLOCK_D chunks of differences.

    x_cols ([1, BLOCK_M]) and y_cols ([1, BLOCK_N]) point at the rows' starts: chunks are loaded
    transposed, [BLOCK_D, rows], so that the broadcast [BLOCK_D, BLOCK_M, BLOCK_N] has its
    reduced axis first, which Triton's layouts keep inside each thread. The partial sums stay
    per dimension lane until the end of the sweep, so each element costs one subtraction and
    one fused multiply-add (a reduction per chunk would add a multiply: Triton reduces in a
    tree).
    """
    r2 = tl.zeros([BLOCK_D, BLOCK_M, BLOCK_N], cdt)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        in_d = (dims < D)[:, None]
        xt = tl.load(x_cols + dims[:, None], mask=in_d & mask_m[None, :], other=0.0).to(cdt)
        yt = tl.load(y_cols + dims[:, None], mask=in_d & mask_n[None, :], other=0.0).to(cdt)
        diff = xt[:, :, None] - yt[:, None, :]
        r2 += diff * diff
    return tl.sum(r2, axis=0)


@triton.jit
def _field_tile(
    XQ,
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
    cdt: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Field of the queries `rows` of XQ (row stride D) against all B charges.

    Leaves acc_i = sum_j 2^(s_ij - m_i) (y_j - x_i) in ACC's rows (compute dtype) and returns
    (m, l): the running max of the scores and the sum of 2^(s - m), both in log2 units.
    LW (log2 weights) and EXCL (excluded charge per query) may be None.
    """
    acc_rows = ACC + rows[:, None] * D
    x_rows = XQ + rows[:, None] * D
    _zero_rows(acc_rows, mask_m, D, BLOCK_M, BLOCK_D)
    if EXCL is not None:
        excl = tl.load(EXCL + rows, mask=mask_m, other=-1)
    m = tl.full([BLOCK_M], float("-inf"), cdt)
    l = tl.zeros([BLOCK_M], cdt)
    for j0 in range(0, B, BLOCK_N):
        cols_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = cols_n < B
        y_rows = Y + cols_n.to(tl.int64)[:, None] * D
        r2 = _sq_dist(
            tl.trans(x_rows), mask_m, tl.trans(y_rows), mask_n, D, cdt, BLOCK_M, BLOCK_N, BLOCK_D
        )
        s = -half_p * tl.log2(tl.maximum(r2 + e2[:, None], tiny))
        if LW is not None:
            s += tl.load(LW + cols_n, mask=mask_n, other=float("-inf"))[None, :]
        live = mask_n[None, :] & (s > float("-inf"))
        if EXCL is not None:
            live = live & (cols_n[None, :] != excl[:, None])
        s = tl.where(live, s, float("-inf"))
        # Online softmax: a row that has seen no live charge keeps m = -inf; its reference point
        # is 0 so that no -inf - (-inf) appears and every p and alpha is an exact 0.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
        _accumulate_differences(acc_rows, x_rows, y_rows, mask_m, mask_n, p, alpha, D, cdt, BLOCK_D)
        tl.debug_barrier()
    return m, l


@triton.jit
def _accumulate_differences(
    acc_rows, x_rows, y_rows, mask_m, mask_n, p, alpha, D, cdt: tl.constexpr, BLOCK_D: tl.constexpr
):
    """acc_i <- alpha_i acc_i + sum_j p_ij (y_j - x_i), as a [BLOCK_N, BLOCK_M, BLOCK_D]
    broadcast reduced over its first axis. Differences, never p @ y - l * x: that form cancels
    catastrophically for a query next to a charge far from the origin (docs/DESIGN.md
    "The field operator")."""
    pt = tl.trans(p)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        in_d = (dims < D)[None, :]
        mask = mask_m[:, None] & in_d
        xk = tl.load(x_rows + dims[None, :], mask=mask, other=0.0).to(cdt)
        yk = tl.load(y_rows + dims[None, :], mask=mask_n[:, None] & in_d, other=0.0).to(cdt)
        contrib = tl.sum(pt[:, :, None] * (yk[:, None, :] - xk[None, :, :]), axis=0)
        a = tl.load(acc_rows + dims[None, :], mask=mask, other=0.0)
        tl.store(acc_rows + dims[None, :], a * alpha[:, None] + contrib, mask=mask)


@triton.jit
def _store_field(ACC, V, rows, mask_m, neg_inv, D, cdt: tl.constexpr, BLOCK_D: tl.constexpr):
    """v = -acc / l into V (in V's dtype). Half-precision output: the scratch keeps v in float32
    for the backward's delta_i = g_i . v_i, which the rounded v would spoil (it enters by
    cancellation)."""
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = mask_m[:, None] & (dims < D)[None, :]
        offs = rows[:, None] * D + dims[None, :]
        v = tl.load(ACC + offs, mask=mask, other=0.0) * neg_inv[:, None]
        tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)
        if V.dtype.element_ty != cdt:
            tl.store(ACC + offs, v, mask=mask)


@triton.jit
def _finish_rows(m, l):
    """(-1/l, lse2) of finished rows; rows that no charge reached get (0, -inf)."""
    alive = l > 0.0
    l_safe = tl.where(alive, l, 1.0)
    neg_inv = tl.where(alive, -1.0 / l_safe, 0.0)
    lse2 = tl.where(alive, m + tl.log2(l_safe), float("-inf"))
    return neg_inv, lse2


@autotune(make_configs())
@triton.jit(do_not_specialize=["size_class"])
def _field_fwd_kernel(
    X,
    Y,
    LW,
    EXCL,
    E2,
    SCAL,
    ACC,
    V,
    LSE2,
    N,
    B,
    D,
    e2_stride,
    size_class,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_M queries: v (in V's dtype) and lse2 (log2 units). size_class
    (unused in the kernel) keys the autotuner."""
    cdt: tl.constexpr = SCAL.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < N
    half_p = tl.load(SCAL)
    tiny = tl.load(SCAL + 1)
    e2 = tl.load(E2 + rows * e2_stride, mask=mask_m, other=0.0)
    m, l = _field_tile(
        X, Y, LW, EXCL, ACC, rows, mask_m, e2, half_p, tiny, B, D, cdt, BLOCK_M, BLOCK_N, BLOCK_D
    )
    neg_inv, lse2 = _finish_rows(m, l)
    tl.store(LSE2 + rows, lse2, mask=mask_m)
    _store_field(ACC, V, rows, mask_m, neg_inv, D, cdt, BLOCK_D)


# --------------------------------------------------------------------------------------------
# Host side (shared with the backward and flow launchers)
# --------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def charge_terms(y: torch.Tensor, w: torch.Tensor | None, cdt: torch.dtype):
    """(log2 w in the compute dtype or None, natural log of sum w as a float64 0-d tensor or
    float). log2(0) = -inf marks a charge no query can reach."""
    if w is None:
        return None, math.log(y.shape[0])
    w = w.detach()
    return torch.log2(w.to(cdt)).contiguous(), torch.log(w.to(torch.float64).sum())


def scalar_params(power: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[p/2, tiny] in the compute dtype of input dtype `dtype`. tiny, the r2 floor, is the
    smallest normal number of the *input* dtype (float16: 6.1e-5), as in the reference and the
    other backends, so that a float16/bfloat16 query exactly on a charge gets the same
    log_scale everywhere (docs/DESIGN.md, "The field operator")."""
    cdt = compute_dtype(dtype)
    # Filled on the device (two fill kernels), not copied from the host: torch.tensor(list,
    # device=cuda) is a synchronous copy, illegal under CUDA-graph capture.
    scal = torch.full((2,), 0.5 * float(power), dtype=cdt, device=device)
    scal[1:].fill_(torch.finfo(dtype).tiny)
    return scal


def launch_guard(t: torch.Tensor):
    """The context every launch runs in: t's CUDA device made current (Triton launches on the
    current device's current stream), nothing for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def softening_sq(x: torch.Tensor, eps: float, eps_rows: torch.Tensor | None, cdt: torch.dtype):
    """(e^2 tensor, row stride): per query if eps_rows is given, else one shared value."""
    if eps_rows is None:
        return torch.full((1,), float(eps) ** 2, dtype=cdt, device=x.device), 0
    e = eps_rows.detach().to(cdt)
    return (e * e).contiguous(), 1


def index_rows(exclude: torch.Tensor | None) -> torch.Tensor | None:
    return None if exclude is None else exclude.detach().to(torch.int64).contiguous()


def log_scale_from_lse2(lse2: torch.Tensor, log_wsum, dtype: torch.dtype) -> torch.Tensor:
    """log_scale = lse2 * ln 2 - log sum w, formed in float64 (it is O(N))."""
    return (lse2.to(torch.float64) * LN2 - log_wsum).to(dtype)


def field_forward_launch(x, y, w, power, eps, exclude=None, eps_rows=None):
    """Forward field on the Triton kernels: returns (v, log_scale, lse2, v_c).

    v and log_scale are in x's dtype; lse2 = logsumexp_j s_ij in log2 units, in the compute
    dtype, is what the backward recomputes the softmax weights from; v_c is v in the compute
    dtype when that differs from x's (float16/bfloat16 input), else None.
    Traceable by make_fx (no data-dependent Python control flow), as torch.library.triton_op
    requires.
    """
    N, D = x.shape
    B = y.shape[0]
    cdt = compute_dtype(x.dtype)
    v = torch.empty((N, D), dtype=x.dtype, device=x.device)
    lse2 = torch.empty((N,), dtype=cdt, device=x.device)
    lw, log_wsum = charge_terms(y, w, cdt)
    acc = v if cdt == x.dtype else torch.empty((N, D), dtype=cdt, device=x.device)
    v_c = None if acc is v else acc
    if N == 0:
        return v, torch.empty((0,), dtype=x.dtype, device=x.device), lse2, v_c
    x = x.detach().contiguous()
    y = y.detach().contiguous()
    e2, e2_stride = softening_sq(x, eps, eps_rows, cdt)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]),)

    with launch_guard(x):
        wrap_triton(_field_fwd_kernel)[grid](
            x,
            y,
            lw,
            index_rows(exclude),
            e2,
            scalar_params(power, x.dtype, x.device),
            acc,
            v,
            lse2,
            N,
            B,
            D,
            e2_stride,
            size_class(N, B),
        )
    return v, log_scale_from_lse2(lse2, log_wsum, x.dtype), lse2, v_c


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"
