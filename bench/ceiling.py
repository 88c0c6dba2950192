"""The machine's own ceiling for each CPU kernel: the vector-pipe micro-benchmark and the
kernels' instruction mix (docs/performance.md).

    python bench/ceiling.py                          # pipe rates and ceilings, this machine
    python bench/ceiling.py --json docs/bench/ceiling.json --txt docs/bench/ceiling.txt

`measure_pipes()` runs the micro-benchmark compiled into the extension (poissonflow._C.pipe_rate:
csrc/cpu/pipe_bench.cpp, the dispatcher's instruction set, the kernels' own exp2/log2/power
code) on the kernels' thread team and keeps the best of a few short repeats of each operation
(the machine is shared; the best repeat is the closest to an idle core). `Ceiling` turns the
rates into the time a kernel could take at best:

    a phase (one loop nest) keeps the pipes busy for at least
        max(fma/R_fma, add/R_add, (fma + add)/R_fp, loads/R_ld, stores/R_st)
    per vector of W pairs (fma: FMA and multiply instructions, add: add, subtract, max, compare
    and blend, all from the kernels' assembly: bench/asm_mix.py; the power-form weight's
    multiplications and selects counted from csrc/cpu/power_form.h, `pow_ops`, the log domain's
    exp2 and log2 from csrc/cpu/simd.h, `exp2_ops` and `log2_ops`, their integer and conversion
    instructions on any pipe); the phases add up. Divisions and
    square roots run on the divider, a unit beside the pipes that works while they do: the
    kernel takes at least the larger of the pipes' total and the divider's total
    (div/R_div + sqrt/R_sqrt). A divider instruction still issues through a pipe: beside FMA
    pipes kept busy, each division or root costs them the FMAs the micro-benchmark measures it
    to displace (`fma4+div`, `fma4+sqrt`: two on the Zen 4, whose 512-bit divisions and roots
    are two 256-bit halves; `divider_fma_slots`), and the model counts those with the FMAs.
    Where the ISA also has a square root on the FMA pipes
    (simd.h vsqrt_newton), the bound takes the best share of the weights' roots there
    (`KernelMix.seconds_per_vector`), whatever share the kernel takes.

The ceiling is an upper bound on the rate (a lower bound on the time) with the busiest unit
busy all the time: a kernel at 100% would have no stall, no cache miss and no overhead outside
its loops. (Until 2026-12-07 the model added the divider's time to the pipes' and took the
power-form weight at its measured throughput alone, which includes its square root's: a Zen 4,
which overlaps the two, ran the forward at 1.10-1.16 of that "ceiling" at D = 2 and 1.02 at
D = 8, where the divisions weigh most. docs/performance.md, "The divider".)
`loop_attainment()` sets the kernels' own inner loops, run from L1 by the micro-benchmark
(loop_A, loop_C, loop_A', loop_C'), against their phase's model: what the loops as compiled
reach of the pipes before any cache or tile overhead enters.
The counts below are per vector of W pairs, per dimension (`per_dim`) or per pair (`per_pair`),
and follow the register blocks of csrc/cpu/field_tile.h and field_backward.h (Geometry).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

PIPE_OPS = (
    "fma",
    "add",
    "mul",
    "fma+add",
    "max",
    "div",
    "sqrt",
    "sqrt_newton",
    "exp2",
    "log2",
    "load",
    "bcast+fma",
    "load+bcast+fma",
    "sub+fma",
    "store",
    "load+store",
    "add4+store",
    "fma4+store",
)
# pipe_bench.cpp's fma4 (48 FMAs a step on 12 chains) and the same step beside one division
# or one square root: the rate the FMAs lose is the FMA-pipe issue the divider's instruction
# takes (divider_fma_slots). Measured interleaved, best of many: the difference of two rates.
DIVIDER_SLOT_OPS = ("fma4", "fma4+div", "fma4+sqrt")
DIVIDER_STEP_FMAS = 48


def divider_fma_slots(r: dict, which: str) -> float:
    """FMAs' worth of FMA-pipe issue one division (which='div') or square root ('sqrt') takes
    beside busy FMA pipes, from the rates of `measure_pipes`; 0 for a record measured before
    the micro-benchmark had it (the model of that day)."""
    return float(r.get(f"{which}_fma_slots", 0.0))


# pipe_bench.cpp's loop_* operations: the kernels' inner loops from L1, in pair-dimension
# vectors per second, and the phase of the model each one is set against (kernel, index in
# KernelMix.per_dim)
LOOP_OPS = {
    "loop_A": ("forward", 0),
    "loop_C": ("forward", 1),
    "loop_A'": ("backward", 0),
    "loop_C'": ("backward", 1),
}
# pipe_bench.cpp's phase_a_step register blocks (param of "phaseA"): the forward's r2 loop as
# compiled, from L1, to see what its block shape allows of the pipes' rate, with the queries'
# coordinates as one broadcast register per coordinate (the kernels' shared form); "6x2vec"
# reads them as full vectors instead: what the broadcast loads cost the step on this CPU
# (docs/performance.md, "Zen 4"). loop_A and loop_A' run the kernels' own loops in the form
# the kernels choose on this CPU (resolve_broadcasts).
PHASE_A_BLOCKS = {"4x2": 0, "4x3": 1, "6x2": 2, "8x2": 3, "6x2vec": 4}


def cpu_module():
    from poissonflow import _ext

    return _ext.cpu_module()


def measure_pipes(
    threads: int,
    *,
    dtype_double: bool = False,
    repeats: int = 15,
    iters: int = 300_000,
    half_ps=(1.5, 64.5),
    isa: str = "auto",
) -> dict:
    """Vector operations per second of `threads` cores for every pipe operation, the power-form
    weight at each p/2 in half_ps ('pow_weight@1.5', ...), the core clock ('clock_hz') and the
    vector width. Each operation runs on one thread, best of `repeats` short runs (about a
    millisecond each: on a shared machine the best run is the one no other process
    interrupted), times `threads`: the cores are alike and the kernels' threads share nothing
    in these loops. 'team_fma' is the FMA rate of the whole team measured at once, for the
    record (it falls short of threads x the one-thread rate when other jobs hold cores)."""
    C = cpu_module()
    out: dict = {}

    def best(op, n, param=0.0, th=1):
        return max(C.pipe_rate(op, n, th, param, dtype_double, isa) for _ in range(repeats))

    for op in PIPE_OPS:
        slow = op in ("div", "sqrt", "sqrt_newton", "exp2", "log2")
        out[op] = threads * best(op, iters // 8 if slow else iters)
    # the divider's issue slots: a difference of two rates, so measured side by side (the
    # host's clock moves between runs taken one operation after the other)
    slot = dict.fromkeys(DIVIDER_SLOT_OPS, 0.0)
    for _ in range(2 * repeats):
        for op in DIVIDER_SLOT_OPS:
            slot[op] = max(slot[op], C.pipe_rate(op, iters // 8, 1, 0.0, dtype_double, isa))
    for op in DIVIDER_SLOT_OPS:
        out[op] = threads * slot[op]
    for which in ("div", "sqrt"):
        lost = slot["fma4"] / slot[f"fma4+{which}"] - 1.0
        out[f"{which}_fma_slots"] = max(0.0, DIVIDER_STEP_FMAS * lost)
    for hp in half_ps:
        out[f"pow_weight@{hp:g}"] = threads * best("pow_weight", iters // 8, hp)
    for name, param in PHASE_A_BLOCKS.items():
        out[f"phaseA@{name}"] = threads * best("phaseA", iters, param)
    for op in LOOP_OPS:
        out[op] = threads * best(op, iters)
    out["team_fma"] = best("fma", iters, th=threads)
    out["clock_hz"] = best("clock", iters)
    out["vector_bytes"] = C.vector_bytes(isa)
    out["threads"] = threads
    out["double"] = dtype_double
    return out


def pipe_table(rates: dict) -> list[tuple[str, float, float]]:
    """(operation, vector ops per second per thread, per cycle per thread)."""
    th, clk = rates["threads"], rates["clock_hz"]
    rows = []
    for k, v in rates.items():
        if (
            isinstance(v, float)
            and k not in ("clock_hz", "team_fma")
            and k not in LOOP_OPS
            and not k.endswith("_fma_slots")
        ):
            rows.append((k, v / th, v / th / clk if not math.isnan(clk) else float("nan")))
    return rows


# ---- the kernels' instruction mix ---------------------------------------------------------------


@dataclass
class Mix:
    """Instructions per vector of W pairs in one phase (loop nest)."""

    fma: float = 0.0  # FMA and multiply (the two FMA pipes)
    add: float = 0.0  # add, subtract, max, compare, blend (the add pipes)
    loads: float = 0.0  # vector loads, memory operands and broadcasts
    stores: float = 0.0  # vector stores
    div: float = 0.0
    sqrt: float = 0.0
    exp2: float = 0.0  # vexp2() calls (their ops: exp2_ops)
    log2: float = 0.0  # vlog2() calls (log2_ops, a division among them)
    pow_weight: float = 0.0  # power_weight() calls at p/2 = half_p (their ops: pow_ops)
    newton_roots: float = 0.0  # the share of those weights' square roots on the FMA pipes

    def pipe_seconds(self, r: dict, half_p: float | None = None) -> float:
        """The vector pipes' time: the busiest pipe class, the instructions that any pipe can
        run (integer and conversion) counted with both."""
        fma, add, other = self.fma, self.add, 0.0
        roots = 0.0  # the weight's square roots on the divider
        if self.pow_weight:
            mults, selects, roots = pow_ops(half_p, self.newton_roots)
            fma += self.pow_weight * mults
            add += self.pow_weight * selects
        # the divider's instructions take their issue from the FMA pipes
        fma += divider_fma_slots(r, "div") * (self.div + self.log2)
        fma += divider_fma_slots(r, "sqrt") * (self.sqrt + self.pow_weight * roots)
        double = bool(r.get("double", False))
        for calls, ops in ((self.exp2, exp2_ops(double)), (self.log2, log2_ops(double))):
            fma += calls * ops[0]
            add += calls * ops[1]
            other += calls * ops[2]
        return max(
            fma / r["fma"],
            add / r["add"],
            (fma + add + other) / r["fma+add"],
            self.loads / load_rate(r),
            self.stores / r["store"] if self.stores else 0.0,
        )

    def divider_seconds(self, r: dict, half_p: float | None = None) -> float:
        """The divider's time: divisions and square roots (the weight's and log2's too)."""
        roots = pow_ops(half_p, self.newton_roots)[2] if self.pow_weight else 0
        sqrt = self.sqrt + self.pow_weight * roots
        return (self.div + self.log2) / r["div"] + sqrt / r["sqrt"]

    def seconds(self, r: dict, half_p: float | None = None) -> float:
        """This phase alone: its pipes or its divider, whichever binds."""
        return max(self.pipe_seconds(r, half_p), self.divider_seconds(r, half_p))


