"""The ceiling model's arithmetic and the benchmark records' metadata (bench/ceiling.py,
bench/machine.py). No timing is checked here: speed lives in the benchmarks."""

from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)
import ceiling  # noqa: E402
import machine  # noqa: E402

# A made-up machine: 1e9 vector FMAs and adds per second each, both together 2e9, 2e9 loads,
# 1e9 stores, 16-lane vectors; divisions 1e8, square roots 5e7, exp2/log2 2e7, power weight 4e7
# or 2e7.
RATES = {
    "fma": 1e9,
    "add": 1e9,
    "mul": 1e9,
    "fma+add": 2e9,
    "max": 1e9,
    "div": 1e8,
    "sqrt": 5e7,
    "exp2": 2e7,
    "log2": 2e7,
    "load": 2e9,
    "store": 1e9,
    "bcast+fma": 1e9,
    "load+bcast+fma": 1e9,
    "pow_weight@1.5": 4e7,
    "pow_weight@64.5": 2e7,
    "clock_hz": 1e9,
    "team_fma": 1e9,
    "vector_bytes": 64,
    "threads": 1,
    "double": False,
}


def test_phase_is_bounded_by_its_busiest_pipe():
    assert ceiling.Mix(fma=2, add=1).seconds(RATES) == pytest.approx(2e-9)
    assert ceiling.Mix(fma=1, add=3).seconds(RATES) == pytest.approx(3e-9)
    # both pipes busy: fma + add over the combined rate
    assert ceiling.Mix(fma=2, add=2).seconds(RATES) == pytest.approx(2e-9)
    # loads: 6 over 2e9; stores: 4 over 1e9
    assert ceiling.Mix(fma=1, add=1, loads=6).seconds(RATES) == pytest.approx(3e-9)
    assert ceiling.Mix(fma=1, add=1, stores=4).seconds(RATES) == pytest.approx(4e-9)
    # exp2 and log2 by their instructions (simd.h): 8 + 9 FMA-pipe, 8 + 5 add-pipe and 3 + 8
    # integer or conversion instructions that either pipe runs, so here the pipes' combined
    # rate binds: (1 + 17 + 13 + 11) / 2e9; log2's division goes to the divider
    m = ceiling.Mix(fma=1, exp2=1, log2=1)
    assert ceiling.exp2_ops() == (8, 8, 3) and ceiling.log2_ops() == (9, 5, 8)
    assert m.pipe_seconds(RATES) == pytest.approx(42 / 2e9)
    assert m.divider_seconds(RATES) == pytest.approx(1 / 1e8)
    assert ceiling.exp2_ops(double=True)[0] == 14
    # divisions and square roots run on the divider beside the pipes: the phase takes the larger
    m = ceiling.Mix(fma=1, div=1, sqrt=1)
    assert m.pipe_seconds(RATES) == pytest.approx(1e-9)
    assert m.divider_seconds(RATES) == pytest.approx(1e-8 + 2e-8)
    assert m.seconds(RATES) == pytest.approx(3e-8)
    assert ceiling.Mix(fma=50, div=1).seconds(RATES) == pytest.approx(50e-9)


def test_divider_instructions_take_fma_issue_where_measured():
    # a record measured before the micro-benchmark had fma4+div counts none (its day's model)
    assert ceiling.divider_fma_slots(RATES, "div") == 0.0
    slots = dict(RATES, div_fma_slots=2.0, sqrt_fma_slots=1.5)
    # beside busy FMA pipes each division costs them 2 FMAs' issue, each root 1.5
    assert ceiling.Mix(fma=50, div=1).seconds(slots) == pytest.approx(52e-9)
    assert ceiling.Mix(fma=1, div=1, sqrt=1).pipe_seconds(slots) == pytest.approx(4.5e-9)
    # the divider's own time is unchanged, and where it binds it still sets the phase
    assert ceiling.Mix(fma=1, div=1, sqrt=1).seconds(slots) == pytest.approx(3e-8)
    # add-pipe work is untouched: the slots are the FMA pipes'
    assert ceiling.Mix(add=50, div=1).seconds(slots) == pytest.approx(50e-9)
    # log2's division and the weight's roots on the divider count too; roots moved to the FMA
    # pipes (Newton) take their own multiplications instead
    # (log2: 9 FMA-pipe, 5 add-pipe and 8 either-pipe instructions; with its division's 2:
    # (11 + 5 + 8) / 2e9 against 22 / 2e9 before)
    assert ceiling.Mix(log2=1).pipe_seconds(RATES) == pytest.approx(11e-9)
    assert ceiling.Mix(log2=1).pipe_seconds(slots) == pytest.approx(12e-9)
    mults, _, roots = ceiling.pow_ops(64.5)
    w = ceiling.Mix(pow_weight=1)
    assert roots == 1
    assert w.pipe_seconds(slots, 64.5) == pytest.approx((mults + 1.5 * roots) / 1e9)
    newton = ceiling.Mix(pow_weight=1, newton_roots=1.0)
    assert newton.pipe_seconds(slots, 64.5) == pytest.approx(newton.pipe_seconds(RATES, 64.5))


