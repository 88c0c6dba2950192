"""The implementations the conformance suite runs: every registry entry that can run here.

Each registry entry (poissonflow/registry.py) expands into one or more targets, each exposing the
backend protocol (docs/ARCHITECTURE.md) on tensors of one device:

* reference: the registry module itself (the float64 oracle against itself: checks the protocol
  adapter, the dtype round trip, N = 0 and dead rows);
* cpu: one target per compiled instruction set (poissonflow._ext.cpu_isas()), forced through
  $POISSONFLOW_CPU_ISA around each call, with the weights in power form wherever it applies
  (the default), and the best instruction set once more with log-domain weights
  (cpu-<isa>-log, $POISSONFLOW_CPU_WEIGHTS=log: csrc/cpu/power_form.h);
* triton, triton-gemm: on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by
  conftest.py), on CUDA tensors where there is a GPU;
* cuda: without a GPU, the CUDA kernels' block program on the host emulator
  (tests/cuda_emulation), driven by the real Python backend; with one, the real kernels;
* any other entry: its module, if it is available on CPU tensors.

Targets marked `small` (interpreter, emulator) are slow per pair: the cases are sized for them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import forced_isa, forced_weights

from poissonflow import registry

DTYPE_IDS = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}


@dataclass(frozen=True)
class Target:
    id: str
    backend: str
    device: str
    dtypes: tuple
    small: bool
    forward: Callable
    backward: Callable
    flow: Callable


def _with_isa(fn, isa, weights="auto"):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with forced_isa(isa), forced_weights(weights):
            return fn(*args, **kwargs)

    return call


@functools.cache
def _emulator():
    from cuda_emulation import emulator as emu

    return emu.Emulator(emu.build())


def _emulated_cuda(dtypes) -> Target:
    from poissonflow.kernels import cuda as cb

    def runner():
        from cuda_emulation.emulator import EmulatorRunner

        return EmulatorRunner(_emulator())

    return Target(
        "cuda-emu",
        "cuda",
        "cpu",
        dtypes,
        True,
        forward=lambda *a, **k: cb._field_forward(runner(), *a, **k),
        backward=lambda *a, **k: cb._field_backward(runner(), *a, **k),
        flow=lambda *a, **k: cb._flow_steps(runner(), *a, **k),
    )


def _module_target(tid, name, device, small) -> Target:
    entry = registry.get(name)
    mod = entry.module()
    return Target(
        tid,
        name,
        device,
        entry.dtypes,
        small,
        mod.field_forward,
        mod.field_backward,
        mod.flow_steps,
    )


def _discover() -> dict[str, Callable[[], Target]]:
    """{target id: factory}, in registry order; only what can run on this machine."""
    gpu = torch.cuda.is_available()
    out: dict[str, Callable[[], Target]] = {}
    for name, entry in registry.REGISTRY.items():
        ok, _ = entry.availability()
        if name == "cpu":
            if ok:
                from poissonflow import _ext

                variants = [(isa, "auto") for isa in _ext.cpu_isas()]
                variants.append((_ext.cpu_isas()[0], "log"))
                for isa, weights in variants:
                    tid = f"cpu-{isa}" if weights == "auto" else f"cpu-{isa}-{weights}"

                    def make(isa=isa, weights=weights, tid=tid, entry=entry):
                        mod = entry.module()
                        return Target(
                            tid,
                            "cpu",
                            "cpu",
                            entry.dtypes,
                            False,
                            _with_isa(mod.field_forward, isa, weights),
                            _with_isa(mod.field_backward, isa, weights),
                            _with_isa(mod.flow_steps, isa, weights),
                        )

                    out[tid] = make
        elif name == "cuda":
            if ok:
                out["cuda"] = functools.partial(_module_target, "cuda", "cuda", "cuda", False)
            else:
                from cuda_emulation import emulator as emu

                if emu.compiler() is not None:
                    out["cuda-emu"] = functools.partial(_emulated_cuda, entry.dtypes)
        elif name in ("triton", "triton-gemm"):
            # triton-gemm: its TF32 operand rounding is done in the kernel, so the interpreter
            # runs the same GEMM-form r2 as a tensor core (docs/DESIGN.md, "A tensor-core field with
            # a certified error")
            if ok:
                device = "cuda" if gpu else "cpu"
                tid = name if gpu else f"{name}-interp"
                out[tid] = functools.partial(_module_target, tid, name, device, not gpu)
        elif ok and "cpu" in entry.supported_devices():
            out[name] = functools.partial(_module_target, name, name, "cpu", False)
    return out


FACTORIES = _discover()
TARGET_IDS = tuple(FACTORIES)


@functools.cache
def get(tid: str) -> Target:
    return FACTORIES[tid]()


def dtypes_of(tid: str) -> tuple:
    # The registry's dtypes, without building the target (the emulator compiles on first use).
    backend = (
        "cpu"
        if tid.startswith("cpu-")
        else {
            "cuda-emu": "cuda",
            "triton-interp": "triton",
            "triton-gemm-interp": "triton-gemm",
        }.get(tid, tid)
    )
    return registry.get(backend).dtypes


def params(*extra_axes, dtypes=None, targets=None):
    """pytest.params over target x dtype (x each extra axis, a list of (value, id) pairs), with
    ids naming the target, the dtype and the extra values. `dtypes`: restrict the dtypes."""
    out = []
    for tid in targets or TARGET_IDS:
        for dt in dtypes_of(tid):
            if dtypes is not None and dt not in dtypes:
                continue
            combos = [((), ())]
            for axis in extra_axes:
                combos = [(vals + (v,), ids + (i,)) for vals, ids in combos for v, i in axis]
            for vals, ids in combos:
                out.append(pytest.param(tid, dt, *vals, id="-".join((tid, DTYPE_IDS[dt]) + ids)))
    return out