def power_form_applies(p: float) -> bool:
    """Whether the kernels weigh pairs in the power form at power p (csrc/cpu/power_form.h
    power_plan, data aside): 2p an integer and 2 <= p <= 4096. Below p = 2 the cut lies under
    the normal numbers and they take the log domain."""
    return 2.0 <= p <= 4096.0 and 2.0 * p == math.floor(2.0 * p)


# simd.h vsqrt_newton: the estimate, s = x r, r / 2, the residual and the step (FMA pipes)
NEWTON_SQRT_OPS = 5


def pow_ops(half_p: float, newton_roots: float = 0.0) -> tuple[float, int, float]:
    """(multiplications, add-pipe selects, square roots on the divider) of one power-form
    weight vector at p/2 = half_p, as csrc/cpu/power_form.h computes it: t = q / Q (a
    multiplication), the floor max(t, cut), t^(whole part) by binary exponentiation (a squaring
    per bit after the first; the lowest set bit's power starts the product, each further set
    bit multiplies it in), t^(1/2) and t^(1/4) by square roots (each multiplied in), and the
    select against the floor. newton_roots: the share of the square roots taken by
    vsqrt_newton on the FMA pipes (NEWTON_SQRT_OPS multiplications each) instead of the
    divider, where the plan allows it (power_form.h newton_sqrt)."""
    if half_p is None:
        raise ValueError("pow_ops: the power form needs p/2")
    fourths = int(round(4 * half_p))
    whole, quarters = fourths // 4, fourths % 4
    squarings = max(whole.bit_length() - 1, 0)
    products = max(bin(whole).count("1") - 1, 0) + (quarters & 2) // 2 + (quarters & 1)
    mults = 1 + squarings + products
    sqrts = (1 if quarters else 0) + (quarters & 1)
    share = newton_roots if half_p >= 1 and sqrts else 0.0
    if not share:
        return mults, 3, sqrts
    return mults + share * sqrts * NEWTON_SQRT_OPS, 3, sqrts * (1.0 - share)