def test_pow_ops_follow_the_power_form():
    # (multiplications, selects, square roots) per weight vector: t = q / Q is one
    # multiplication; p/2 = 1: nothing more
    assert ceiling.pow_ops(1.0) == (1, 3, 0)
    # 1.5: t * sqrt(t)
    assert ceiling.pow_ops(1.5) == (2, 3, 1)
    # 4 = 100b: two squarings; the top bit's power is the product (no multiplication by 1)
    assert ceiling.pow_ops(4.0) == (3, 3, 0)
    # 64.5: six squarings, the square root's product
    assert ceiling.pow_ops(64.5) == (8, 3, 1)
    # 16.75 = 16 + 1/2 + 1/4: four squarings, two square roots, two products
    assert ceiling.pow_ops(16.75) == (7, 3, 2)
    # 7 = 111b: two squarings, two further set bits (the lowest bit starts the product)
    assert ceiling.pow_ops(7.0) == (5, 3, 0)
    # half the square roots on the FMA pipes (vsqrt_newton: 5 instructions each) from p/2 = 1
    # up; below it the cut is not a normal float and every root stays on the divider
    assert ceiling.pow_ops(16.75, 0.5) == (7 + 0.5 * 2 * 5, 3, 1.0)
    assert ceiling.pow_ops(0.5, 0.5) == (2, 3, 1)
    assert ceiling.pow_ops(7.0, 0.5) == (5, 3, 0)
    # the weight's ops join its phase's pipes and divider
    m = ceiling.Mix(add=2, pow_weight=1)
    assert m.pipe_seconds(RATES, 64.5) == pytest.approx(max(8 / 1e9, 5 / 1e9, 13 / 2e9))
    assert m.divider_seconds(RATES, 64.5) == pytest.approx(1 / 5e7)
    with pytest.raises(ValueError):
        m.pipe_seconds(RATES)


def test_forward_ceiling_arithmetic():
    c = ceiling.Ceiling(dict(RATES))
    g = c.geometry
    assert (g.W, g.QB, g.CB, g.QC, g.KB, g.QCb, g.KBb) == (16, 6, 2, 2, 6, 4, 3)
    assert c.geometry_at(3).QB == 4
    D = 129
    mix = ceiling.forward_mix(g)
    # r2's partial sums: one addition per started 16-dimension block, 9 at D = 129
    sums = 9 / 129
    assert ceiling.Geometry.for_isa(64, D=33).sum_adds_per_dim() == pytest.approx(3 / 33)
    assert ceiling.Geometry.for_isa(64, D=128).sum_adds_per_dim() == pytest.approx(1 / 16)
    per_dim = max(1 / 1e9, (1 + sums) / 1e9, (2 + sums) / 2e9, (8 / 12) / 2e9) + max(
        1 / 1e9, 1 / 1e9, 2 / 2e9, (8 / 12) / 2e9
    )
    # per pair: A's 3 add-pipe instructions, a load and a store, B's 2 adds, 2 loads, a store
    # and the weight at p/2 = 64.5 (8 multiplications, 3 selects) on the pipes; A's division and
    # the weight's square root on the divider, which is not the busier unit here (so the best
    # placement of the root keeps it there: moving it to the FMA pipes would only add to them)
    per_pair = max(0.0, 3 / 1e9, 3 / 2e9, 1 / 2e9, 1 / 1e9) + max(
        8 / 1e9, 5 / 1e9, 13 / 2e9, 2 / 2e9, 1 / 1e9
    )
    divider = 1 / 1e8 + 1 / 5e7
    assert divider < D * per_dim + per_pair
    want = D * per_dim + per_pair
    assert mix.seconds_per_vector(D, RATES, 64.5) == pytest.approx(want)
    assert c.forward_seconds(1000, 2000, D) == pytest.approx(1000 * 2000 * want / 16)
    assert c.forward_gflops(D) == pytest.approx(4 * D * 16 / want / 1e9)
    # flows at p = D + 1; RK4 = four evaluations
    assert c.flow_step_seconds(10, 10, D, "rk4") == pytest.approx(
        4 * c.forward_seconds(10, 10, D, D + 1.0)
    )


