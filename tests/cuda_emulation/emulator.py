"""Builds and loads the host emulator of the CUDA kernels (csrc/cuda/emulate/field_emulate.cpp).

The emulator runs the kernels' own block program (csrc/cuda/field_block.cuh) on the CPU, one
"thread" after another within each phase, so poissonflow._cuda_backend can be exercised end to end
on CPU tensors: `EmulatorRunner` has the interface of the backend's device runner, with addresses
of host memory. See the emulator's header comment for what this does and does not validate.

The shared library is compiled once per source version with the host C++ compiler into the
temporary directory (about 20 s on 2 cores) and reused by later runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CUDA_SRC = REPO / "csrc" / "cuda"
SOURCES = [
    CUDA_SRC / "emulate" / "field_emulate.cpp",
    CUDA_SRC / "field_block.cuh",
    CUDA_SRC / "field_math.cuh",
    CUDA_SRC / "block_plan.h",
    CUDA_SRC / "instances.h",
]
# -O1: the emulator's speed hardly matters, its compile time does.
# -ffp-contract=off: the kernels write every fused multiply-add explicitly (fma()); nothing else
# may be contracted, as nvcc would not contract across them either.
FLAGS = ["-O1", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off"]

# Largest dynamic shared memory per block on an A100 (the smaller of the two targets).
A100_SMEM_OPTIN = 166912

_U64 = "x y w exclude eps_rows v lse2 gv lse2_in delta gl gx gy gwsum t0 dt comb".split()
_I64 = "N B D ld n_steps max_window".split()
_F64 = "eps2 power tiny".split()
_I32 = "mode is_double solver device".split()


class LaunchArgs(ctypes.Structure):
    """Mirror of poissonflow::cuda::LaunchArgs (csrc/cuda/block_plan.h), field for field."""

    _fields_ = (
        [(n, ctypes.c_uint64) for n in _U64]
        + [(n, ctypes.c_int64) for n in _I64]
        + [(n, ctypes.c_double) for n in _F64]
        + [(n, ctypes.c_int32) for n in _I32]
        + [("stream", ctypes.c_uint64)]
    )


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(cxx: str | None = None) -> Path:
    """Compiles the emulator if this source version is not built yet; returns the library."""
    cxx = cxx or compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX) to build the CUDA kernel emulator")
    digest = hashlib.sha256()
    for path in SOURCES:
        digest.update(path.read_bytes())
    digest.update(" ".join([cxx, *FLAGS]).encode())
    out_dir = Path(tempfile.gettempdir()) / f"poissonflow-cuda-emu-{digest.hexdigest()[:16]}"
    lib = out_dir / "libpf_cuda_emu.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"build-{os.getpid()}.so"
    cmd = [cxx, *FLAGS, f"-I{CUDA_SRC}", str(SOURCES[0]), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, lib)  # atomic: concurrent builds leave one complete library
    return lib


class Emulator:
    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.pf_emu_sizeof_launch_args.restype = ctypes.c_int64
        self.lib.pf_emu_plan.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_int,
        ]
        self.lib.pf_emu_launch.argtypes = [
            ctypes.POINTER(LaunchArgs), ctypes.c_int64, ctypes.c_int, ctypes.c_uint64,
            ctypes.c_char_p, ctypes.c_int,
        ]
        if self.lib.pf_emu_sizeof_launch_args() != ctypes.sizeof(LaunchArgs):
            raise RuntimeError("LaunchArgs layout differs between block_plan.h and emulator.py")

    def plan(self, mode, is_double, D, smem_limit=A100_SMEM_OPTIN, max_window=0) -> dict:
        out = (ctypes.c_int64 * 5)()
        err = ctypes.create_string_buffer(512)
        if self.lib.pf_emu_plan(mode, int(is_double), D, smem_limit, max_window, out, err, 512):
            raise ValueError(err.value.decode())
        keys = ("upt", "window", "splits", "packs", "smem_bytes")
        return dict(zip(keys, list(out)))

    def launch(self, args: dict, *, smem_limit=A100_SMEM_OPTIN, order=0, seed=0) -> None:
        a = LaunchArgs()
        names = {f[0] for f in LaunchArgs._fields_}
        for key, value in args.items():
            if key not in names:
                raise KeyError(f"unknown launch argument {key!r}")
            setattr(a, key, value)
        err = ctypes.create_string_buffer(512)
        if self.lib.pf_emu_launch(ctypes.byref(a), smem_limit, order, seed, err, 512):
            raise RuntimeError(err.value.decode())


class EmulatorRunner:
    """Runs poissonflow._cuda_backend on CPU tensors through the emulator.

    order: 0 threads ascending, 1 descending, 2 shuffled per phase. max_window > 0 narrows the
    dimension window, forcing splits in the field kernels and the unfused flow fallback.
    """

    def __init__(self, emu: Emulator, *, order=0, seed=0, max_window=0,
                 smem_limit=A100_SMEM_OPTIN):
        self.emu, self.order, self.seed = emu, order, seed
        self.max_window, self.smem_limit = max_window, smem_limit
        self.launches: list[dict] = []

    def plan(self, mode, is_double, D) -> dict:
        return self.emu.plan(mode, is_double, D, self.smem_limit, self.max_window)

    def launch(self, **args) -> None:
        args["max_window"] = self.max_window
        self.launches.append(dict(args))
        self.emu.launch(args, smem_limit=self.smem_limit, order=self.order, seed=self.seed)