def exp2_ops(double: bool = False) -> tuple[int, int, int]:
    """(FMA-pipe, add-pipe, any-pipe) instructions of one simd.h vexp2 vector: the clamps (max,
    min), the rounding (two additions), f = x - n, the Taylor polynomial (7 FMAs; 13 in float64)
    and the product with the scale, the scale's integer conversion, addition and shift, and the
    two range tests with their selects."""
    return (14 if double else 8), 8, 3


def log2_ops(double: bool = False) -> tuple[int, int, int]:
    """The same for simd.h vlog2, whose s = (m - 1) / (m + 1) is a division (the divider's):
    the exponent's and mantissa's integer extraction (shift, and, subtract, and, or), the
    sqrt(2) test and its select, the halving, m - 1 and m + 1, s s, the polynomial in s^2 (5
    FMAs; 11 in float64), s q and its constant, the exponent's adjustment (an and and an add),
    its conversion and the final addition."""
    return (15 if double else 9), 5, 8


def load_rate(r: dict) -> float:
    """Loads per second: full vectors alone, or a vector and a broadcast per FMA (2 loads)."""
    return max(r["load"], 2.0 * r["load+bcast+fma"])


SUM_BLOCK = 16  # csrc/cpu/field_tile.h distance_block's kSumBlock