def test_backward_floor():
    assert ceiling.floor_ratio_by_ops() == 2.0
    c = ceiling.Ceiling(dict(RATES))
    r = c.backward_over_forward(513)
    # the compiled loops on this made-up machine (one FMA and one add pipe): A' 2 FMA per
    # pair-dim, C' 7/3 on each pipe (10 / 6 loads fit in 2e9 loads/s) against the forward's
    # A (1 + 33/513 adds: the partial sums) and C (1 FMA); the per-pair terms add a little
    want = (2 + 7 / 3) / (1 + 33 / 513 + 1)
    assert r == pytest.approx(want, rel=0.05)
    assert r < want
    # at small D the divider can bind: D = 2, one division and (p/2 = 1) no square root per
    # vector, on a machine whose divider takes 2e-8 s a vector
    slow = dict(RATES, div=5e7)
    mix = ceiling.forward_mix(c.geometry_at(2))
    pipes = sum(2 * m.pipe_seconds(slow, 1.0) for m in mix.per_dim) + sum(
        m.pipe_seconds(slow, 1.0) for m in mix.per_pair
    )
    assert pipes < 2e-8
    assert mix.seconds_per_vector(2, slow, 1.0) == pytest.approx(2e-8)
    # the other ISAs' C' (x and g as broadcast loads): 3 FMA-pipe instructions
    g = ceiling.Geometry.for_isa(32)
    assert not g.held
    assert ceiling.backward_mix(g).per_dim[1].fma == 3
    assert c.fma_peak_gflops() == pytest.approx(2 * 16 * 1e9 / 1e9)


def test_backward_for_dx_alone():
    # the Riesz loss's calls: dL/dx only, no gradient on v. A' is the forward's distance step
    # (1 FMA, 1 + 9/129 adds per pair-dimension), C' the forward's 2 x 6 block with c for p and x
    # as broadcast operands (1 FMA, 1 add, 20 loads per 12 pair-dimensions)
    c = ceiling.Ceiling(dict(RATES))
    mix = ceiling.backward_mix(c.geometry, need_y=False, has_g=False)
    assert (mix.per_dim[0].fma, mix.per_dim[0].add) == (1, pytest.approx(1 + 9 / 129))
    assert (mix.per_dim[1].fma, mix.per_dim[1].add) == (1, 1)
    assert mix.per_dim[1].loads == pytest.approx(20 / 12)
    assert mix.per_dim[1].stores == 0
    D = 128
    full = c.backward_seconds(100, 100, D)
    dx = c.backward_seconds(100, 100, D, need_y=False, has_g=False)
    assert dx < full
    # per pair-dimension: A' (1 + 8/128) / 1e9 and C' max(1 / 1e9, (20 / 12) / 2e9) on this
    # machine; per pair, the same B' as the full backward
    per_dim = (1 + 8 / 128) / 1e9 + 1 / 1e9
    per_pair = sum(m.pipe_seconds(RATES, D / 2) for m in mix.per_pair)
    divider = sum(m.divider_seconds(RATES, D / 2) for m in mix.per_pair)
    assert dx / (100 * 100 / 16) == pytest.approx(max(D * per_dim + per_pair, divider))
    with pytest.raises(ValueError):
        ceiling.backward_mix(c.geometry, need_y=True, has_g=False)


def test_loop_attainment_sets_each_loop_against_its_phase():
    # the made-up machine at 1 GHz, one thread: loop rates in pair-dimension vectors per second
    rates = dict(RATES, **{"loop_A": 0.5e9, "loop_C": 1e9, "loop_A'": 0.25e9, "loop_C'": 0.3e9})
    c = ceiling.Ceiling(rates)
    rows = {op: (model, meas, frac) for op, model, meas, frac in ceiling.loop_attainment(c)}
    assert set(rows) == set(ceiling.LOOP_OPS)
    g = c.geometry_at(129)
    for op, (kernel, i) in ceiling.LOOP_OPS.items():
        mix = (ceiling.forward_mix if kernel == "forward" else ceiling.backward_mix)(g)
        model = mix.per_dim[i].seconds(rates) * 1e9  # cycles at 1 GHz
        assert rows[op][0] == pytest.approx(model)
        assert rows[op][1] == pytest.approx(1e9 / rates[op])
        assert rows[op][2] == pytest.approx(model / rows[op][1])
    # forward A: 1 FMA and 1 + 9/129 adds per pair-dimension on one pipe each: 1.07 cycles
    assert rows["loop_A"][0] == pytest.approx(1 + 9 / 129)
    assert rows["loop_A"][2] == pytest.approx((1 + 9 / 129) / 2)
    # a machine record without the loops (an older JSON) has no rows
    assert ceiling.loop_attainment(ceiling.Ceiling(dict(RATES))) == []


