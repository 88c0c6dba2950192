"""bench/phase_profile.py's parsing of a disassembly into the kernels' functions (the sampling
itself needs Linux perf and is a development aid: docs/performance.md, "Where the time goes")."""

from __future__ import annotations

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)
import asm_mix  # noqa: E402
import phase_profile  # noqa: E402


def _tile(isa: str) -> str:
    return (
        f"void poissonflow::isa_{isa}::field_tile<float, true>"
        f"(poissonflow::isa_{isa}::TileScratch<float>&, long)"
    )


# objdump -d -C --no-show-raw-insn, in short: two ISA copies of a function and a caller
DISASSEMBLY = [
    "field_cpu.cpp.o:     file format elf64-x86-64",
    "",
    "Disassembly of section .text:",
    "",
    f"0000000000000100 <{_tile('avx512')}>:",
    "     100:\tvmovups (%rax),%zmm0",
    "     106:\tvfmadd231ps %zmm1,%zmm0,%zmm2",
    "     10c:\tvsubps %zmm3,%zmm0,%zmm4",
    "     112:\tcmp    %rax,%rbx",
    f"     115:\tjne    100 <{_tile('avx512')}+0x0>",
    "     117:\tret",
    "",
    f"0000000000000200 <{_tile('avx2')}>:",
    "     200:\tret",
    "",
    "0000000000000300 <poissonflow::isa_avx512::field_forward(poissonflow::FieldArgs const&)>:",
    f"     300:\tcall   100 <{_tile('avx512')}>",
    "     305:\tret",
]


def test_functions_of_one_isa_with_their_loops():
    found = dict(phase_profile.functions(DISASSEMBLY, "avx512"))
    assert set(found) == {"field_tile<float, true>", "field_forward"}
    body = found["field_tile<float, true>"]
    assert [a for a, _, _ in body] == [0x100, 0x106, 0x10C, 0x112, 0x115, 0x117]
    assert asm_mix.innermost(asm_mix.loops(body)) == [(0x100, 0x115)]
    mix = asm_mix.mix(body, 0x100, 0x115)
    assert (mix["fma"], mix["add"], mix["load"]) == (1, 1, 1)
    assert [n for n, _ in phase_profile.functions(DISASSEMBLY, "avx2")] == [
        "field_tile<float, true>"
    ]


def test_short_names():
    assert (
        phase_profile.short_name(
            "void poissonflow::isa_avx512::scores_block<float, 6, 2, true>(a, b)"
        )
        == "scores_block<float, 6, 2, true>"
    )
    assert phase_profile.short_name("poissonflow::isa_avx512::field_forward(x)") == "field_forward"


def _function(addr: int, name: str, loop: list[str]) -> list[str]:
    """A function of the avx512 copy whose body is one loop over `loop`'s instructions."""
    lines = [f"{addr:016x} <void poissonflow::isa_avx512::{name}(long)>:"]
    a = addr
    for ins in loop:
        lines.append(f"  {a:6x}:\t{ins}")
        a += 6
    lines += [f"  {a:6x}:\tjne    {addr:x} <x>", f"  {a + 2:6x}:\tret", ""]
    return lines


FORWARD_A = ["vmovups (%rcx),%zmm1"] + [
    "vsubps (%rdx){1to16},%zmm1,%zmm27",
    "vfmadd231ps %zmm27,%zmm27,%zmm14",
] * 4
SPILLED_A = FORWARD_A + ["vmovaps %zmm14,0x40(%rsp)"]


def test_bench_loops_against_the_kernels_loops():
    """asm_mix.agreement: a micro-benchmark loop is the kernel's when one of the kernel
    function's innermost loops has the same vector instructions; a spill makes it another."""
    kernels = _function(0x100, "scores_tile<float, true, true>", FORWARD_A)
    bench = "(anonymous namespace)::distance_calls<float, 6, false, true>"
    same = _function(0x500, bench, FORWARD_A)
    spilled = _function(0x500, bench, SPILLED_A)
    found = asm_mix.agreement(same, kernels, "avx512", "float", embed=True)
    assert set(found) == {"loop_A"}  # the other loops' functions are not in either listing
    sig, ok = found["loop_A"]
    assert ok and (sig["fma"], sig["add"], sig["load"], sig["store"]) == (4, 4, 5, 0)
    sig, ok = asm_mix.agreement(spilled, kernels, "avx512", "float", embed=True)["loop_A"]
    assert not ok and sig["store"] == 1
    # a form folded into the other's code (identical-code folding: an ISA without embedded
    # broadcasts) is found under the other form's name, on both sides
    sig, ok = asm_mix.agreement(same, kernels, "avx512", "float", embed=False)["loop_A"]
    assert ok and sig["fma"] == 4
    sig, ok = asm_mix.agreement(spilled, kernels, "avx512", "float", embed=False)["loop_A"]
    assert not ok