@dataclass
class Geometry:
    """csrc/cpu/field_tile.h Geometry and field_backward.h BackwardBlock for one ISA."""

    W: int
    QB: int = 4
    CB: int = 2
    QC: int = 2
    KB: int = 3
    QBb: int = 4  # backward phase A'
    QCb: int = 4  # backward phase C' (with dy)
    KBb: int = 2
    held: bool = False  # C' with x and g in registers (field_backward.h HeldBlock: avx512)
    D: int = 129  # the dimension: the distance loops add one partial sum per SUM_BLOCK of it
    # the square roots may run on the FMA pipes (simd.h kNewtonForms: avx512 float)
    newton_forms: bool = False

    @staticmethod
    def for_isa(vector_bytes: int, double: bool = False, D: int = 129) -> Geometry:
        """avx512: phase A's block is 6 x 2 from D = 8 up (Geometry::qb), 4 x 2 below."""
        W = vector_bytes // (8 if double else 4)
        if vector_bytes >= 64:
            return Geometry(
                W=W,
                QB=6 if D >= 8 else 4,
                KB=6,
                KBb=3,
                held=True,
                D=D,
                newton_forms=not double,
            )
        return Geometry(W=W, D=D)

    def sum_adds_per_dim(self) -> float:
        """Additions per pair and dimension for r2's partial sums (field_tile.h distance_block):
        one per started block of SUM_BLOCK dimensions, the first (0 + part) included: 3 at
        D = 33, where D / 16 would count 2.06."""
        return math.ceil(self.D / SUM_BLOCK) / self.D


@dataclass
class KernelMix:
    """Per dimension and per pair phases of one kernel."""

    per_dim: list = field(default_factory=list)
    per_pair: list = field(default_factory=list)

    newton_forms: bool = False  # the weights' roots may take the FMA pipes (Geometry)

    def seconds_per_vector(self, D: int, r: dict, half_p: float | None) -> float:
        """The pipes' total or the divider's, whichever is larger, at the best share of the
        weights' square roots on the FMA pipes where the ISA allows it (NEWTON_SHARES): the
        bound is the best placement of the roots, whatever share the code takes (field_tile.h
        power_row_run: one vector in two, for 1 <= p/2 < 5), so that moving work between the
        units can never lower the bar the kernel is measured against."""
        shares = NEWTON_SHARES if self.newton_forms else (0.0,)
        return min(self._seconds_at_share(D, r, half_p, s) for s in shares)

    def _seconds_at_share(self, D: int, r: dict, half_p: float | None, share: float) -> float:
        phases = [(D, m) for m in self.per_dim] + [
            (1, dataclasses.replace(m, newton_roots=share) if m.pow_weight else m)
            for m in self.per_pair
        ]
        pipes = sum(n * m.pipe_seconds(r, half_p) for n, m in phases)
        divider = sum(n * m.divider_seconds(r, half_p) for n, m in phases)
        return max(pipes, divider)