def test_avx2_geometry():
    g = ceiling.Geometry.for_isa(32)
    assert (g.W, g.KB, g.KBb) == (8, 3, 2)
    assert ceiling.Geometry.for_isa(64, double=True).W == 8


def test_machine_record_names_the_cpu():
    rec = machine.machine_record(threads=2)
    cpu = rec["cpu"]
    for key in ("model_name", "vendor", "family", "model", "caches", "flags", "cpu_count"):
        assert key in cpu
    assert rec["threads"] == 2
    assert rec["poissonflow"]["isa_chosen"] in rec["poissonflow"]["isas"]
    assert rec["poissonflow"]["vector_bytes"] in (16, 32, 64)
    assert rec["torch"]["cpu_capability"]
    assert "blas" in rec["torch"]
    assert len(rec["load_average"]) == 3
    line = machine.cpu_line(rec)
    assert cpu["model_name"] in line and "threads" in line


def test_pipe_benchmark_runs_every_operation():
    from poissonflow import _ext

    C = _ext.cpu_module()
    ops = C.pipe_ops()
    for op in (
        ceiling.PIPE_OPS
        + ceiling.DIVIDER_SLOT_OPS
        + tuple(ceiling.LOOP_OPS)
        + ("pow_weight", "phaseA")
    ):
        assert op in ops
        assert C.pipe_rate(op, 64, 1, 1.5) > 0  # a rate, whatever it is
    with pytest.raises(ValueError):
        C.pipe_rate("no-such-op", 64, 1)
    assert C.vector_bytes() in (16, 32, 64)
    assert math.isfinite(C.pipe_rate("fma", 64, 1, 0.0, True))


def test_the_bound_takes_the_best_placement_of_the_roots():
    # D = 3, p/2 = 1.5 on a machine whose divider binds (10 ns a division, 20 a root): every
    # share of the weights' roots on the FMA pipes is a placement the kernel could take, and the
    # bound is the best of them, whatever share the code uses
    g = ceiling.Geometry.for_isa(64, D=3)
    assert g.newton_forms
    assert not ceiling.Geometry.for_isa(64, double=True).newton_forms
    assert not ceiling.Geometry.for_isa(32).newton_forms
    mix = ceiling.forward_mix(g)
    by_share = {s: mix._seconds_at_share(3, RATES, 1.5, s) for s in ceiling.NEWTON_SHARES}
    assert mix.seconds_per_vector(3, RATES, 1.5) == pytest.approx(min(by_share.values()))
    # all roots on the divider: it binds (10 + 20 ns against about 14 ns of pipe work)
    assert by_share[0.0] == pytest.approx(1 / 1e8 + 1 / 5e7)
    # each root moved to the FMA pipes takes 20 ns from the divider and adds 5 multiplications
    # to phase B: the best share balances the two units, three roots in four here (the divider
    # 10 + 5 ns against 15.75 ns of pipe work); all four leave the pipes the busier unit
    assert min(by_share, key=by_share.get) == 0.75
    assert by_share[0.75] == pytest.approx(15.75e-9, rel=0.01)
    assert by_share[0.75] < by_share[1.0] < by_share[0.0]
    # an ISA without the forms keeps every root on the divider
    mix32 = ceiling.forward_mix(ceiling.Geometry.for_isa(32, D=3))
    assert mix32.seconds_per_vector(3, RATES, 1.5) == pytest.approx(
        mix32._seconds_at_share(3, RATES, 1.5, 0.0)
    )


def test_the_model_takes_the_log_domain_where_the_kernels_do():
    # csrc/cpu/power_form.h power_plan: 2p an integer, 2 <= p <= 4096
    assert ceiling.power_form_applies(2.0) and ceiling.power_form_applies(129.0)
    assert ceiling.power_form_applies(2.5)
    assert not ceiling.power_form_applies(1.5) and not ceiling.power_form_applies(1.0)
    assert not ceiling.power_form_applies(7.3) and not ceiling.power_form_applies(5000.0)
    c = ceiling.Ceiling(RATES)
    # at p = 1.5 the forward is costed in the log domain, whatever power_form says
    assert c.forward_seconds(1, 1, 3, 1.5) == pytest.approx(
        c.forward_seconds(1, 1, 3, 1.5, power_form=False)
    )
    assert c.forward_seconds(1, 1, 3, 3.0) != pytest.approx(
        c.forward_seconds(1, 1, 3, 3.0, power_form=False)
    )