# The shares of the weights' square roots on the FMA pipes that the bound considers: the
# kernels' weights run in groups of four vectors, each vector's roots on one unit.
NEWTON_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def forward_mix(g: Geometry, power_form: bool = True) -> KernelMix:
    """The forward field (field_tile): A r2 by differences, B weights, C p (y - x). Compiled
    (avx512, bench/asm_mix.py): A 12 FMA + 12 sub, 2 y loads and 6 broadcasts per 6 x 2 step
    (D >= 8; 8 + 8 and 2 + 4 at 4 x 2), C 12 FMA + 12 sub and 8 loads per 2 x 6 step."""
    # d = y - x; r2 += d d; the partial sums' additions
    a = Mix(fma=1, add=1 + g.sum_adds_per_dim(), loads=(g.CB + g.QB) / (g.QB * g.CB))
    c = Mix(fma=1, add=1, loads=(g.QC + g.KB) / (g.QC * g.KB))  # acc += p (y - x)
    # Per pair, each phase writes its vector of S (a store), B reads it twice (its maximum,
    # then the weight).
    if power_form:
        # A: + e2, max(., tiny) as a compare and a blend, q = g / r2 (the asm: 3 add-pipe
        # instructions, a division and a store a vector);  B: tile max, t^(p/2) (pow_ops), l += p
        pa = Mix(add=3, loads=1, stores=1, div=1)
        pb = Mix(add=2, loads=2, stores=1, pow_weight=1)
    else:
        # A: + e2, max, log2, s = lw - (p/2) log2 r2, select;  B: tile max, 2^(s - m), l += p
        pa = Mix(fma=1, add=3, loads=1, stores=1, log2=1)
        pb = Mix(add=3, loads=2, stores=1, exp2=1)
    return KernelMix(per_dim=[a, c], per_pair=[pa, pb], newton_forms=g.newton_forms)


def backward_mix(
    g: Geometry, power_form: bool = True, need_y: bool = True, has_g: bool = True
) -> KernelMix:
    """The backward (backward_item): A' r2 and g.(x - y), B' the pair term, C' dx += a d (lanes),
    dy -= a d + pi g. The per-dimension counts are the compiled loops' (bench/asm_mix.py).
    A' (4 x 2 block): 16 FMA + 8 sub per step, 2 y loads and 8 broadcasts (until 2026-12-08
    also 3 spilled registers' stores and reloads on avx512: not binding, the FMA pipes are);
    without g (has_g False: the output v carries no gradient) the forward's distance step,
    8 + 8, 2 loads and 4 broadcasts.
    C' for dx and dy on avx512 (backward_accumulate_held, 2 x 3 block, x and g in registers):
    10 FMA + 4 mul and 14 add/sub per step, 10 loads (c, pi, y, dy) and 3 stores; elsewhere
    (4 x KBb block, x and g as broadcast loads): 2 FMA + 1 mul and 2 add/sub per pair-dimension,
    2 QCb + 2 KBb + 2 QCb KBb loads per step. C' for dx alone (need_y False, the charges take no
    gradient; without g, as the Riesz loss calls it): the forward's QC x KB block with c for p
    and x as broadcast memory operands: 1 FMA + 1 sub per pair-dimension, QC + KB + QC KB loads
    per step."""
    if need_y and not has_g:
        raise ValueError("backward_mix: no model for dy without the gradient of v")
    if has_g:
        a = Mix(fma=2, add=1 + g.sum_adds_per_dim(), loads=(g.CB + 2 * g.QBb) / (g.QBb * g.CB))
    else:
        a = Mix(fma=1, add=1 + g.sum_adds_per_dim(), loads=(g.CB + g.QBb) / (g.QBb * g.CB))
    if not need_y:
        n = g.QC * g.KB
        c = Mix(fma=1, add=1, loads=(g.QC + g.KB + n) / n)
    elif g.held:
        n = 2 * 3
        c = Mix(fma=14 / n, add=14 / n, loads=10 / n, stores=3 / n)
    else:
        n = g.QCb * g.KBb
        c = Mix(fma=3, add=2, loads=(2 * g.QCb + 2 * g.KBb + 2 * n) / n, stores=g.KBb / n)
    if power_form:
        # A': + e2, r2 and gd stored;  B': rr = 1/max(r2, tiny), g rr, pi = (g rr / Q)^(p/2),
        # h = gd - dl, a = p pi h rr (3 mul), select; pi and c stored
        pb = Mix(fma=4, add=4, loads=3, stores=2, div=1, pow_weight=1)
    else:
        pb = Mix(fma=5, add=5, loads=3, stores=2, div=1, log2=1, exp2=1)
    pa = Mix(add=1, stores=2)
    return KernelMix(per_dim=[a, c], per_pair=[pa, pb], newton_forms=g.newton_forms)


def floor_ratio_by_ops() -> float:
    """Backward over forward by mandatory pipe operations per pair and dimension: forward
    d = y - x twice, d d and p d (2 add + 2 FMA); backward d twice, d d, g.d, a d (once),
    adding it to dx and to dy, pi g (4 add + 4 FMA). Equal pipes for both: 8 / 4 = 2.0.
    With the two phases as separate loops (pi needs the whole r2 first), each balanced on
    its own: A' 2 FMA + 1 add (1 cycle per vector with 2 + 2 pipes), C' at best 7/3 + 7/3
    (1.17 cycles), against the forward's 1: 2.17 (`Ceiling.backward_over_forward`)."""
    return (4 + 4) / (2 + 2)


@dataclass
class Ceiling:
    rates: dict
    double: bool = False

    @property
    def geometry(self) -> Geometry:
        return self.geometry_at(129)

    def geometry_at(self, D: int) -> Geometry:
        return Geometry.for_isa(self.rates["vector_bytes"], self.double, D)

    def _pairs_per_second(self, mix: KernelMix, D: int, half_p: float | None) -> float:
        return self.geometry.W / mix.seconds_per_vector(D, self.rates, half_p)

    def forward_seconds(
        self, N: int, B: int, D: int, power: float | None = None, power_form: bool = True
    ) -> float:
        p = float(D if power is None else power)
        mix = forward_mix(self.geometry_at(D), power_form and power_form_applies(p))
        return N * B / self._pairs_per_second(mix, D, p / 2)

    def forward_gflops(self, D: int, power: float | None = None, power_form: bool = True) -> float:
        """The forward's ceiling in the counted 4 D flops per pair."""
        return 4.0 * D / self.forward_seconds(1, 1, D, power, power_form) / 1e9

    def backward_seconds(
        self,
        N: int,
        B: int,
        D: int,
        power: float | None = None,
        power_form: bool = True,
        need_y: bool = True,
        has_g: bool = True,
    ) -> float:
        """dL/dx and, with need_y, dL/dy; has_g: the output v carries a gradient (else only the
        log-scale does, as in the Riesz loss)."""
        p = float(D if power is None else power)
        mix = backward_mix(self.geometry_at(D), power_form and power_form_applies(p), need_y, has_g)
        return N * B / self._pairs_per_second(mix, D, p / 2)

    def riesz_seconds(self, N: int, charges, D: int, s: float) -> float:
        """One step of the Riesz loss (losses.riesz_uniformity_loss): a field call at power s of
        the N rows against each block of charges in `charges` (the batch itself, a bank), and
        its backward for dL/dx alone (the charges take no gradient, the field v none)."""
        return sum(
            self.forward_seconds(N, b, D, s)
            + self.backward_seconds(N, b, D, s, need_y=False, has_g=False)
            for b in charges
        )

    def backward_over_forward(self, D: int, power: float | None = None) -> float:
        """The floor of backward / forward from the assembly's mix on this machine's pipes."""
        return self.backward_seconds(1, 1, D, power) / self.forward_seconds(1, 1, D, power)

    def flow_step_seconds(self, N: int, B: int, D: int, solver: str = "euler") -> float:
        """A fused flow step: one field evaluation (Euler) or four (RK4) at p = D + 1."""
        return (4 if solver == "rk4" else 1) * self.forward_seconds(N, B, D, D + 1.0)

    def fma_peak_gflops(self) -> float:
        """FMA pipes' peak in flops (2 per lane), the reference for torch.mm."""
        return 2.0 * self.geometry.W * self.rates["fma"] / 1e9


def loop_attainment(ceil: Ceiling) -> list[tuple[str, float, float, float]]:
    """(loop, model cycles per pair-dimension vector, measured cycles, model / measured) for
    each of the kernels' inner loops run from L1 by the micro-benchmark (LOOP_OPS). Cycles
    from the clock the same run measured; the model is the loop's phase of forward_mix or
    backward_mix on this machine's pipe rates (its per-dimension mix, D = 129)."""
    r = ceil.rates
    g = ceil.geometry_at(129)
    mixes = {"forward": forward_mix(g), "backward": backward_mix(g)}
    rows = []
    per_core = r["threads"] * r["clock_hz"]  # team seconds per vector -> one core's cycles
    for op, (kernel, i) in LOOP_OPS.items():
        if op not in r:
            continue
        model = mixes[kernel].per_dim[i].seconds(r) * per_core
        measured = per_core / r[op]
        rows.append((op, model, measured, model / measured))
    return rows


def measure(threads: int | None = None, double: bool = False, **kw) -> Ceiling:
    import torch

    th = threads or torch.get_num_threads()
    return Ceiling(measure_pipes(th, dtype_double=double, **kw), double)


def report(ceil: Ceiling, dims=(2, 3, 8, 16, 33, 129, 513)) -> list[str]:
    r = ceil.rates
    lines = [
        f"vector pipes ({r['vector_bytes']}-byte vectors, {r['threads']} threads, "
        f"clock {r['clock_hz'] / 1e9:.2f} GHz per core from dependent adds), "
        "best of repeats:",
        f"  {'operation':18} {'Gvec/s/core':>12} {'per cycle':>10}",
    ]
    for k, v, pc in pipe_table(r):
        lines.append(f"  {k:18} {v / 1e9:12.3f} {pc:10.3f}")
    if "div_fma_slots" in r:
        lines.append(
            f"  FMA-pipe issue a divider instruction takes (fma4 against fma4+div, fma4+sqrt): "
            f"division {r['div_fma_slots']:.2f} FMAs, square root {r['sqrt_fma_slots']:.2f}"
        )
    lines.append(
        f"  FMA peak {ceil.fma_peak_gflops():.1f} GFLOP/s (2 flops per FMA lane, "
        f"{r['threads']} cores); the whole team measured at once: "
        f"{r['team_fma'] / r['fma']:.2f} of it"
    )
    lines.append("")
    lines.append(
        f"  {'D':>4} {'fwd ceiling GFLOP/s':>20} {'log domain':>11} {'bwd/fwd floor':>14}"
        f" {'Euler step':>11}"
    )
    for D in dims:
        lines.append(
            f"  {D:4d} {ceil.forward_gflops(D):20.1f} "
            f"{ceil.forward_gflops(D, power_form=False):11.1f} "
            f"{ceil.backward_over_forward(D):14.3f} "
            f"{4.0 * D / ceil.flow_step_seconds(1, 1, D) / 1e9:11.1f}"
        )
    lines.append(f"  backward/forward floor by operation count: {floor_ratio_by_ops():.2f}")
    loops = loop_attainment(ceil)
    if loops:
        lines.append("")
        lines.append(
            "the kernels' inner loops from L1 (D = 129 register blocks and run lengths), "
            "cycles per pair-dimension vector:"
        )
        lines.append(f"  {'loop':8} {'model':>7} {'measured':>9} {'of the model':>13}")
        for op, model, meas, frac in loops:
            lines.append(f"  {op:8} {model:7.3f} {meas:9.3f} {frac:13.2f}")
    return lines


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--double", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--txt")
    args = ap.parse_args(argv)
    rec = machine.machine_record(args.threads)
    ceil = measure(args.threads, args.double)
    rec["load_average_after"] = machine.load_average()
    lines = ["# " + machine.cpu_line(rec)] + report(ceil)
    print("\n".join(lines))
    if args.txt:
        with open(args.txt, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": rec, "rates": ceil.rates}, f, indent=2)


if __name__ == "__main__":
    main()
